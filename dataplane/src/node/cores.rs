//! Which CPUs get an executor: a pure function of the CPU affinity mask, the
//! online CPUs and `--cores`, because a Kubernetes CPU manager or `taskset`
//! may give us fewer CPUs than the machine has.
use std::collections::BTreeSet;

/// Why no set of cores could be chosen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoresError {
    /// The affinity mask and the online CPUs do not intersect.
    #[error("no CPU is both online and in this process's affinity mask")]
    NoneAvailable,
    /// `--cores` asked for more CPUs than we may run on.
    #[error("--cores {requested}: only {available} CPUs are available to this process")]
    TooMany {
        /// What was asked.
        requested: usize,
        /// What there is.
        available: usize,
    },
    /// `--cores 0`.
    #[error("--cores 0: at least one core is needed")]
    Zero,
}

/// The CPUs this process may run on ([sched_getaffinity(2)]).
///
/// [sched_getaffinity(2)]: https://man7.org/linux/man-pages/man2/sched_getaffinity.2.html
pub fn affinity() -> std::io::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    Ok((0..nix::sched::CpuSet::count()).filter(|&cpu| set.is_set(cpu).unwrap_or(false)).collect())
}

/// The CPUs to pin one executor each to: the lowest `requested` CPUs that are
/// both online and allowed, or all of them when `requested` is `None`.
pub fn choose(allowed: &[usize], online: &[usize], requested: Option<usize>) -> Result<Vec<usize>, CoresError> {
    let online: BTreeSet<usize> = online.iter().copied().collect();
    let usable: Vec<usize> =
        allowed.iter().copied().filter(|c| online.contains(c)).collect::<BTreeSet<_>>().into_iter().collect();
    if usable.is_empty() {
        return Err(CoresError::NoneAvailable);
    }
    match requested {
        None => Ok(usable),
        Some(0) => Err(CoresError::Zero),
        Some(n) if n > usable.len() => Err(CoresError::TooMany { requested: n, available: usable.len() }),
        Some(n) => Ok(usable[..n].to_vec()),
    }
}

/// The CPUs glommio sees online.
pub fn online() -> std::io::Result<Vec<usize>> {
    let set = glommio::CpuSet::online().map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(set.iter().map(|l| l.cpu).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_lists_at_least_one_cpu() {
        let cpus = affinity().expect("sched_getaffinity");
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]), "sorted: {cpus:?}");
    }

    #[test]
    fn all_usable_by_default() {
        assert_eq!(choose(&[0, 1, 2, 3], &[0, 1, 2, 3], None), Ok(vec![0, 1, 2, 3]));
    }

    #[test]
    fn affinity_restricts() {
        assert_eq!(choose(&[2, 3], &[0, 1, 2, 3], None), Ok(vec![2, 3]));
        assert_eq!(choose(&[3, 1], &[0, 1, 2, 3], Some(1)), Ok(vec![1]));
    }

    #[test]
    fn offline_cpus_are_skipped() {
        assert_eq!(choose(&[0, 1, 2, 3], &[0, 2], None), Ok(vec![0, 2]));
        assert_eq!(choose(&[1], &[0, 2], None), Err(CoresError::NoneAvailable));
    }

    #[test]
    fn requested_count_is_checked() {
        assert_eq!(choose(&[0, 1], &[0, 1], Some(0)), Err(CoresError::Zero));
        assert_eq!(choose(&[0, 1], &[0, 1], Some(3)), Err(CoresError::TooMany { requested: 3, available: 2 }));
    }
}
