//! Trees on disk: `dirtree::Root`, the one hardened way of reading and changing a tree (backing,
//! mirrors, recovery), and `walk`, the one depth-first walk of a tree.

pub mod dirtree;
pub mod walk;
