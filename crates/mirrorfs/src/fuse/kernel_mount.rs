//! Mounting the FUSE device ourselves, as root, so that the mount shows the way Linux tools
//! expect: type `fuse.mirrorfs` and the backing directory as its source in `/proc/mounts`
//! (fuser's own mount always passes the type `fuse`). The FUSE session is then run on the
//! device with `fuser::Session::from_fd`. Without the right to mount (not root), the caller
//! falls back to fuser's mount through `fusermount3`.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The file system type the kernel records: `fuse.` and the subtype.
pub const FSTYPE: &str = "fuse.mirrorfs";

/// What the mount options ask of the kernel: mount flags and the FUSE driver's own options.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KernelOptions {
    pub flags: libc::c_ulong,
    /// FUSE driver options (`allow_other`, `default_permissions`, `max_read=N`), comma separated.
    pub data: Vec<String>,
}

/// Sorts the `-o` options into mount flags and FUSE driver options, the way `mount.fuse` and
/// libfuse do (`nodev` and `nosuid` unless `dev`/`suid` are given). An option neither knows
/// is an error that names it.
pub fn kernel_options(opts: &[String]) -> Result<KernelOptions, String> {
    let mut k = KernelOptions::default();
    let (mut dev, mut suid) = (false, false);
    for o in opts {
        let flag = match o.as_str() {
            "ro" => libc::MS_RDONLY,
            "rw" | "exec" | "atime" | "async" | "auto_cache" => 0,
            "dev" => {
                dev = true;
                0
            }
            "suid" => {
                suid = true;
                0
            }
            "nodev" => libc::MS_NODEV,
            "nosuid" => libc::MS_NOSUID,
            "noexec" => libc::MS_NOEXEC,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "relatime" => libc::MS_RELATIME,
            "strictatime" => libc::MS_STRICTATIME,
            "lazytime" => libc::MS_LAZYTIME,
            "sync" => libc::MS_SYNCHRONOUS,
            "dirsync" => libc::MS_DIRSYNC,
            "allow_other" | "default_permissions" => {
                k.data.push(o.clone());
                0
            }
            // libfuse's own: the session's access rule, enforced by fuser, not the kernel.
            "allow_root" => 0,
            other if other.starts_with("max_read=") => {
                k.data.push(o.clone());
                0
            }
            other => {
                return Err(format!(
                    "unknown mount option `{other}` (mount flags: ro, rw, nodev, nosuid, noexec, noatime, relatime, sync, dirsync...; FUSE options: allow_other, allow_root, default_permissions, max_read=N)"
                ))
            }
        };
        k.flags |= flag;
    }
    if !dev {
        k.flags |= libc::MS_NODEV;
    }
    if !suid {
        k.flags |= libc::MS_NOSUID;
    }
    k.data.sort();
    k.data.dedup();
    Ok(k)
}

/// Opens /dev/fuse and mounts it on `mountpoint` as [`FSTYPE`] with `source` as the mount's
/// source. `Ok(None)` when this process may not mount (not root: EPERM), for the caller to use
/// fusermount instead.
pub fn mount(mountpoint: &Path, source: &Path, k: &KernelOptions) -> io::Result<Option<OwnedFd>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let root_mode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open /dev/fuse ({e}); load the module: modprobe fuse"),
            )
        })?;
    let fd: OwnedFd = dev.into();
    use std::os::fd::AsRawFd;
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={:o},user_id={uid},group_id={gid}",
        fd.as_raw_fd(),
        root_mode
    );
    for d in &k.data {
        data.push(',');
        data.push_str(d);
    }
    let c = |b: &[u8]| CString::new(b).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let src = c(source.as_os_str().as_bytes())?;
    let target = c(mountpoint.as_os_str().as_bytes())?;
    let fstype = c(FSTYPE.as_bytes())?;
    let data = c(data.as_bytes())?;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            k.flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(fd))
}

/// The FUSE readahead window asked for in `init` (`max_readahead`), and the largest READ the
/// kernel sends (`max_pages` follows it and `max_write`). The kernel offers at INIT no more than
/// the mount's `read_ahead_kb`, which starts at the system default of 128 KiB, and keeps the
/// smaller of the two: see [`raise_readahead`].
pub const READAHEAD_BYTES: u32 = 1 << 20;

/// Raises a running FUSE mount's readahead window (`/sys/class/bdi/MAJ:MIN/read_ahead_kb`) to
/// [`READAHEAD_BYTES`]. Only after INIT was answered: the kernel sets the window to the smaller
/// of its own and the reply's `max_readahead`, itself at most the window offered, 128 KiB
/// (Linux `fs/fuse/inode.c`, `fuse_send_init`, `process_init_reply`). Left at 128 KiB, every
/// READ is 128 KiB whatever `max_pages` allows: a cold sequential read then costs a request,
/// a `pread` and a reply per 128 KiB (`docs/benchmarks.md`, "Cold reads"). The `stat` of the
/// mountpoint waits for INIT. Needs root (sysfs); the caller logs a failure and goes on.
pub fn raise_readahead(mountpoint: &Path) -> io::Result<()> {
    let dev = std::fs::metadata(mountpoint)?.dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    std::fs::write(&knob, format!("{}", READAHEAD_BYTES / 1024))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot write {knob}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Vec<String> {
        s.split(',').map(String::from).collect()
    }

    #[test]
    fn defaults_to_nodev_nosuid() {
        let k = kernel_options(&opts("allow_other,default_permissions,allow_other"))
            .expect("valid options");
        assert_eq!(k.flags, libc::MS_NODEV | libc::MS_NOSUID);
        assert_eq!(k.data, vec!["allow_other", "default_permissions"]);
    }

    #[test]
    fn flags_and_dev_suid() {
        let k = kernel_options(&opts("ro,dev,suid,noatime")).expect("valid options");
        assert_eq!(k.flags, libc::MS_RDONLY | libc::MS_NOATIME);
    }

    #[test]
    fn unknown_option_is_named() {
        let e = kernel_options(&opts("ro,bogus")).expect_err("an unknown option");
        assert!(e.contains("`bogus`"), "{e}");
    }
}
