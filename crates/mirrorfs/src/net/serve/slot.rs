//! One primary at a time, and a stale session of that primary displaced by its new connection:
//! the shell around the core's rule (`mirrorfs_core::slot`: `admission`, `Slot`).
//!
//! A mirror daemon streams from one primary at a time (two streams into one journal would
//! interleave two histories). A session holds the [`PrimarySlot`] from before its handshake
//! reads the copy's positions until every thread it runs (receive, acks, UDP) has ended. A
//! primary whose session went stale (its process stopped, its connection half dead, or it gave
//! up waiting and connected again while the daemon's side is still busy) would otherwise be
//! refused `BUSY` by its own old session until the daemon noticed the silence (`DEAD_AFTER`,
//! 10 s in the streaming and reintegration phases; longer while a step does not read).
//!
//! ```text
//!  new connection (after Hello) ─▶ core::slot::admission(holder, new):
//!     free                              → Take
//!     same key and same volume          → Displace: the holder is told to end (its socket shut
//!                                          down: its next read or write fails; its `ending`
//!                                          flag, for the one wait that does neither, for the
//!                                          journal to be durable), then wait
//!                                          ≤ DISPLACE_WITHIN for it to release the slot → Take
//!                                          (or BUSY "still ending": the primary retries)
//!     an older connection of that primary
//!     while a newer one holds or waits  → Superseded (BUSY)
//!     another key, another volume, or
//!     an unauthenticated peer           → Busy (as before: refused, the primary retries)
//! ```
//!
//! The decisions (who is admitted, who waits, whether the holder is to be told now) are the
//! core's `Slot`; this shell keeps it under a mutex, holds each holder's way to end its session
//! (`end`, its `displaced` flag) and waits on a condition variable for the release. The slot is
//! released only when the old session's `stream` has returned, i.e. after it joined its ack and
//! UDP threads: nothing it runs can append a record, write the copy's meta file or start or stop
//! the applier once the new session's handshake begins. A waiter that a newer connection of the
//! same primary overtakes gives up (`BUSY`, superseded), so at most one connection waits to take
//! over. The writable sites' peer receiver (`net::peer`) uses the same slot for its peer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mirrorfs_core::slot::{Admission, Claimant, Slot};

use crate::net::identity::Fingerprint;
use crate::site::volume::lock;

/// How long a new connection of the same primary waits for its stale session to end once told
/// (well within the primary's wait for `Welcome`, `conn::CONNECT_TIMEOUT`, 10 s).
pub const DISPLACE_WITHIN: Duration = Duration::from_secs(5);

/// Who streams: the authenticated key (the pinned certificate's fingerprint; `None` if the
/// connection had none, which never displaces anything) and the volume its `Hello` names.
pub type PrimaryId = Claimant<Fingerprint>;

/// Why a connection did not get the slot (each is sent as `BUSY`: the primary retries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Another primary streams.
    Busy,
    /// This primary's earlier session was told to end but did not release the slot in time.
    StillEnding { waited: Duration },
    /// A newer connection of this primary took over the wait.
    Superseded,
}

impl Refusal {
    /// The message the primary is sent with `BUSY`.
    pub fn message(&self) -> String {
        match self {
            Refusal::Busy => "another primary is connected to this mirror".into(),
            Refusal::StillEnding { waited } => format!(
                "this primary's previous connection to this mirror was told to end {:.1} s ago and has not ended yet; the primary tries again by itself. If this lasts, restart the mirror daemon",
                waited.as_secs_f64()
            ),
            Refusal::Superseded => {
                "a newer connection of this primary is taking its place on this mirror".into()
            }
        }
    }
}

/// What the shell keeps of the holder besides the core's state.
struct Ender {
    /// Ends the holder's session (shuts down its socket).
    end: Box<dyn Fn() + Send + Sync>,
    /// Set when a newer connection of the same primary told it to end.
    displaced: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    slot: Slot<Fingerprint>,
    ender: Option<Ender>,
}

/// Who holds the daemon's one stream (see the module's comment).
#[derive(Default)]
pub struct PrimarySlot {
    state: Mutex<State>,
    released: Condvar,
}

/// The slot, held until dropped (then released and the waiter woken).
pub struct Claimed<'a> {
    slot: &'a PrimarySlot,
    conn: u64,
    displaced: Arc<AtomicBool>,
}

