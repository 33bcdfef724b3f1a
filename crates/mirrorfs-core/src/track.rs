//! Where a file walked earlier is now: the names of files waiting for a copy, kept current
//! through the namespace changes that happen while the copy runs.
//!
//! A live initial copy (or resync) walks the namespace once, under the order lock, and then
//! copies each file's data chunk by chunk, each chunk under its own hold of the lock. Between two
//! chunks the file may have been renamed, or a directory above it may have been; a hard link may
//! have been added or removed. The copy must read the file under its *current* name, because the
//! chunk is journaled by path and applied on the mirror after every change journaled before it.
//!
//! `NameTracker` is the sans-IO part of that: it is told each namespace change that took effect on
//! the backing tree (in journal order, under the same lock) and answers which names a tracked
//! inode has now. The shell still checks the inode number of what it opens, so a tracker that
//! missed something can only make a file be skipped, never make the wrong data be copied.

use std::collections::{BTreeMap, HashMap};

use crate::op::Op;
use crate::path::RelPath;

/// Names of the tracked inodes. Memory is bounded by the number of names tracked (the files the
/// copy still has to do); `forget` drops a file once it is done.
#[derive(Debug, Default, Clone)]
pub struct NameTracker {
    by_name: BTreeMap<Vec<u8>, u64>,
    by_ino: HashMap<u64, Vec<RelPath>>,
}

impl NameTracker {
    pub fn new() -> Self {
        NameTracker::default()
    }

    /// `path` names `ino` (a file found by the walk, or another hard link of it).
    pub fn add(&mut self, ino: u64, path: RelPath) {
        if let Some(old) = self.by_name.insert(path.as_bytes().to_vec(), ino) {
            if old != ino {
                self.drop_name_of(old, &path);
            } else {
                return;
            }
        }
        self.by_ino.entry(ino).or_default().push(path);
    }

    /// The current names of `ino`, oldest first; empty when it has none left (or is untracked).
    pub fn names(&self, ino: u64) -> &[RelPath] {
        self.by_ino.get(&ino).map_or(&[], |v| v.as_slice())
    }

    /// The copy is done with `ino`.
    pub fn forget(&mut self, ino: u64) {
        if let Some(names) = self.by_ino.remove(&ino) {
            for n in names {
                self.by_name.remove(n.as_bytes());
            }
        }
    }

    /// Number of names tracked.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// A change that took effect on the backing tree. Only namespace changes matter; everything
    /// else (data, attributes, `Sync` records of copies) leaves names as they are.
    pub fn observe(&mut self, op: &Op) {
        match op {
            Op::Unlink { path, .. } | Op::Rmdir { path } => {
                self.take_tree(path);
            }
            Op::Rename {
                from, to, flags, ..
            } => {
                let same_file = match (
                    self.by_name.get(from.as_bytes()),
                    self.by_name.get(to.as_bytes()),
                ) {
                    (Some(a), Some(b)) => a == b,
                    _ => false,
                };
                if from == to || same_file {
                    // rename(2) of two links of one file does nothing.
                    return;
                }
                if flags & RENAME_EXCHANGE != 0 {
                    let a = self.take_tree(from);
                    let b = self.take_tree(to);
                    self.put_rebased(a, from, to);
                    self.put_rebased(b, to, from);
                } else {
                    // Whatever `to` named is replaced (a file, or an empty directory).
                    self.take_tree(to);
                    let moved = self.take_tree(from);
                    self.put_rebased(moved, from, to);
                }
            }
            Op::Link { from, to } => {
                if let Some(&ino) = self.by_name.get(from.as_bytes()) {
                    self.add(ino, to.clone());
                }
            }
            _ => {}
        }
    }

    /// Takes `path` and every name below it out of the tracker, returning them.
    fn take_tree(&mut self, path: &RelPath) -> Vec<(RelPath, u64)> {
        let taken = self.take_names(path);
        taken
            .into_iter()
            .filter_map(|(name, ino)| {
                let p = RelPath::new(name).ok()?;
                self.drop_name_of(ino, &p);
                Some((p, ino))
            })
            .collect()
    }

