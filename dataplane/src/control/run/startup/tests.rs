//! Unit tests of [`super`].
use std::time::Duration;

use super::*;

#[test]
fn other_events_do_not_push_the_quick_look_back() {
    let mut look = QuickLook::default();
    let t0 = Instant::now();
    let first = look.deadline(true, t0).expect("a deadline while waiting");
    assert_eq!(first, t0 + QUICK_LOOK);
    // Turns of the loop for other events (a model update every
    // millisecond) leave it where it was.
    for ms in 1..20 {
        assert_eq!(look.deadline(true, t0 + Duration::from_millis(ms)), Some(first));
    }
    // Made: the next wait starts afresh.
    look.done();
    let later = t0 + Duration::from_millis(30);
    assert_eq!(look.deadline(true, later), Some(later + QUICK_LOOK));
    // Nothing waits: no deadline, and none kept for the next wait.
    assert_eq!(look.deadline(false, later), None);
    let again = later + Duration::from_millis(1);
    assert_eq!(look.deadline(true, again), Some(again + QUICK_LOOK));
}