impl Claimed<'_> {
    /// Whether a newer connection of the same primary told this session to end.
    pub fn displaced(&self) -> bool {
        self.displaced.load(Ordering::Acquire)
    }

    /// The flag behind [`Claimed::displaced`], for a wait that neither reads nor writes the
    /// session's socket (shut down when it is displaced) to check.
    pub fn ending(&self) -> &AtomicBool {
        &self.displaced
    }
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.slot.state);
        if st.slot.release(self.conn) {
            st.ender = None;
        }
        drop(st);
        self.slot.released.notify_all();
    }
}

impl PrimarySlot {
    /// Takes the slot for `who`, whose session `end` ends (called at most once, from another
    /// connection's thread, if a newer connection of the same primary displaces it). Displacing
    /// this primary's own earlier session waits at most `within` for it to release the slot.
    pub fn claim(
        &self,
        who: PrimaryId,
        end: Box<dyn Fn() + Send + Sync>,
        within: Duration,
    ) -> Result<Claimed<'_>, Refusal> {
        let t0 = Instant::now();
        let mut st = lock(&self.state);
        let conn = st.slot.number();
        loop {
            match st.slot.ask(&who, conn) {
                Admission::Take => {
                    let displaced = Arc::new(AtomicBool::new(false));
                    st.ender = Some(Ender {
                        end,
                        displaced: displaced.clone(),
                    });
                    return Ok(Claimed {
                        slot: self,
                        conn,
                        displaced,
                    });
                }
                Admission::Busy => return Err(Refusal::Busy),
                Admission::Superseded => return Err(Refusal::Superseded),
                Admission::Displace => {}
            }
            if st.slot.tell() {
                if let Some(h) = &st.ender {
                    tracing::warn!(
                        "a new connection of the connected primary ({}): ending its previous session (displaced; it may have stopped, or its connection died without closing)",
                        who.key.map(|k| k.to_string()).unwrap_or_default()
                    );
                    h.displaced.store(true, Ordering::Release);
                    (h.end)();
                }
            }
            let left = within.saturating_sub(t0.elapsed());
            if left.is_zero() {
                st.slot.give_up(conn);
                return Err(Refusal::StillEnding {
                    waited: t0.elapsed(),
                });
            }
            st = self
                .released
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Whether any session holds the slot.
    #[cfg(test)]
    fn held(&self) -> bool {
        lock(&self.state).slot.holder().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn id(key: &[u8], volume: u8) -> PrimaryId {
        PrimaryId {
            key: Some(Fingerprint::of_cert(key)),
            volume: [volume; 16],
        }
    }

    fn noop() -> Box<dyn Fn() + Send + Sync> {
        Box::new(|| {})
    }

    #[test]
    fn another_primary_is_refused_and_the_holder_left_alone() {
        let slot = PrimarySlot::default();
        let told = Arc::new(AtomicBool::new(false));
        let t = told.clone();
        let held = slot
            .claim(
                id(b"a", 1),
                Box::new(move || t.store(true, Ordering::Release)),
                DISPLACE_WITHIN,
            )
            .expect("free slot");
        let t0 = Instant::now();
        assert_eq!(
            slot.claim(id(b"b", 1), noop(), DISPLACE_WITHIN).err(),
            Some(Refusal::Busy)
        );
        assert_eq!(
            slot.claim(id(b"a", 2), noop(), DISPLACE_WITHIN).err(),
            Some(Refusal::Busy)
        );
        assert!(t0.elapsed() < Duration::from_secs(1), "a refusal waited");
        assert!(!told.load(Ordering::Acquire) && !held.displaced());
        drop(held);
        assert!(!slot.held());
        assert!(slot.claim(id(b"b", 1), noop(), DISPLACE_WITHIN).is_ok());
    }

    /// The new connection is told the slot only after the old session released it (its threads
    /// joined), never while it still runs.
    #[test]
    fn the_same_primary_displaces_its_session_once_it_has_ended() {
        let slot = Arc::new(PrimarySlot::default());
        let (told_tx, told_rx) = mpsc::channel::<()>();
        let told_tx = Mutex::new(told_tx);
        let ended = Arc::new(AtomicBool::new(false));
        let (held_tx, held_rx) = mpsc::channel::<bool>();
        let old = {
            let (slot, ended) = (slot.clone(), ended.clone());
            std::thread::spawn(move || {
                let c = slot
                    .claim(
                        id(b"a", 1),
                        Box::new(move || {
                            let _ = lock(&told_tx).send(());
                        }),
                        DISPLACE_WITHIN,
                    )
                    .expect("free slot");
                held_tx.send(true).expect("send");
                // The session notices its socket shut down a little later, then ends.
                told_rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the old session was not told to end");
                std::thread::sleep(Duration::from_millis(200));
                assert!(c.displaced());
                ended.store(true, Ordering::Release);
                drop(c);
            })
        };
        assert!(held_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("claimed"));
        let t0 = Instant::now();
        let new = slot
            .claim(id(b"a", 1), noop(), DISPLACE_WITHIN)
            .expect("the same primary's new connection");
        assert!(
            ended.load(Ordering::Acquire),
            "the new connection got the slot while the old session still ran"
        );
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert!(t0.elapsed() < DISPLACE_WITHIN);
        old.join().expect("old session");
        assert!(!new.displaced());
    }

    #[test]
    fn a_session_that_does_not_end_in_time_keeps_the_slot_and_the_new_one_is_refused() {
        let slot = PrimarySlot::default();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = calls.clone();
        let held = slot
            .claim(
                id(b"a", 1),
                Box::new(move || {
                    n.fetch_add(1, Ordering::AcqRel);
                }),
                DISPLACE_WITHIN,
            )
            .expect("free slot");
        let within = Duration::from_millis(300);
        let t0 = Instant::now();
        let r = slot.claim(id(b"a", 1), noop(), within);
        let took = t0.elapsed();
        assert!(
            matches!(r, Err(Refusal::StillEnding { waited }) if waited >= within),
            "{:?}",
            r.err()
        );
        assert!(took >= within && took < within + Duration::from_secs(2));
        assert!(Refusal::StillEnding { waited: took }
            .message()
            .contains("restart the mirror daemon"));
        // Still held by the old session, told once however often it is asked to end.
        assert!(held.displaced());
        let _ = slot.claim(id(b"a", 1), noop(), Duration::from_millis(50));
        assert_eq!(calls.load(Ordering::Acquire), 1);
        // Another primary is still refused meanwhile.
        assert_eq!(
            slot.claim(id(b"b", 1), noop(), within).err(),
            Some(Refusal::Busy)
        );
        drop(held);
        assert!(slot.claim(id(b"a", 1), noop(), within).is_ok());
    }

    #[test]
    fn a_newer_connection_of_the_primary_overtakes_an_older_waiter() {
        let slot = Arc::new(PrimarySlot::default());
        let held = slot
            .claim(id(b"a", 1), noop(), DISPLACE_WITHIN)
            .expect("free slot");
        let (tx, rx) = mpsc::channel();
        let first = {
            let slot = slot.clone();
            std::thread::spawn(move || {
                let r = slot
                    .claim(id(b"a", 1), noop(), Duration::from_secs(10))
                    .map(|_| ());
                tx.send(r).expect("send");
            })
        };
        // Until the first waiter waits (bounded).
        let t0 = Instant::now();
        while lock(&slot.state).slot.waiting().is_none() {
            assert!(t0.elapsed() < Duration::from_secs(10), "no waiter");
            std::thread::sleep(Duration::from_millis(5));
        }
        let (tx2, rx2) = mpsc::channel();
        let (end_tx, end_rx) = mpsc::channel::<()>();
        let second = {
            let slot = slot.clone();
            std::thread::spawn(move || {
                let r = slot.claim(id(b"a", 1), noop(), Duration::from_secs(10));
                tx2.send(r.as_ref().map(|c| c.conn).map_err(Clone::clone))
                    .expect("send");
                // Held until the first waiter answered (a slot it released would be free for
                // the older connection to take, rightly).
                let _ = end_rx.recv_timeout(Duration::from_secs(10));
                drop(r);
            })
        };
        while lock(&slot.state).slot.waiting() == Some(1) {
            assert!(t0.elapsed() < Duration::from_secs(10), "no second waiter");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(held);
        let r1 = rx.recv_timeout(Duration::from_secs(10)).expect("first");
        let r2 = rx2.recv_timeout(Duration::from_secs(10)).expect("second");
        end_tx.send(()).expect("end the second");
        assert_eq!(r1, Err(Refusal::Superseded));
        assert_eq!(r2, Ok(2));
        first.join().expect("first");
        second.join().expect("second");
    }
}
