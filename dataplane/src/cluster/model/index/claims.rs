//! The objects that claim one address: the pods holding it, or the
//! Services it is an endpoint of. Almost always one, two only for a moment
//! (a stale pod beside its successor), so the one is kept inline and only
//! more take a sorted vector: a `BTreeSet` allocates a node for eleven on
//! the first insert, which at 100,000 addresses was a fifth of the agent's
//! memory, and a vector of one is still an allocation per address.
use crate::cluster::model::ObjectRef;

/// A small sorted set of objects.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) enum Claims {
    #[default]
    None,
    One(ObjectRef),
    /// Two or more, sorted.
    Many(Vec<ObjectRef>),
}

impl Claims {
    /// Adds `key` (once).
    pub(super) fn insert(&mut self, key: ObjectRef) {
        match self {
            Claims::None => *self = Claims::One(key),
            Claims::One(one) if *one == key => {}
            Claims::One(one) => {
                let mut both = vec![one.clone(), key];
                both.sort();
                *self = Claims::Many(both);
            }
            Claims::Many(many) => {
                if let Err(at) = many.binary_search(&key) {
                    many.insert(at, key);
                }
            }
        }
    }

    /// Removes `key`, if there.
    pub(super) fn remove(&mut self, key: &ObjectRef) {
        match self {
            Claims::One(one) if one == key => *self = Claims::None,
            Claims::Many(many) => {
                if let Ok(at) = many.binary_search(key) {
                    many.remove(at);
                }
                if many.len() == 1 {
                    *self = Claims::One(many.remove(0));
                }
            }
            _ => {}
        }
    }

    /// Whether none is left.
    pub(super) fn is_empty(&self) -> bool {
        matches!(self, Claims::None)
    }

    /// In order.
    pub(super) fn iter(&self) -> std::slice::Iter<'_, ObjectRef> {
        match self {
            Claims::None => [].iter(),
            Claims::One(one) => std::slice::from_ref(one).iter(),
            Claims::Many(many) => many.iter(),
        }
    }
}

impl<'a> IntoIterator for &'a Claims {
    type Item = &'a ObjectRef;
    type IntoIter = std::slice::Iter<'a, ObjectRef>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sorted_set_of_one_or_more() {
        let (a, b, c) = (ObjectRef::new("ns", "a"), ObjectRef::new("ns", "b"), ObjectRef::new("ns", "c"));
        let mut claims = Claims::default();
        assert!(claims.is_empty());
        claims.insert(c.clone());
        claims.insert(c.clone());
        assert_eq!(claims, Claims::One(c.clone()), "once");
        claims.insert(a.clone());
        claims.insert(b.clone());
        assert_eq!(claims.iter().collect::<Vec<_>>(), [&a, &b, &c], "in order");
        claims.remove(&b);
        claims.remove(&a);
        assert_eq!(claims, Claims::One(c.clone()), "back to one, inline");
        claims.remove(&a);
        assert_eq!(claims, Claims::One(c.clone()), "removing what is not there changes nothing");
        claims.remove(&c);
        assert!(claims.is_empty());
        assert!(std::mem::size_of::<Claims>() <= std::mem::size_of::<ObjectRef>() + 8, "one is held inline");
    }
}
