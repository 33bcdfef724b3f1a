//! `mirrorfs group begin|end|status MOUNT`: groups of changes that every mirror shows all
//! together or not at all (group-atomic mirroring, `core::group`).
//!
//! The interface is an attribute of the mount's root, `user.mirrorfs.group`, so that any
//! program or script can use it without this binary (`setfattr -n user.mirrorfs.group -v begin
//! MOUNT`); this command is a wrapper that says what went wrong in words. An attribute rather
//! than a control file: it needs no name in the tree (a control file would be seen by every
//! program walking the mount and by mirrors), its permission is the root directory's own, and
//! the kernel passes it straight to the mount.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::sys;

#[derive(clap::Args)]
pub struct GroupArgs {
    #[arg(value_enum)]
    action: GroupAction,
    /// The mountpoint.
    mountpoint: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum GroupAction {
    /// Open a group: changes made from now on reach mirrors' trees only once it ends.
    Begin,
    /// End the group: its changes become visible on mirrors together; returns once they are
    /// as far as the mount's --ack asks.
    End,
    /// Print how many groups are open.
    Status,
}

const NAME: &str = "user.mirrorfs.group";

pub fn group(a: GroupArgs) -> Result<()> {
    // Read first: only the root of a mirrorfs mount answers, so nothing is ever set elsewhere.
    let open = open_groups(&a.mountpoint).map_err(|e| explain(&a.mountpoint, e))?;
    let value: &[u8] = match a.action {
        GroupAction::Status => {
            println!("{open} group(s) open");
            return Ok(());
        }
        GroupAction::Begin => b"begin",
        GroupAction::End => b"end",
    };
    sys::setxattr_path(&a.mountpoint, NAME, value).map_err(|e| explain(&a.mountpoint, e))
}

/// The number of groups open on the mount whose root is `path`.
fn open_groups(path: &Path) -> std::io::Result<String> {
    let mut buf = [0u8; 32];
    let n = sys::getxattr_path(path, NAME, &mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn explain(mnt: &Path, e: std::io::Error) -> anyhow::Error {
    let why = match e.raw_os_error() {
        Some(libc::EINVAL) => "no group is open to end".to_string(),
        Some(libc::EMFILE) => "too many groups are open; end one first".to_string(),
        Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => format!(
            "{} is not the root of a mirrorfs mount (give the mountpoint itself)",
            mnt.display()
        ),
        Some(libc::EROFS) => "the mount is read-only (no write lease)".to_string(),
        _ => e.to_string(),
    };
    anyhow::Error::msg(why).context(format!("mirrorfs group on {}", mnt.display()))
}
