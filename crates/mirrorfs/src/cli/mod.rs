//! The commands that wire the pieces together: `mount` (a primary site over a FUSE shell),
//! `conflicts` (list and settle what a reintegration kept twice) and `demo`. Nothing below `cli` depends on it.

pub mod conflicts;
pub mod demo;
pub mod mount;

/// This machine's name, for certificates and the default names of volumes.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "primary".into())
}
