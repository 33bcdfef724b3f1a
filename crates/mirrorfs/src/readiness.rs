//! Telling whoever started this process that it is ready, alive, or stopping: systemd through
//! `sd_notify` (`Type=notify` units: `READY=1` once mounted or listening, `WATCHDOG=1` while the
//! main loop turns when the unit sets `WatchdogSec=`, `STOPPING=1` at the shutdown), and the
//! mount helper (`mount.fuse.mirrorfs`) through the pipe it passes in `MIRRORFS_READY_FD`, so
//! that `mount` returns only once the file system is mounted.
//!
//! Every call here is best effort: a service manager that went away is logged, never fatal.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// The environment variable naming the write end of the mount helper's readiness pipe.
pub const READY_FD_ENV: &str = "MIRRORFS_READY_FD";

/// The byte written on the readiness pipe once the mount is ready.
pub const READY_BYTE: u8 = b'R';

/// The process is ready: tells systemd (`READY=1` with a status line) and the mount helper
/// waiting on its pipe (which then returns, leaving this process as the daemon).
pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::warn!("cannot tell systemd that the service is ready: {e}");
    }
    let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .filter(|fd| *fd > 2)
    else {
        return;
    };
    // SAFETY: the helper passed this descriptor, the pipe's write end, for this process alone;
    // it is taken over once (the variable names no other use) and closed when dropped here.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    if let Err(e) = pipe.write_all(&[READY_BYTE]) {
        tracing::warn!("cannot tell the mount helper that the mount is ready: {e}");
    }
    drop(pipe);
    detach_output();
}

/// Once the helper returned, this process is a daemon: its standard input and output go to
/// /dev/null, and so does standard error unless it is journald's (`JOURNAL_STREAM`), so that a
/// caller reading the helper's output to its end is not held open by the daemon.
fn detach_output() {
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    use std::os::fd::AsRawFd;
    let keep_stderr = std::env::var_os("JOURNAL_STREAM").is_some();
    for fd in [0, 1, 2] {
        if fd == 2 && keep_stderr {
            continue;
        }
        // SAFETY: dup2 onto the standard descriptors of an open /dev/null; no Rust object owns them.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
}

/// The process is stopping (`STOPPING=1`): systemd then waits for it to exit rather than
/// treating the shutdown as a failure.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// While stopping: asks systemd for `by` more before its stop timeout (`TimeoutStopSec=`) ends
/// the process; sent by the unmount's wait for a mirror that is still catching up
/// (`mirror::drain`). Does nothing outside systemd.
pub fn extend_stop(by: Duration) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    let _ = sd_notify::notify(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// Pings systemd's watchdog from a main loop, at half the unit's `WatchdogSec=`; does nothing
/// when the unit sets none. A main loop that stops turning (a hang) stops the pings and systemd
/// restarts the unit.
pub struct Watchdog {
    every: Option<Duration>,
    last: Instant,
}

impl Watchdog {
    pub fn new() -> Watchdog {
        let every = sd_notify::watchdog_enabled().map(|d| d / 2);
        if let Some(d) = every {
            tracing::info!("pinging systemd's watchdog every {} ms", d.as_millis());
        }
        Watchdog {
            every,
            last: Instant::now(),
        }
    }

    /// Called at each turn of the main loop; pings when half the watchdog period has passed.
    pub fn tick(&mut self) {
        let Some(every) = self.every else {
            return;
        };
        if self.last.elapsed() >= every {
            self.last = Instant::now();
            if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
                tracing::warn!("cannot ping systemd's watchdog: {e}");
            }
        }
    }
}
