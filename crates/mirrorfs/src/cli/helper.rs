//! The mount helper: `mount -t fuse.mirrorfs SOURCE MOUNTPOINT -o mirror=M,ack=durable` and the
//! matching `/etc/fstab` line. mount(8) runs `/sbin/mount.fuse.mirrorfs` (or `mount.mirrorfs`
//! for `-t mirrorfs`; `mount.fuse` runs `mirrorfs` itself with the same arguments) as
//! `SOURCE MOUNTPOINT [-n] [-s] [-f] [-v] [-o OPTIONS]`. This module turns the options into the
//! `mount` subcommand's flags (`mirror=M` → `--mirror M`, `journal_max_mib=N` or
//! `journal-max-mib=N` → `--journal-max-mib N`, a flag such as `compress` → `--compress`, its
//! negation `no_compress` → `--no-compress`),
//! keeps the FUSE and mount-flag options (`ro`, `noatime`, `allow_other`...) for `-o`, drops
//! the ones that only mean something to mount(8) and systemd (`defaults`, `nofail`, `_netdev`,
//! `noauto`, `user`, `comment=`, `x-systemd.*`...), as `mount.fuse` does, and refuses any other
//! with an error that names it.
//!
//! A mount helper must return once the file system is mounted, leaving a daemon behind: the
//! helper starts `mirrorfs mount ...` as a new session (setsid) and waits on a pipe
//! (`readiness::READY_FD_ENV`) for the byte it writes once mounted; if the daemon exits
//! first, its error is on standard error and the helper exits with 32 (mount(8)'s "mount
//! failure"). `umount MOUNTPOINT` then ends the daemon, which drains its mirrors and exits.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::readiness::{READY_BYTE, READY_FD_ENV};

/// The names under which the binary acts as a mount helper (symlinks or hard links to it).
pub const HELPER_NAMES: [&str; 2] = ["mount.fuse.mirrorfs", "mount.mirrorfs"];

/// mount(8)'s exit codes.
const EX_USAGE: i32 = 1;
const EX_FAIL: i32 = 32;

/// Options that mean something only to mount(8), systemd or `mount.fuse`: dropped.
fn ignored(o: &str) -> bool {
    matches!(
        o,
        "defaults"
            | "nofail"
            | "_netdev"
            | "auto"
            | "noauto"
            | "user"
            | "nouser"
            | "users"
            | "owner"
            | "group"
            | "nobootwait"
            | "fsname"
            | "subtype"
    ) || o.starts_with("x-")
        || o.starts_with("comment=")
        || o.starts_with("fsname=")
        || o.starts_with("subtype=")
        || o.starts_with("helper=")
}

/// Whether this process was started as a mount helper: under one of [`HELPER_NAMES`], or as
/// `mirrorfs SOURCE /MOUNTPOINT ...` (how `mount.fuse` runs the program of a `fuse.mirrorfs`
/// mount), where the first argument is not a subcommand.
pub fn invoked_as_helper(args: &[OsString], cmd: &clap::Command) -> bool {
    let name = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if HELPER_NAMES.contains(&name) {
        return true;
    }
    match (args.get(1).and_then(|a| a.to_str()), args.get(2)) {
        (Some(first), Some(second)) => {
            first.contains('/')
                && cmd.find_subcommand(first).is_none()
                && first != "help"
                && Path::new(second).is_absolute()
        }
        _ => false,
    }
}

/// The parsed helper command line.
#[derive(Debug, PartialEq, Eq)]
pub struct HelperCall {
    /// The arguments of `mirrorfs` that do the mount: `mount SOURCE MOUNTPOINT --flag ...`.
    pub mount_args: Vec<OsString>,
    /// `-f`: check everything, mount nothing (mount(8)'s fake mode).
    pub fake: bool,
}

