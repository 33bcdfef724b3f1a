//! The inode table of the FUSE shell: which names (parent, name) each inode the kernel knows has,
//! so that every operation can be journaled by path. FUSE inode numbers are the backing file
//! system's inode numbers (the backing root is inode 1).
//!
//! One exception keeps node ids unique: when a file is deleted through the mount while the kernel
//! still caches its inode, the backing file system may give the freed number to the next new file.
//! Reusing the node id would make the kernel take the new file for the old one (it then refuses to
//! link it, "nlink is 0", or serves the old file's cached pages). The deletion marks the node
//! *gone*; a new file that arrives with the number of a gone node gets a node id of its own above
//! `ALIAS_BASE` until the kernel forgets it.
//!
//! A name names one node: the table keeps the reverse index `(parent, name) → node`, so a lookup
//! that finds another inode under a name takes the name away from the node that had it, and the
//! name a lookup just found comes first (it is the one `path` uses). The tree can change beneath
//! the mount without FUSE seeing it — a failback's reintegration applies the other site's changes
//! through the site's volume — and then `beneath` moves or removes names by path (`at`).

use std::collections::HashMap;

use mirrorfs_core::path::RelPath;

pub const ROOT: u64 = 1;
/// Node ids given to new files that reuse the number of a gone one (far above any inode number
/// a Linux file system hands out in practice).
pub const ALIAS_BASE: u64 = 1 << 62;

/// A name in a directory: `(parent node, name bytes)`. A boxed slice (16 bytes, no spare
/// capacity) rather than a `Vec`: the table holds two per name the kernel knows.
type Name = (u64, Box<[u8]>);

#[derive(Default)]
struct Node {
    /// Its names, the one `path` uses first. Nearly always one: allocated to fit (a `Vec`
    /// grown by `insert` reserves room for four), see `Inodes::name`.
    names: Vec<Name>,
    lookups: u64,
    /// The backing inode number.
    backing: u64,
    /// Its backing inode was freed through the mount (last link removed).
    gone: bool,
}

#[derive(Default)]
pub struct Inodes {
    nodes: HashMap<u64, Node>,
    /// `(parent, name)` → the node that name is known to name: the reverse of `Node::names`.
    entries: HashMap<Name, u64>,
    /// Backing inode number → node id, for the files given an id of their own.
    alias: HashMap<u64, u64>,
    next_alias: u64,
    /// The backing root's own inode number, reported to the kernel as `ROOT`.
    pub root_backing_ino: u64,
}

