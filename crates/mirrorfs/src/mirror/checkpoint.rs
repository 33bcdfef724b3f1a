//! A mirror's checkpoint thread: runs the `syncfs` of a checkpoint off the applying thread
//! (the core's [`Worker`](mirrorfs_core::worker::Worker) hands it out as `Turn::SyncStart`), so
//! the worker goes on applying while the mirror's disk flushes. At most one sync is in flight
//! (the worker starts the next only after [`Checkpointer::take_result`] gave it the end of the
//! last), so the request queue holds one descriptor at most.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use mirrorfs_core::path::RelPath;
use mirrorfs_core::tree::TreeError;

use crate::sys;
use crate::tree::dirtree::tree_err;

/// The checkpoint thread of one mirror worker; dropping it waits for a sync in flight.
pub struct Checkpointer {
    requests: Option<SyncSender<OwnedFd>>,
    results: Receiver<Result<(), TreeError>>,
    /// A result is waiting in `results` (read under the volume's progress lock by the worker
    /// before it sleeps, so an end that comes meanwhile wakes it).
    ended: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread; `wake` is called after each sync ends (wakes the worker if it sleeps).
    pub fn spawn(name: &str, wake: impl Fn() + Send + 'static) -> std::io::Result<Checkpointer> {
        let (requests, inbox) = mpsc::sync_channel::<OwnedFd>(1);
        let (outbox, results) = mpsc::channel();
        let ended = Arc::new(AtomicBool::new(false));
        let flag = ended.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ckpt-{name}"))
            .spawn(move || {
                for fd in inbox {
                    crate::trace::event("ckpt_start", format_args!("syncfs"));
                    let r = sys::syncfs(std::os::fd::AsFd::as_fd(&fd))
                        .map_err(|e| tree_err(&RelPath::root(), e));
                    crate::trace::event("ckpt_end", format_args!("syncfs"));
                    drop(fd);
                    if outbox.send(r).is_err() {
                        return;
                    }
                    flag.store(true, Ordering::Release);
                    wake();
                }
            })?;
        Ok(Checkpointer {
            requests: Some(requests),
            results,
            ended,
            thread: Some(thread),
        })
    }

    /// Starts a sync of the file system that holds `root` (a descriptor of the mirror's root
    /// of its own). Fails only if the thread is gone.
    pub fn start(&self, root: OwnedFd) -> Result<(), TreeError> {
        let gone = || TreeError::Other {
            path: String::new(),
            errno: libc::EIO,
            msg: "the checkpoint thread is gone".into(),
        };
        match &self.requests {
            Some(tx) => tx.try_send(root).map_err(|_| gone()),
            None => Err(gone()),
        }
    }

    /// True if a sync ended and its result was not taken yet.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// The result of the sync that ended, if one did.
    pub fn take_result(&self) -> Option<Result<(), TreeError>> {
        if !self.ended.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.results.try_recv().ok()
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    #[test]
    fn a_sync_runs_on_the_thread_and_its_end_is_reported_once_and_wakes_the_worker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        let c = Checkpointer::spawn("t", move || {
            w.fetch_add(1, Ordering::SeqCst);
        })
        .expect("spawn");
        assert!(c.take_result().is_none(), "nothing started, nothing ended");
        let fd = std::fs::File::open(dir.path()).expect("open").into();
        c.start(fd).expect("start");
        let t0 = Instant::now();
        let r = loop {
            if let Some(r) = c.take_result() {
                break r;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the sync never ended"
            );
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(r.is_ok(), "{r:?}");
        // The wake-up follows the flag.
        while woken.load(Ordering::SeqCst) == 0 && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        assert!(!c.ended());
        assert!(c.take_result().is_none(), "one end, reported once");
    }
}
