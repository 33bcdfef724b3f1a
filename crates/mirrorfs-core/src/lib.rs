//! mirrorfs-core: the I/O-free heart of mirrorfs.
//!
//! ```text
//!  FUSE shell ─▶ volume (order lock) ─▶ journal ─▶ applier(s) ─▶ mirror tree(s)
//!                                          ▲  (this crate: op model, codec, journal, applier)
//! ```
//! Everything here is driven through narrow traits ([`journal::storage::SegmentStore`],
//! [`tree::Tree`]) so the simulation can inject crashes and faults deterministically.

pub mod applier;
pub mod civil;
pub mod codec;
pub mod datagram;
pub mod fec;
pub mod feed;
pub mod flush;
pub mod group;
pub mod history;
pub mod journal;
pub mod lease;
pub mod link;
pub mod op;
pub mod pair;
pub mod path;
pub mod quorum;
pub mod reconcile;
pub mod reintegrate;
pub mod reuse;
pub mod sequencer;
pub mod session;
pub mod sim;
pub mod slot;
pub mod stream;
pub mod token;
pub mod track;
pub mod tree;
pub mod udp;
pub mod verify;
pub mod wire;
pub mod worker;