    /// Takes `path` and every name below it out of `by_name`.
    fn take_names(&mut self, path: &RelPath) -> Vec<(Vec<u8>, u64)> {
        let p = path.as_bytes();
        let mut out = Vec::new();
        if p.is_empty() {
            // The root is never renamed or removed; nothing to do.
            return out;
        }
        if let Some(ino) = self.by_name.remove(p) {
            out.push((p.to_vec(), ino));
        }
        // Names below `p` sort between "p/" and "p0" ('0' is the byte after '/').
        let mut lo = p.to_vec();
        lo.push(b'/');
        let mut hi = p.to_vec();
        hi.push(b'/' + 1);
        let below: Vec<Vec<u8>> = self.by_name.range(lo..hi).map(|(k, _)| k.clone()).collect();
        for k in below {
            if let Some(ino) = self.by_name.remove(&k) {
                out.push((k, ino));
            }
        }
        out
    }

    /// Puts names taken from under `from` back under `to`.
    fn put_rebased(&mut self, names: Vec<(RelPath, u64)>, from: &RelPath, to: &RelPath) {
        for (old, ino) in names {
            if let Some(new) = old.rebase(from, to) {
                self.add(ino, new);
            }
        }
    }

    fn drop_name_of(&mut self, ino: u64, path: &RelPath) {
        if let Some(v) = self.by_ino.get_mut(&ino) {
            v.retain(|n| n != path);
            if v.is_empty() {
                self.by_ino.remove(&ino);
            }
        }
    }
}