/// Parses `SOURCE MOUNTPOINT [-o OPTS]... [-n -s -f -v] [-t TYPE]` against the `mount`
/// subcommand's arguments in `cmd` (the whole CLI).
pub fn parse(args: &[OsString], cmd: &clap::Command) -> Result<HelperCall, String> {
    let mount = cmd
        .find_subcommand("mount")
        .ok_or("this build has no `mount` subcommand")?;
    let mut positional: Vec<OsString> = Vec::new();
    let mut opts: Vec<String> = Vec::new();
    let mut fake = false;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        match s.as_ref() {
            "-o" => {
                let v = it.next().ok_or("-o needs a list of options")?;
                opts.push(v.to_string_lossy().into_owned());
            }
            "-t" => {
                it.next().ok_or("-t needs a type")?;
            }
            "-f" => fake = true,
            "-n" | "-s" | "-v" | "-r" | "-w" => {
                if s == "-r" {
                    opts.push("ro".into());
                }
            }
            "-h" | "--help" => return Err(usage()),
            o if o.starts_with("-o") => opts.push(o[2..].to_string()),
            o if o.starts_with('-') => return Err(format!("unknown argument `{o}`\n{}", usage())),
            _ => positional.push(a.clone()),
        }
    }
    let [source, mountpoint] = <[OsString; 2]>::try_from(positional).map_err(|p| {
        format!(
            "expected SOURCE and MOUNTPOINT, got {} argument(s)\n{}",
            p.len(),
            usage()
        )
    })?;
    let mut out: Vec<OsString> = vec!["mount".into(), source, mountpoint];
    let mut fuse_opts: Vec<String> = Vec::new();
    let mut given: Vec<String> = Vec::new();
    for o in opts.iter().flat_map(|o| o.split(',')).map(str::trim) {
        if o.is_empty() || ignored(o) {
            continue;
        }
        let (key, value) = match o.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (o, None),
        };
        let long = key.replace('_', "-");
        let arg = mount.get_arguments().find(|a| {
            a.get_long() == Some(long.as_str()) && !matches!(long.as_str(), "help" | "version")
        });
        let Some(arg) = arg else {
            // Not a mirrorfs option: a mount flag or a FUSE option, or a mistake.
            crate::fuse::kernel_mount::kernel_options(&[o.to_string()]).map_err(|_| {
                format!(
                    "unknown mount option `{o}`: mirrorfs takes {}, the FUSE and mount-flag options (ro, noatime, allow_other, default_permissions...), and ignores defaults, nofail, _netdev, noauto, user, comment= and x-*",
                    option_names(mount)
                )
            })?;
            fuse_opts.push(o.to_string());
            continue;
        };
        given.push(arg.get_id().to_string());
        out.push(format!("--{long}").into());
        if arg.get_action().takes_values() {
            let v = value.filter(|v| !v.is_empty()).ok_or_else(|| {
                format!("mount option `{key}` needs a value: {key}=VALUE (see `mirrorfs mount --help`, --{long})")
            })?;
            out.push(v.into());
        } else if let Some(v) = value {
            return Err(format!(
                "mount option `{key}` is a switch and takes no value (got `{key}={v}`): write `{key}` alone"
            ));
        }
    }
    // `--mirror` is required unless `--peer` names a writable peer (clap's `required_unless`,
    // which `is_required_set` does not report).
    let has = |id: &str| given.iter().any(|g| g == id);
    let mirror_missing = |id: &str| id == "mirrors" && !has("mirrors") && !has("peer");
    for a in mount.get_arguments() {
        let id = a.get_id().to_string();
        if (a.is_required_set() || mirror_missing(&id)) && a.get_long().is_some() && !has(&id) {
            let long = a.get_long().unwrap_or_default();
            return Err(format!(
                "missing mount option `{}=...`: add -o {}=VALUE (for example -o mirror=/backup/data; repeat it for several mirrors)",
                long.replace('-', "_"),
                long.replace('-', "_")
            ));
        }
    }
    if !fuse_opts.is_empty() {
        out.push("-o".into());
        out.push(fuse_opts.join(",").into());
    }
    Ok(HelperCall {
        mount_args: out,
        fake,
    })
}

/// The options the helper maps onto `mirrorfs mount` flags, for error messages.
fn option_names(mount: &clap::Command) -> String {
    let names: Vec<String> = mount
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !matches!(*l, "help" | "version"))
        .map(|l| {
            let n = l.replace('-', "_");
            if l == "mirror" {
                format!("{n}= (repeat for several)")
            } else {
                n
            }
        })
        .collect();
    names.join(", ")
}

fn usage() -> String {
    "usage: mount.fuse.mirrorfs BACKING MOUNTPOINT -o mirror=DIR[,mirror=DIR...][,ack=MODE][,OPTIONS]\n\
     (or: mount -t fuse.mirrorfs BACKING MOUNTPOINT -o mirror=DIR; see `mirrorfs mount --help` for the options, written key=value)"
        .into()
}

/// Runs the helper: parses, then starts the daemon and waits until it is mounted. Returns the
/// exit code.
pub fn run(args: &[OsString], cmd: &clap::Command) -> i32 {
    let call = match parse(args, cmd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mount.fuse.mirrorfs: {e}");
            return EX_USAGE;
        }
    };
    if call.fake {
        return 0;
    }
    match start_daemon(&call.mount_args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mount.fuse.mirrorfs: {e}");
            EX_FAIL
        }
    }
}

