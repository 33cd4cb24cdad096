//! The objects that claim one address: the pods holding it, or the
//! Services it is an endpoint of. Almost always one, two only for a moment
//! (a stale pod beside its successor), so a sorted vector sized to fit: a
//! `BTreeSet` allocates a node for eleven on the first insert, which at
//! 100,000 addresses was a fifth of the agent's memory.
use crate::cluster::model::ObjectRef;

/// A small sorted set of objects.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Claims(Vec<ObjectRef>);

impl Claims {
    /// Adds `key` (once).
    pub(super) fn insert(&mut self, key: ObjectRef) {
        if let Err(at) = self.0.binary_search(&key) {
            self.0.reserve_exact(1);
            self.0.insert(at, key);
        }
    }

    /// Removes `key`, if there.
    pub(super) fn remove(&mut self, key: &ObjectRef) {
        if let Ok(at) = self.0.binary_search(key) {
            self.0.remove(at);
        }
    }

    /// Whether none is left.
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In order.
    pub(super) fn iter(&self) -> std::slice::Iter<'_, ObjectRef> {
        self.0.iter()
    }
}

impl<'a> IntoIterator for &'a Claims {
    type Item = &'a ObjectRef;
    type IntoIter = std::slice::Iter<'a, ObjectRef>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