/// `RENAME_EXCHANGE` of renameat2(2) (the `flags` of `Op::Rename` are Linux's).
const RENAME_EXCHANGE: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).expect("valid path")
    }

    fn names(t: &NameTracker, ino: u64) -> Vec<String> {
        t.names(ino).iter().map(|n| n.to_string()).collect()
    }

    fn rename(from: &str, to: &str, flags: u32) -> Op {
        Op::Rename {
            from: p(from),
            to: p(to),
            flags,
            from_ino: 0,
        }
    }

    #[test]
    fn renaming_a_parent_directory_moves_the_names_below_it() {
        let mut t = NameTracker::new();
        t.add(10, p("d3/sub/f"));
        t.add(11, p("d3x/g"));
        t.add(12, p("d3"));
        t.observe(&rename("d3", "moved", 0));
        assert_eq!(names(&t, 10), ["moved/sub/f"]);
        assert_eq!(
            names(&t, 11),
            ["d3x/g"],
            "a sibling sharing the prefix stays"
        );
        assert_eq!(names(&t, 12), ["moved"]);
        t.observe(&rename("moved/sub", "top", 0));
        assert_eq!(names(&t, 10), ["top/f"]);
    }

    #[test]
    fn unlink_and_replacing_rename_drop_names_and_links_keep_the_file() {
        let mut t = NameTracker::new();
        t.add(10, p("a"));
        t.observe(&Op::Link {
            from: p("a"),
            to: p("b"),
        });
        assert_eq!(names(&t, 10), ["a", "b"]);
        t.observe(&Op::Unlink {
            path: p("a"),
            nlink: 2,
        });
        assert_eq!(names(&t, 10), ["b"]);
        t.add(11, p("c"));
        t.observe(&rename("c", "b", 0));
        assert_eq!(names(&t, 10), Vec::<String>::new(), "b was replaced");
        assert_eq!(names(&t, 11), ["b"]);
        t.forget(11);
        assert!(t.is_empty());
    }

    #[test]
    fn exchange_swaps_both_trees() {
        let mut t = NameTracker::new();
        t.add(1, p("x/f"));
        t.add(2, p("y/g"));
        t.add(3, p("y"));
        t.observe(&rename("x", "y", RENAME_EXCHANGE));
        assert_eq!(names(&t, 1), ["y/f"]);
        assert_eq!(names(&t, 2), ["x/g"]);
        assert_eq!(names(&t, 3), ["x"]);
    }

    #[test]
    fn other_changes_leave_names_alone() {
        let mut t = NameTracker::new();
        t.add(1, p("a/f"));
        t.observe(&Op::Mkdir {
            path: p("a/g"),
            mode: 0o755,
            uid: 0,
            gid: 0,
        });
        t.observe(&Op::Truncate {
            path: p("a/f"),
            size: 0,
        });
        t.observe(&rename("a/f", "a/f", 0));
        assert_eq!(names(&t, 1), ["a/f"]);
    }

    /// A model file system of paths: names → inode, with directories as inodes too.
    #[derive(Clone, Debug)]
    enum Step {
        Rename(usize, usize, bool),
        Unlink(usize),
        Link(usize, usize),
    }

    const POOL: &[&str] = &["a", "b", "a/x", "a/y", "b/x", "b/y", "a/x/z", "b/x/z"];

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..POOL.len(), 0..POOL.len(), any::<bool>())
                .prop_map(|(a, b, x)| Step::Rename(a, b, x)),
            (0..POOL.len()).prop_map(Step::Unlink),
            (0..POOL.len(), 0..POOL.len()).prop_map(|(a, b)| Step::Link(a, b)),
        ]
    }

    proptest! {
        /// Against a model that rewrites every name of every inode on each change: the tracker
        /// names each inode exactly as the model does.
        #[test]
        fn tracker_matches_a_model(steps in proptest::collection::vec(step(), 0..40)) {
            let mut model: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
            let mut t = NameTracker::new();
            for (i, n) in POOL.iter().enumerate() {
                model.insert(n.as_bytes().to_vec(), i as u64);
                t.add(i as u64, p(n));
            }
            for s in steps {
                let op = match s {
                    Step::Rename(a, b, x) => {
                        let (a, b) = (p(POOL[a]), p(POOL[b]));
                        // The kernel refuses renaming a directory into itself or onto an
                        // ancestor (which is not empty).
                        if a != b && (b.starts_with(&a) || a.starts_with(&b)) {
                            continue;
                        }
                        // ENOENT: no source (or, for an exchange, no target).
                        let exists = |q: &RelPath| model.contains_key(q.as_bytes());
                        if !exists(&a) || (x && !exists(&b)) {
                            continue;
                        }

                        Op::Rename { from: a, to: b, flags: if x { RENAME_EXCHANGE } else { 0 }, from_ino: 0 }
                    }
                    Step::Unlink(a) => Op::Unlink { path: p(POOL[a]), nlink: 1 },
                    // link(2) never replaces an existing name.
                    Step::Link(_, b) if model.contains_key(POOL[b].as_bytes()) => continue,
                    Step::Link(a, b) => Op::Link { from: p(POOL[a]), to: p(POOL[b]) },
                };
                apply_model(&mut model, &op);
                t.observe(&op);
            }
            let mut want: HashMap<u64, Vec<String>> = HashMap::new();
            for (k, ino) in &model {
                want.entry(*ino).or_default().push(String::from_utf8_lossy(k).into_owned());
            }
            for ino in 0..POOL.len() as u64 {
                let mut got = names(&t, ino);
                got.sort();
                let mut w = want.remove(&ino).unwrap_or_default();
                w.sort();
                prop_assert_eq!(got, w, "inode {}", ino);
            }
        }
    }

    fn apply_model(model: &mut BTreeMap<Vec<u8>, u64>, op: &Op) {
        let under =
            |k: &[u8], p: &RelPath| RelPath::new(k.to_vec()).is_ok_and(|k| k.starts_with(p));
        let take = |model: &mut BTreeMap<Vec<u8>, u64>, p: &RelPath| -> Vec<(RelPath, u64)> {
            let keys: Vec<Vec<u8>> = model.keys().filter(|k| under(k, p)).cloned().collect();
            keys.into_iter()
                .filter_map(|k| {
                    let ino = model.remove(&k)?;
                    Some((RelPath::new(k).ok()?, ino))
                })
                .collect()
        };
        match op {
            Op::Unlink { path, .. } => {
                take(model, path);
            }
            // Two links of one file: rename(2) does nothing.
            Op::Rename { from, to, .. }
                if model.get(from.as_bytes()) == model.get(to.as_bytes()) => {}
            Op::Rename {
                from, to, flags, ..
            } => {
                let a = take(model, from);
                let b = take(model, to);
                for (k, ino) in a {
                    if let Some(n) = k.rebase(from, to) {
                        model.insert(n.as_bytes().to_vec(), ino);
                    }
                }
                if flags & RENAME_EXCHANGE != 0 {
                    for (k, ino) in b {
                        if let Some(n) = k.rebase(to, from) {
                            model.insert(n.as_bytes().to_vec(), ino);
                        }
                    }
                }
            }
            Op::Link { from, to } => {
                if let Some(&ino) = model.get(from.as_bytes()) {
                    model.insert(to.as_bytes().to_vec(), ino);
                }
            }
            _ => {}
        }
    }
}
