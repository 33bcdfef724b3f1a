//! `mirrorfs-wan`: a WAN emulator of our own. This kernel has no `netem`, so the impairments a
//! long-distance link adds — one-way delay and jitter, random loss, bursty (Gilbert–Elliott)
//! loss, a rate cap with a bounded queue — are applied by a userspace router between two network
//! namespaces joined by a pair of TUN devices:
//!
//! ```text
//!  namespace A                     this process                     namespace B
//!  10.201.N.1 ── tun ──fd──▶ router: Link A→B (delay, loss, rate) ──fd──▶ tun ── 10.201.N.2
//!             ◀──────────── router: Link B→A ◀───────────────────────
//! ```
//!
//! - `link`: the impairment model of one direction, sans I/O (time given, seeded): what happens
//!   to each packet offered — dropped by the queue, lost on the way, or delivered at a time.
//! - `control`: changes to a running link from another thread, seen with the next packet:
//!   a direction's loss rate, and an instantaneous cut at one side (what already left it is
//!   still delivered).
//! - `router`: the I/O loop that reads packets from each TUN device, asks the link, and writes
//!   them to the other device when due.
//! - `netns`: the two namespaces and their devices, made for one run and removed on drop.
//! - `tun`: opening a TUN device.
//!
//! Traffic never leaves the namespaces the emulator made: their only devices are the TUN pair
//! and their loopback.

pub mod control;
pub mod link;
pub mod netns;
pub mod router;
pub mod tun;

pub use control::{Control, Direction};
pub use link::{Burst, Impairment, Link, Verdict};
pub use netns::{Side, Wan};