/// Starts `mirrorfs mount ...` in a new session with the write end of a pipe, and waits for
/// its readiness byte (0) or its exit (32).
fn start_daemon(mount_args: &[OsString]) -> std::io::Result<i32> {
    let exe = std::env::current_exe()?;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: both descriptors were just created and are owned here alone.
    let (mut r, w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let wfd = fds[1];
    let mut c = Command::new(exe);
    c.args(mount_args)
        .env(READY_FD_ENV, wfd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: between fork and exec, only async-signal-safe calls: setsid and fcntl (letting
    // the pipe's write end, and only it, be inherited across exec).
    unsafe {
        c.pre_exec(move || {
            libc::setsid();
            if libc::fcntl(wfd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = c.spawn()?;
    drop(w);
    let mut b = [0u8; 1];
    let n = loop {
        match r.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    if n == 1 && b[0] == READY_BYTE {
        return Ok(0);
    }
    let status = child.wait()?;
    eprintln!("mount.fuse.mirrorfs: the mount failed ({status}); see the messages above");
    Ok(EX_FAIL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn cli() -> clap::Command {
        clap::Command::new("mirrorfs").subcommand(
            clap::Command::new("mount")
                .arg(Arg::new("backing"))
                .arg(Arg::new("mountpoint"))
                .arg(
                    Arg::new("mirrors")
                        .long("mirror")
                        .required(true)
                        .action(ArgAction::Append),
                )
                .arg(Arg::new("ack").long("ack"))
                .arg(Arg::new("journal_max_mib").long("journal-max-mib"))
                .arg(
                    Arg::new("compress")
                        .long("compress")
                        .action(ArgAction::SetTrue),
                )
                .arg(Arg::new("options").short('o').action(ArgAction::Append)),
        )
    }

    fn call(args: &[&str]) -> Result<Vec<String>, String> {
        let a: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse(&a, &cli()).map(|c| {
            c.mount_args
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect()
        })
    }

    /// A switch is turned off with its `no_` form (over a config file's `true`), which the
    /// real `mount` reads as the switch off.
    #[test]
    fn a_switch_is_turned_off_with_its_no_form() {
        use clap::CommandFactory as _;
        let a: Vec<OsString> = [
            "mount.fuse.mirrorfs",
            "/srv/data",
            "/mnt/data",
            "-o",
            "mirror=/b,compress,no_compress,no_fsync_groups",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let call = parse(&a, &crate::Cli::command()).expect("valid options");
        let line: Vec<String> = call
            .mount_args
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert!(line.contains(&"--no-compress".to_string()), "{line:?}");
        assert!(line.contains(&"--no-fsync-groups".to_string()), "{line:?}");
        let m = crate::Cli::command()
            .try_get_matches_from(
                std::iter::once(OsString::from("mirrorfs")).chain(call.mount_args),
            )
            .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        let (_, mount) = m.subcommand().expect("the mount subcommand");
        assert!(!mount.get_flag("compress"), "the later no_compress wins");
        assert!(!mount.get_flag("fsync_groups"));
    }

    #[test]
    fn maps_options_onto_flags() {
        let got = call(&[
            "mount.fuse.mirrorfs",
            "/srv/data",
            "/mnt/data",
            "-o",
            "rw,mirror=/b1,nofail,_netdev,x-systemd.automount,defaults,journal_max_mib=256",
            "-o",
            "mirror=/b2,ack=durable,compress,noatime,allow_other",
            "-n",
        ])
        .expect("valid");
        assert_eq!(
            got,
            [
                "mount",
                "/srv/data",
                "/mnt/data",
                "--mirror",
                "/b1",
                "--journal-max-mib",
                "256",
                "--mirror",
                "/b2",
                "--ack",
                "durable",
                "--compress",
                "-o",
                "rw,noatime,allow_other"
            ]
        );
    }

    #[test]
    fn unknown_option_is_named() {
        let e = call(&["m", "/a", "/b", "-o", "mirror=/c,frobnicate=3"]).expect_err("unknown");
        assert!(e.contains("`frobnicate=3`"), "{e}");
    }

    #[test]
    fn missing_mirror_and_value() {
        let e = call(&["m", "/a", "/b", "-o", "ack=sync"]).expect_err("no mirror");
        assert!(e.contains("mirror="), "{e}");
        let e = call(&["m", "/a", "/b", "-o", "mirror=/c,ack"]).expect_err("no value");
        assert!(e.contains("needs a value"), "{e}");
        let e = call(&["m", "/a", "/b", "-o", "mirror=/c,compress=1"]).expect_err("a switch");
        assert!(e.contains("switch"), "{e}");
    }

    #[test]
    fn recognises_helper_invocations() {
        let c = cli();
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(invoked_as_helper(
            &os(&["/sbin/mount.fuse.mirrorfs", "/a", "/b"]),
            &c
        ));
        assert!(invoked_as_helper(&os(&["mount.mirrorfs", "/a", "/b"]), &c));
        assert!(invoked_as_helper(
            &os(&["mirrorfs", "/a", "/b", "-o", "x"]),
            &c
        ));
        assert!(!invoked_as_helper(
            &os(&["mirrorfs", "mount", "/a", "/b"]),
            &c
        ));
        assert!(!invoked_as_helper(&os(&["mirrorfs", "status"]), &c));
    }
}
