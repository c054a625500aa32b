//! Deleting many objects in bulk, in an order that keeps the repository
//! valid if interrupted.
//!
//! Deletes are ordered (the reverse of writes, see rustic's
//! `read_write_ordering.md`): a backup's manifest before its data, a WAL
//! name's claim before its contents. One request per object made `expire`
//! of a backup of 100,000 objects on S3 100,000 sequential round trips. A
//! [`Deletion`] keeps the order as *phases*: every key of a phase is gone
//! before any key of the next is touched, and inside a phase nothing is
//! ordered, so each phase is one [`Backend::delete_many`] (S3's
//! DeleteObjects, 1,000 keys a request, several requests at once).
//!
//! Deletions of independent things (several backups, several WAL names)
//! are [`Deletion::merge`]d phase by phase: each thing's own order still
//! holds, and an interruption leaves each in a state its re-run finishes.
//!
//! [`Backend::delete_many`]: super::Backend::delete_many

use super::Repository;
use crate::error::Result;

/// Keys to delete, in phases (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deletion {
    phases: Vec<Vec<String>>,
}

impl Deletion {
    /// A deletion whose phases are `phases`, first to last.
    pub fn phased<P, K>(phases: P) -> Self
    where
        P: IntoIterator<Item = K>,
        K: IntoIterator<Item = String>,
    {
        let mut d = Deletion::default();
        for p in phases {
            d.then(p);
        }
        d
    }

    /// Adds a phase after the others (an empty one is a no-op; it still
    /// counts for [`Deletion::merge`]'s alignment).
    pub fn then(&mut self, keys: impl IntoIterator<Item = String>) -> &mut Self {
        self.phases.push(keys.into_iter().collect());
        self
    }

    /// Folds `other` in phase by phase: phase i of `other` joins phase i
    /// of `self`. For independent things only.
    pub fn merge(&mut self, other: Deletion) {
        for (i, p) in other.phases.into_iter().enumerate() {
            match self.phases.get_mut(i) {
                Some(mine) => mine.extend(p),
                None => self.phases.push(p),
            }
        }
    }

    /// Every key, in an order that respects the phases.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.phases.iter().flatten()
    }

    pub fn len(&self) -> usize {
        self.phases.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Repository {
    /// Deletes `d`, one bulk request stream per phase, in order. A key
    /// already gone is no error, so a re-run after an interruption
    /// finishes.
    pub async fn delete_all(&self, d: &Deletion) -> Result<()> {
        for phase in d.phases.iter().filter(|p| !p.is_empty()) {
            // Merged deletions may name a key twice (a mark listed and
            // written again); a bulk request should not.
            let mut keys = phase.clone();
            keys.sort_unstable();
            keys.dedup();
            self.backend().delete_many(&keys).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(d: &Deletion) -> Vec<&str> {
        d.keys().map(String::as_str).collect()
    }

    #[test]
    fn merge_keeps_each_order() {
        let s = |v: &[&str]| v.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        let mut a = Deletion::phased([s(&["a/manifest"]), s(&["a/1", "a/2"]), s(&["a/mark"])]);
        // A WAL name without a claim: its first phase is empty.
        let b = Deletion::phased([s(&[]), s(&["b/1"])]);
        a.merge(b);
        assert_eq!(a.len(), 5);
        assert_eq!(
            keys(&a),
            ["a/manifest", "a/1", "a/2", "b/1", "a/mark"],
            "b's data goes with a's data, after every first phase"
        );
    }
}
