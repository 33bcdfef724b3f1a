//! A per-record timing trace for finding where a record's lag goes (issue 8): with
//! `MIRRORFS_TRACE=PREFIX` in its environment, each mirrorfs process appends one line per event
//! to `PREFIX.PID` — `T_US EVENT ARGS`, `T_US` the monotonic clock in microseconds (the same
//! clock in every process of the machine, so a primary's and its daemon's lines interleave).
//! Off (no variable, or the file cannot be created), every call is one relaxed load.
//!
//! Events (`scripts/trace-summary.py` reads them):
//! - `append FIRST LAST` — a primary journaled records FIRST..=LAST;
//! - `recv FIRST LAST` — a daemon stored a received batch FIRST..=LAST in its journal;
//! - `fdatasync_start UPTO` / `durable UPTO` — a journal flush began / made records ≤ UPTO durable
//!   (**F2**);
//! - `applied SEQ` — a mirror worker applied record SEQ;
//! - `ack RECEIVED DURABLE APPLIED CHECKPOINT` — a daemon sent an ack with these positions;
//! - `ckpt_start syncfs` / `ckpt_end syncfs` — a checkpoint's tree sync (**B1**) on the
//!   checkpoint thread;
//! - `barrier_sync_start` / `barrier_sync_end` — a tree sync on the applying thread.
//!
//! Each line is one `write(2)` on a file opened with `O_APPEND`: lines from several threads
//! never interleave, and nothing is lost when the process is killed. The file is not bounded:
//! it is for a measuring run, never for production.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::OnceLock;

static FILE: OnceLock<Option<File>> = OnceLock::new();

fn file() -> Option<&'static File> {
    FILE.get_or_init(|| {
        let prefix = std::env::var_os("MIRRORFS_TRACE")?;
        let mut path = prefix;
        path.push(format!(".{}", std::process::id()));
        OpenOptions::new().create(true).append(true).open(path).ok()
    })
    .as_ref()
}

fn now_us() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64) * 1_000_000 + (t.tv_nsec as u64) / 1_000
}

/// Appends `T_US EVENT ARGS` if tracing is on. A failed write is ignored (a trace is best
/// effort).
pub fn event(what: &str, args: std::fmt::Arguments<'_>) {
    if let Some(mut f) = file() {
        let line = format!("{} {what} {args}\n", now_us());
        let _ = f.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn off_without_the_variable() {
        // The test harness does not set MIRRORFS_TRACE; an event is then a no-op.
        if std::env::var_os("MIRRORFS_TRACE").is_none() {
            assert!(super::file().is_none());
            super::event("applied", format_args!("{}", 1));
        }
    }
}