impl Inodes {
    pub fn new(root_backing_ino: u64) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                names: Vec::new(),
                lookups: 1,
                backing: root_backing_ino,
                gone: false,
            },
        );
        Inodes {
            nodes,
            entries: HashMap::new(),
            alias: HashMap::new(),
            next_alias: ALIAS_BASE,
            root_backing_ino,
        }
    }

    /// Maps a backing inode number to the FUSE one.
    pub fn fuse_ino(&self, backing: u64) -> u64 {
        if backing == self.root_backing_ino {
            ROOT
        } else {
            self.alias.get(&backing).copied().unwrap_or(backing)
        }
    }

    /// The backing inode number of node `ino`.
    pub fn backing(&self, ino: u64) -> Option<u64> {
        if ino == ROOT {
            return Some(self.root_backing_ino);
        }
        self.nodes.get(&ino).map(|n| n.backing)
    }

    /// The path of `ino` (through its first known name).
    pub fn path(&self, ino: u64) -> Option<RelPath> {
        let mut comps: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        // Bounded: a path has at most PATH_BYTES_MAX/2 + 1 components.
        for _ in 0..=mirrorfs_core::path::PATH_BYTES_MAX / 2 + 1 {
            if cur == ROOT {
                let mut p = RelPath::root();
                for c in comps.iter().rev() {
                    p = p.join(c).ok()?;
                }
                return Some(p);
            }
            let node = self.nodes.get(&cur)?;
            let (parent, name) = node.names.first()?;
            comps.push(name);
            cur = *parent;
        }
        None
    }

    /// Records a lookup of `name` in `parent` that found the backing inode `backing`; returns the
    /// node id to give the kernel.
    pub fn register(&mut self, parent: u64, name: &[u8], backing: u64) -> u64 {
        let mut id = self.fuse_ino(backing);
        if id == ROOT {
            return ROOT;
        }
        if self.nodes.get(&id).is_some_and(|n| n.gone) {
            // A new file with the number of a deleted one the kernel still caches.
            id = self.next_alias;
            self.next_alias += 1;
            self.alias.insert(backing, id);
        }
        let node = self.nodes.entry(id).or_insert_with(|| Node {
            backing,
            ..Node::default()
        });
        node.lookups += 1;
        self.name(id, parent, name);
        id
    }

    /// `(parent, name)` now names node `id`, as its first name: taken from whichever node had it.
    fn name(&mut self, id: u64, parent: u64, name: &[u8]) {
        let key: Name = (parent, name.into());
        if let Some(old) = self.entries.insert(key, id) {
            if old != id {
                if let Some(n) = self.nodes.get_mut(&old) {
                    n.names.retain(|(p, n)| !(*p == parent && &n[..] == name));
                }
            }
        }
        if let Some(node) = self.nodes.get_mut(&id) {
            node.names
                .retain(|(p, n)| !(*p == parent && &n[..] == name));
            if node.names.is_empty() {
                // Exactly one slot: the common case, a file with one name.
                node.names = vec![(parent, name.into())];
            } else {
                node.names.insert(0, (parent, name.into()));
            }
        }
    }

    /// `(parent, name)` no longer names `id` (if it did).
    fn unname(&mut self, id: u64, parent: u64, name: &[u8]) {
        let key: Name = (parent, name.into());
        if self.entries.get(&key) == Some(&id) {
            self.entries.remove(&key);
        }
        if let Some(node) = self.nodes.get_mut(&id) {
            node.names
                .retain(|(p, n)| !(*p == parent && &n[..] == name));
        }
    }

    /// The node the table knows under `p`, found name by name from the root.
    pub fn at(&self, p: &RelPath) -> Option<u64> {
        let mut cur = ROOT;
        for c in p.as_bytes().split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            cur = *self.entries.get(&(cur, Box::<[u8]>::from(c)))?;
        }
        Some(cur)
    }

    /// The node `p` names and the node of its parent directory, as far as the table knows them.
    pub fn entry_at(&self, p: &RelPath) -> (Option<u64>, Option<u64>) {
        let parent = p.parent().and_then(|d| self.at(&d));
        (self.at(p), parent)
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
            if node.lookups == 0 {
                let backing = node.backing;
                for key in std::mem::take(&mut node.names) {
                    if self.entries.get(&key) == Some(&ino) {
                        self.entries.remove(&key);
                    }
                }
                self.nodes.remove(&ino);
                if self.alias.get(&backing) == Some(&ino) {
                    self.alias.remove(&backing);
                }
            }
        }
    }

    /// The backing inode `backing` was freed (its last link removed through the mount): a new file
    /// that gets its number is another file. Call under the order lock, right after the removal,
    /// so no creation can come in between.
    pub fn gone(&mut self, backing: u64) {
        let id = self.fuse_ino(backing);
        if let Some(node) = self.nodes.get_mut(&id) {
            node.gone = true;
        }
    }

    /// Node `ino`'s backing inode may have been freed (its last known name removed beneath the
    /// mount): as `gone`, by node id.
    pub fn gone_node(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.gone = true;
        }
    }

    /// `name` in `parent` no longer names `ino`.
    pub fn unlink(&mut self, parent: u64, name: &[u8], ino: u64) {
        self.unname(ino, parent, name);
    }

    /// The entry `(parent, name)` moved to `(new_parent, new_name)` (replacing what was there).
    pub fn rename(&mut self, ino: u64, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8]) {
        if self.nodes.contains_key(&ino) {
            self.unname(ino, parent, name);
            self.name(ino, new_parent, new_name);
        }
    }

    /// True if node `ino` has no known name left.
    pub fn nameless(&self, ino: u64) -> bool {
        self.nodes.get(&ino).is_none_or(|n| n.names.is_empty())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_renames_and_links() {
        let mut t = Inodes::new(2);
        t.register(ROOT, b"d", 10);
        t.register(10, b"f", 11);
        assert_eq!(t.path(11).map(|p| p.to_string()), Some("d/f".into()));
        t.rename(10, ROOT, b"d", ROOT, b"e");
        assert_eq!(t.path(11).map(|p| p.to_string()), Some("e/f".into()));
        t.register(ROOT, b"hard", 11);
        t.unlink(10, b"f", 11);
        assert_eq!(t.path(11).map(|p| p.to_string()), Some("hard".into()));
        t.unlink(ROOT, b"hard", 11);
        assert_eq!(t.path(11), None);
        t.forget(11, 2);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_new_file_reusing_a_gone_inode_number_gets_its_own_node_id() {
        let mut t = Inodes::new(2);
        assert_eq!(t.register(ROOT, b"old", 11), 11);
        t.unlink(ROOT, b"old", 11);
        t.gone(11);
        // The kernel still holds node 11; the backing file system reuses number 11.
        let id = t.register(ROOT, b"new", 11);
        assert!(id >= ALIAS_BASE);
        assert_eq!(
            t.fuse_ino(11),
            id,
            "later replies about the new file use its id"
        );
        assert_eq!(
            t.register(ROOT, b"new", 11),
            id,
            "a second lookup finds the same id"
        );
        assert_eq!(t.path(id).map(|p| p.to_string()), Some("new".into()));
        assert_eq!(t.path(11), None, "the old node has no name");
        t.forget(11, 1);
        assert_eq!(
            t.fuse_ino(11),
            id,
            "the alias lives as long as the kernel holds it"
        );
        t.forget(id, 2);
        assert_eq!(t.fuse_ino(11), 11);
        assert_eq!(t.len(), 1);
        // Hard links: removing one of two names is not `gone`.
        assert_eq!(t.register(ROOT, b"a", 12), 12);
        assert_eq!(t.register(ROOT, b"b", 12), 12);
    }

    /// The tree changed beneath the mount: a lookup that finds another inode under a name takes
    /// the name from the node that had it, and the name found last is the one `path` uses.
    #[test]
    fn a_lookup_takes_a_name_from_the_node_that_had_it() {
        let mut t = Inodes::new(2);
        t.register(ROOT, b"x", 11);
        // Beneath the mount: x moved to y, a new file took the name x.
        t.register(ROOT, b"y", 11);
        assert_eq!(t.path(11).map(|p| p.to_string()), Some("y".into()));
        t.register(ROOT, b"x", 12);
        assert_eq!(t.path(12).map(|p| p.to_string()), Some("x".into()));
        assert_eq!(t.path(11).map(|p| p.to_string()), Some("y".into()));
        assert_eq!(t.at(&RelPath::new("x").expect("path")), Some(12));
        assert_eq!(t.at(&RelPath::new("y").expect("path")), Some(11));
        // A rename over a known name takes it too; forgetting a node drops its names.
        t.rename(11, ROOT, b"y", ROOT, b"x");
        assert_eq!(t.at(&RelPath::new("x").expect("path")), Some(11));
        assert!(t.nameless(12));
        t.forget(11, 2);
        assert_eq!(t.at(&RelPath::new("x").expect("path")), None);
    }

    /// A node with one name holds exactly one slot for it (a name list grown by `insert` would
    /// reserve four: 128 B more for every inode the kernel knows).
    #[test]
    fn one_name_takes_one_slot() {
        let mut t = Inodes::new(2);
        t.register(ROOT, b"d", 10);
        t.register(10, b"f", 11);
        t.rename(11, 10, b"f", ROOT, b"g");
        for id in [10, 11] {
            let node = t.nodes.get(&id).expect("node");
            assert_eq!((node.names.len(), node.names.capacity()), (1, 1));
        }
        t.register(ROOT, b"hard", 11);
        assert_eq!(t.path(11).map(|p| p.to_string()), Some("hard".into()));
        t.unlink(ROOT, b"hard", 11);
        assert_eq!(t.path(11).map(|p| p.to_string()), Some("g".into()));
    }

    #[test]
    fn at_walks_names_from_the_root() {
        let mut t = Inodes::new(2);
        t.register(ROOT, b"d", 10);
        t.register(10, b"f", 11);
        let p = RelPath::new("d/f").expect("path");
        assert_eq!(t.at(&p), Some(11));
        assert_eq!(t.entry_at(&p), (Some(11), Some(10)));
        assert_eq!(t.at(&RelPath::root()), Some(ROOT));
        assert_eq!(t.at(&RelPath::new("d/g").expect("path")), None);
        assert_eq!(
            t.entry_at(&RelPath::new("d/g").expect("path")),
            (None, Some(10))
        );
    }
}
