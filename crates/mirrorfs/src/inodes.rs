//! The inode table of the FUSE shell: which names (parent, name) each inode the kernel knows has,
//! so that every operation can be journaled by path. FUSE inode numbers are the backing file
//! system's inode numbers (the backing root is inode 1).

use std::collections::HashMap;

use mirrorfs_core::path::RelPath;

pub const ROOT: u64 = 1;

#[derive(Default)]
struct Node {
    names: Vec<(u64, Vec<u8>)>,
    lookups: u64,
}

#[derive(Default)]
pub struct Inodes {
    nodes: HashMap<u64, Node>,
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
            },
        );
        Inodes {
            nodes,
            root_backing_ino,
        }
    }

    /// Maps a backing inode number to the FUSE one.
    pub fn fuse_ino(&self, backing: u64) -> u64 {
        if backing == self.root_backing_ino {
            ROOT
        } else {
            backing
        }
    }

    /// The path of `ino` (through its first known name).
    pub fn path(&self, ino: u64) -> Option<RelPath> {
        let mut comps: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        // Bounded: a path has at most PATH_MAX/2 components.
        for _ in 0..2048 {
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

    /// Records a lookup of `name` in `parent` that found `ino`.
    pub fn lookup(&mut self, parent: u64, name: &[u8], ino: u64) {
        if ino == ROOT {
            return;
        }
        let node = self.nodes.entry(ino).or_default();
        node.lookups += 1;
        if !node.names.iter().any(|(p, n)| *p == parent && n == name) {
            node.names.push((parent, name.to_vec()));
        }
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
            if node.lookups == 0 {
                self.nodes.remove(&ino);
            }
        }
    }

    /// `name` in `parent` no longer names `ino`.
    pub fn unlink(&mut self, parent: u64, name: &[u8], ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.names.retain(|(p, n)| !(*p == parent && n == name));
        }
    }

    /// The entry `(parent, name)` moved to `(new_parent, new_name)`.
    pub fn rename(&mut self, ino: u64, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8]) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.names.retain(|(p, n)| !(*p == parent && n == name));
            node.names.insert(0, (new_parent, new_name.to_vec()));
        }
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
        t.lookup(ROOT, b"d", 10);
        t.lookup(10, b"f", 11);
        assert_eq!(t.path(11).map(|p| p.to_string()), Some("d/f".into()));
        t.rename(10, ROOT, b"d", ROOT, b"e");
        assert_eq!(t.path(11).map(|p| p.to_string()), Some("e/f".into()));
        t.lookup(ROOT, b"hard", 11);
        t.unlink(10, b"f", 11);
        assert_eq!(t.path(11).map(|p| p.to_string()), Some("hard".into()));
        t.unlink(ROOT, b"hard", 11);
        assert_eq!(t.path(11), None);
        t.forget(11, 2);
        assert_eq!(t.len(), 2);
    }
}
