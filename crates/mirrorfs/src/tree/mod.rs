//! Trees on disk: `dirtree::Root`, the one hardened way of reading and changing a tree (backing,
//! mirrors, recovery), `walk`, the one depth-first walk of a tree, and `scan` with its
//! `hashcache`, what `mirrorfs verify` compares.

pub mod dirtree;
pub mod hashcache;
pub mod scan;
pub mod walk;
