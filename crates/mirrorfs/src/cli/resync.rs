//! `mirrorfs resync MOUNT --mirror M [--delete-extra]`: brings a mirror of a running mount (a
//! local one, or a network one named `mirror://HOST:PORT`) back in line with the primary
//! through the journal (`mirror::operator`), copying only what differs (a network mirror's
//! daemon sends its block hashes), and waits until the mirror applied it. The interface is the mount root's attribute
//! `user.mirrorfs.resync` (as `user.mirrorfs.group` is for groups): set to `keep-extra PATH` or
//! `delete-extra PATH` to start one; read, it says where each mirror's stands (JSON).

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cli::verify::{target, Target};
use crate::sys;

const NAME: &str = "user.mirrorfs.resync";

/// The longest a resync is waited for.
const WAIT: Duration = Duration::from_secs(24 * 3600);

#[derive(clap::Args)]
pub struct ResyncArgs {
    /// The mountpoint of a running mirrorfs mount.
    mountpoint: PathBuf,
    /// The mirror to resync: a local mirror's directory, or a network mirror's
    /// mirror://HOST:PORT as `mirrorfs status` shows it (its daemon sends the block hashes of
    /// its files, and only the blocks that differ are sent back).
    #[arg(long)]
    mirror: PathBuf,
    /// Also delete what only the mirror has (by default it is kept and reported by `verify`).
    #[arg(long)]
    delete_extra: bool,
}

pub fn resync(a: ResyncArgs) -> Result<()> {
    let t = target(&a.mountpoint)?;
    let m = if a.mirror.as_os_str().as_bytes().starts_with(b"mirror://") {
        a.mirror.clone()
    } else {
        a.mirror
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", a.mirror.display()))?
    };
    resync_and_wait(&t, &m, a.delete_extra)?;
    println!(
        "mirror {}: resynced with {}",
        m.display(),
        t.backing.display()
    );
    Ok(())
}

/// Where `mirror`'s operator resyncs stand: (completed count, running, last error).
fn state_of(root: &Path, mirror: &Path) -> Result<(u64, bool, Option<String>)> {
    let mut buf = vec![0u8; 1 << 16];
    let n = sys::getxattr_path(root, NAME, &mut buf)?;
    let v: serde_json::Value =
        serde_json::from_slice(&buf[..n]).context("the mount's answer is not JSON")?;
    let name = mirror.display().to_string();
    let Some(e) = v
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["mirror"].as_str() == Some(&name))
    else {
        bail!("{name} is not a mirror of this mount (a local mirror's directory, or a network mirror's mirror://HOST:PORT as `mirrorfs status` shows it)");
    };
    Ok((
        e["done"].as_u64().unwrap_or(0),
        e["running"].as_bool().unwrap_or(false),
        e["error"].as_str().map(str::to_string),
    ))
}

/// Asks the mount `t` to resync `mirror` and waits until the mirror applied it.
pub fn resync_and_wait(t: &Target, mirror: &Path, delete_extra: bool) -> Result<()> {
    let root = t.mountpoint.as_path();
    let (done0, _, _) = state_of(root, mirror)
        .with_context(|| format!("cannot ask {} for a resync", t.mountpoint.display()))?;
    let mut value = if delete_extra {
        b"delete-extra ".to_vec()
    } else {
        b"keep-extra ".to_vec()
    };
    value.extend_from_slice(mirror.as_os_str().as_bytes());
    if let Err(e) = sys::setxattr_path(root, NAME, &value) {
        let why = match e.raw_os_error() {
            Some(libc::EBUSY) => {
                "a resync or copy of it is running, or it is not live (see `mirrorfs status`)"
                    .to_string()
            }
            Some(libc::ENOENT) => "it is not a mirror of this mount".to_string(),
            Some(libc::EOPNOTSUPP) => {
                "this mount does not support resync (an older mirrorfs?)".to_string()
            }
            _ => e.to_string(),
        };
        bail!("cannot resync {}: {why}", mirror.display());
    }
    let t0 = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let (done, running, error) = state_of(root, mirror)?;
        if let Some(e) = error {
            bail!("resync of {} failed: {e}", mirror.display());
        }
        if done > done0 && !running {
            return Ok(());
        }
        if t0.elapsed() > WAIT {
            bail!(
                "resync of {} did not finish within {WAIT:?}",
                mirror.display()
            );
        }
    }
}
