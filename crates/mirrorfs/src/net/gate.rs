//! The mirror daemon's door: how many connections it holds, and who goes when it is full.
//!
//! ```text
//!  accept ─▶ Gate::admit ──▶ pending (unauthenticated, ≤ MAX_PENDING, oldest evicted first)
//!                               │ TLS handshake (≤ CONNECT_TIMEOUT), Gate::authenticated
//!                               ▼
//!                            session (counted in ≤ MAX_CONNECTIONS threads)
//! ```
//!
//! Every connection costs one thread from accept to close. Before TLS has authenticated the
//! peer, a connection is *pending*: at most [`MAX_PENDING`] are, and a new one evicts the
//! oldest pending one (its socket is shut down, so its handshake fails at once). Idle or garbage
//! connections therefore cannot keep a legitimate primary out: its handshake takes milliseconds
//! and the connections that would push it out are the ones opened after it. The handshake has a
//! deadline, so an idle connection leaves by itself too. At most [`MAX_CONNECTIONS`] threads
//! exist; a connection beyond that is closed at once. A thread that cannot be started is
//! logged and its connection closed; the daemon never exits for it.
//!
//! At a stop, [`Gate::close_all`] shuts down the socket of every connection still open, so each
//! thread's next read or write fails and the thread ends; [`Gate::wait_idle`] waits for them,
//! with a deadline.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::site::volume::lock;

/// Unauthenticated connections held at once (each one a thread in its TLS handshake).
pub const MAX_PENDING: usize = 16;
/// Connection threads at once, authenticated or not.
pub const MAX_CONNECTIONS: usize = 32;

#[derive(Default)]
pub struct Gate {
    /// (id, a handle on the socket to shut it down) of the unauthenticated connections, oldest
    /// first.
    pending: Mutex<VecDeque<(u64, TcpStream)>>,
    /// (id, a handle on the socket) of every connection let in whose thread has not ended
    /// (at most `MAX_CONNECTIONS`), for [`Gate::close_all`].
    open: Mutex<Vec<(u64, TcpStream)>>,
    threads: AtomicUsize,
    next_id: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

/// A connection let in: its thread's place, given back on drop.
pub struct Admitted {
    gate: Arc<Gate>,
    id: u64,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }

    /// Lets `sock` in, evicting the oldest unauthenticated connection if `MAX_PENDING` are
    /// waiting, or refuses it (`None`, the caller drops it) when `MAX_CONNECTIONS` threads run.
    pub fn admit(self: &Arc<Self>, sock: &TcpStream) -> Option<Admitted> {
        let threads = self.threads.fetch_add(1, Ordering::AcqRel);
        if threads >= MAX_CONNECTIONS {
            self.threads.fetch_sub(1, Ordering::AcqRel);
            let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            self.warn(&format!(
                "{MAX_CONNECTIONS} connections are open: refusing a new one ({n} refused so far)"
            ));
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = sock.try_clone().ok();
        if let Ok(h) = sock.try_clone() {
            lock(&self.open).push((id, h));
        }
        let mut pending = lock(&self.pending);
        while pending.len() >= MAX_PENDING {
            let Some((_, old)) = pending.pop_front() else {
                break;
            };
            let _ = old.shutdown(Shutdown::Both);
            let n = self.evicted.fetch_add(1, Ordering::Relaxed) + 1;
            drop(pending);
            self.warn(&format!(
                "{MAX_PENDING} unauthenticated connections are waiting: closed the oldest to make room ({n} so far)"
            ));
            pending = lock(&self.pending);
        }
        if let Some(h) = handle {
            pending.push_back((id, h));
        }
        Some(Admitted {
            gate: self.clone(),
            id,
        })
    }

    /// Closes the oldest unauthenticated connection (when a thread cannot be started: the
    /// threads they hold are the ones to give back first).
    pub fn evict_oldest(&self) -> bool {
        let old = lock(&self.pending).pop_front();
        match old {
            Some((_, s)) => {
                let _ = s.shutdown(Shutdown::Both);
                self.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// At a stop: shuts down the socket of every connection still open (authenticated or not),
    /// so that its thread's next read or write fails and it ends. Returns how many.
    pub fn close_all(&self) -> usize {
        let open = lock(&self.open);
        for (_, s) in open.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        open.len()
    }

    /// Waits until every connection thread has ended, at most `limit`; whether they all did.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let t0 = Instant::now();
        while self.threads() > 0 {
            if t0.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Connection threads running now.
    pub fn threads(&self) -> usize {
        self.threads.load(Ordering::Acquire)
    }

    /// A warning, at most once a second (a flood must not flood the log too).
    fn warn(&self, msg: &str) {
        let mut last = lock(&self.last_warning);
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            tracing::warn!("{msg}");
        }
    }

    fn forget(&self, id: u64) {
        lock(&self.pending).retain(|(i, _)| *i != id);
    }

    /// The connection's thread ended.
    fn closed(&self, id: u64) {
        self.forget(id);
        lock(&self.open).retain(|(i, _)| *i != id);
    }
}

impl Admitted {
    /// The peer is authenticated: this connection can no longer be evicted.
    pub fn authenticated(&self) {
        self.gate.forget(self.id);
    }

    /// Whether a failure of this connection is worth a warning now (rate-limited like the
    /// gate's own warnings).
    pub fn may_warn(&self) -> bool {
        let mut last = lock(&self.gate.last_warning);
        if last.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) {
            *last = Some(Instant::now());
            true
        } else {
            false
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gate.closed(self.id);
        self.gate.threads.fetch_sub(1, Ordering::AcqRel);
    }
}
