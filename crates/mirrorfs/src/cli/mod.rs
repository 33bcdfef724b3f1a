//! The commands that wire the pieces together: `mount` (a primary site over a FUSE shell),
//! `conflicts` (list and settle what a reintegration kept twice) and `demo`. Nothing below `cli` depends on it.

pub mod config;
pub mod conflicts;
pub mod demo;
pub mod gen;
pub mod group;
pub mod helper;
pub mod logs;
pub mod mount;
pub mod resync;
pub mod verify;

pub use crate::sys::hostname;
