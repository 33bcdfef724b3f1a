//! The write fence of a primary mounted with `--witness`: the shell of `core::lease::LeaseKeeper`
//! that `Volume::mutate` and `Volume::record` consult under the order lock, so that no change
//! reaches the backing tree or the journal while the site holds no valid lease (`EROFS`). The
//! thread that talks to the witness (`net::witness::keep_lease`) feeds the same keeper.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use mirrorfs_core::lease::{Fenced, LeaseKeeper, Request};

use crate::site::volume::lock;

pub struct Fence {
    keeper: Mutex<LeaseKeeper>,
    /// The keeper's clock: milliseconds since this instant (monotonic).
    epoch: Instant,
    /// The wall clock at `epoch` (ms since the Unix epoch), to show `since` to people.
    epoch_unix_ms: i64,
    /// The witness's address, for messages.
    pub witness: String,
    /// Writable at the last check (to log each change once).
    writable: AtomicBool,
}

impl Fence {
    pub fn new(request: Request, witness: String) -> Fence {
        let epoch = Instant::now();
        Fence {
            keeper: Mutex::new(LeaseKeeper::new(0, request)),
            epoch,
            epoch_unix_ms: crate::site::status::now_ms(),
            witness,
            writable: AtomicBool::new(false),
        }
    }

    /// The keeper's clock now.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Runs `f` on the keeper at the current time (never across network I/O).
    pub fn with_keeper<R>(&self, f: impl FnOnce(&mut LeaseKeeper, u64) -> R) -> R {
        let mut k = lock(&self.keeper);
        let now = self.now_ms();
        f(&mut k, now)
    }

    /// Whether a change may be made now. Each change between writable and read-only is logged
    /// here, by whoever notices it first (a change, the status writer every 250 ms, or the lease
    /// thread), so the log says when it happened even while the lease thread waits on the
    /// network.
    pub fn check(&self) -> Result<(), Fenced> {
        let r = self.with_keeper(|k, now| k.writable(now));
        let now_writable = r.is_ok();
        if self.writable.swap(now_writable, Ordering::AcqRel) != now_writable {
            match &r {
                Ok(()) => tracing::info!(
                    "write lease granted by the witness {}: writable",
                    self.witness
                ),
                Err(f) => tracing::warn!(
                    "read-only: {}; changes fail with EROFS until a renewal is granted",
                    self.describe(f)
                ),
            }
        }
        r
    }

    /// `status`'s line while writes are refused: `None` while writable.
    pub fn read_only(&self) -> Option<String> {
        self.check().err().map(|f| self.describe(&f))
    }

    /// "no lease from the witness (REASON) since TIME".
    pub fn describe(&self, f: &Fenced) -> String {
        let since = self.epoch_unix_ms + f.since as i64;
        format!(
            "no lease from the witness {} ({}) since {}",
            self.witness,
            f.reason,
            utc_text(since)
        )
    }
}

/// A site's name in lease requests: this machine and the directory (the mount of the promoted
/// copy names itself the same, so it renews the lease its promotion took).
pub fn site_name(backing: &Path) -> String {
    let mut s = format!("{}:{}", crate::sys::hostname(), backing.display());
    if s.len() > mirrorfs_core::lease::SITE_NAME_MAX {
        let mut at = mirrorfs_core::lease::SITE_NAME_MAX;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a Unix time in ms.
pub fn utc_text(unix_ms: i64) -> String {
    let (y, m, d, h, mi, s) = mirrorfs_core::civil::utc_parts(unix_ms.div_euclid(1000));
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_text_names_the_civil_time() {
        assert_eq!(super::utc_text(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(
            super::utc_text(1_796_400_000_000),
            "2026-12-04 16:00:00 UTC"
        );
    }
}
