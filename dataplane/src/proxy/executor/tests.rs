//! Unit tests of [`super`].
use super::inbound_cpu;

#[test]
fn each_inbound_listener_takes_the_previous_executors_tunnels() {
    let cpus = [2, 5, 7];
    let chosen: Vec<_> = (0..cpus.len()).map(|i| inbound_cpu(&cpus, i, true)).collect();
    assert_eq!(chosen, [Some(7), Some(2), Some(5)]);
    // Every CPU is asked for by exactly one other executor.
    assert!(chosen.iter().zip(cpus).all(|(c, own)| *c != Some(own)));
    assert_eq!(inbound_cpu(&cpus, 1, false), None, "tunnels from elsewhere: the kernel's hash");
    assert_eq!(inbound_cpu(&[3], 0, true), None, "one executor: nothing to spread");
}
