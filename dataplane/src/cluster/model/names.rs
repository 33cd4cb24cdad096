//! Strings that many entries share (namespaces, service accounts, SPIFFE
//! identities), kept once: at 100,000 pods a copy per pod is megabytes, a
//! copy per namespace nothing.
use std::{collections::HashSet, sync::Arc};

/// One copy of each string handed out, forgotten once nobody else holds it
/// (checked whenever the set has doubled, so a cluster that creates and
/// deletes namespaces all day does not grow it for ever).
#[derive(Debug, Default, Clone)]
pub struct Names {
    set: HashSet<Arc<str>>,
    /// Its size after the last look for unused strings.
    kept: usize,
}

impl Names {
    /// The one copy of `s`.
    pub fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(name) = self.set.get(s) {
            return name.clone();
        }
        if self.set.len() >= 2 * self.kept.max(64) {
            self.set.retain(|n| Arc::strong_count(n) > 1);
            self.kept = self.set.len();
        }
        let name: Arc<str> = s.into();
        self.set.insert(name.clone());
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_string_and_unused_ones_are_forgotten() {
        let mut names = Names::default();
        let a = names.intern("shop");
        assert!(Arc::ptr_eq(&a, &names.intern("shop")), "the same copy");
        // Many strings come and go: the set does not keep them all.
        for i in 0..1_000 {
            let _ = names.intern(&format!("ns-{i}"));
        }
        assert!(names.set.len() < 200, "{} kept", names.set.len());
        assert!(Arc::ptr_eq(&a, &names.intern("shop")), "a string still held stays the same copy");
    }
}
