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
                    let r = sys::syncfs(std::os::fd::AsFd::as_fd(&fd))
                        .map_err(|e| tree_err(&RelPath::root(), e));
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
