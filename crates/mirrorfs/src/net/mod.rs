//! The transport to a peer site: machine identities and pinned mutual TLS (`identity`, `conn`),
//! the primary's side of a network mirror (`remote`, and `udp`, its UDP data path), the mirror daemon (`serve`, bounded by
//! `gate`), and the witness that grants write leases (`witness`).

pub mod conn;
pub mod gate;
pub mod identity;
pub mod peer;
pub mod reintegrate;
pub mod remote;
pub mod serve;
pub mod udp;
pub mod witness;
