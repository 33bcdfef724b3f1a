//! One primary's connection to the daemon: the I/O shell of `core::session::Session` — the
//! handshake (`Welcome` or a refusal), the exchange of records and acknowledgements on two
//! threads, appends at the primary's seqs, and the end of an initial copy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mirrorfs_core::link::{Begin, LinkError, Positions};
use mirrorfs_core::op::Record;
use mirrorfs_core::session::{Incoming, OnDiverged, Phase, Session};
use mirrorfs_core::wire::{error_code, Decoder, Msg};

use crate::net::conn::Duplex;
use crate::site::meta::{write_meta, CopyState};
use crate::site::volume::{lock, Progress};

use super::slot::{PrimaryId, Refusal, DISPLACE_WITHIN};
use super::udp::Inbound;
use super::Daemon;

impl Daemon {
    /// One authenticated connection (TLS done, see `gate`).
    pub(super) fn session(self: Arc<Self>, link: Duplex) -> Result<()> {
        let peer = link.peer().map(|p| p.to_string()).unwrap_or_default();
        let mut dec = Decoder::new();
        let hello = recv_within(&link, &mut dec, crate::net::conn::CONNECT_TIMEOUT)?;
        if let Msg::Verify {
            volume_id,
            no_cache,
            plan,
        } = hello
        {
            // Not a primary: it neither waits for nor displaces the one streaming.
            return self
                .answer_verify(&link, volume_id, no_cache, plan.as_deref())
                .with_context(|| format!("verify from {peer}"));
        }
        // One primary at a time; a stale session of this same primary (same key, same volume)
        // is told to end and waited for, so nothing of it runs once this one's handshake
        // begins (`slot`). A first message that is no `Hello` displaces nothing (the session
        // refuses it).
        let link = Arc::new(link);
        let who = match &hello {
            Msg::Hello { volume_id, .. } => PrimaryId {
                key: link.peer(),
                volume: *volume_id,
            },
            _ => PrimaryId {
                key: None,
                volume: Default::default(),
            },
        };
        let end = {
            let l = link.clone();
            Box::new(move || l.shutdown())
        };
        let claimed = match self.slot.claim(who, end, DISPLACE_WITHIN) {
            Ok(c) => c,
            Err(refusal) => {
                let message = refusal.message();
                let _ = link.send(&Msg::Error {
                    code: error_code::BUSY,
                    message: message.clone(),
                });
                if refusal == Refusal::Busy {
                    bail!("refused {peer}: another primary is connected");
                }
                bail!("refused {peer}: {message}");
            }
        };
        *lock(&self.peer) = Some(peer.clone());
        let r = self.stream(&link, &mut dec, &hello, claimed.ending());
        *lock(&self.peer) = None;
        if claimed.displaced() {
            // Its socket was shut down for the primary's new connection: whatever the last
            // read or write said, that is why it ended.
            tracing::info!(
                "the previous session of primary {peer} ended: displaced by its new connection ({})",
                r.as_ref()
                    .err()
                    .map(|e| format!("{e:#}"))
                    .unwrap_or_else(|| "ended cleanly".into())
            );
            return Ok(());
        }
        if let Err(e) = &r {
            if let Some(le) = e.downcast_ref::<LinkError>() {
                let _ = link.send(&le.to_msg());
            }
        }
        r.with_context(|| format!("primary {peer}"))
    }

    /// The session on an accepted connection: `Welcome`, `Start` and what it asks for, then
    /// records and acks until either side ends it. The decisions are `core::session`'s.
    /// `ending`: a new connection of the same primary displaces this session (its socket is
    /// shut down too; this tells the one wait that does not read or write it).
    pub(super) fn stream(
        &self,
        link: &Duplex,
        dec: &mut Decoder,
        hello: &Msg,
        ending: &AtomicBool,
    ) -> Result<()> {
        self.settle_journal(ending)?;
        let mut session = self.welcome(link, hello)?;
        if session.phase() == Phase::Reintegrating {
            return self.reintegrate(link, dec, session, hello);
        }
        let start = recv_within(link, dec, crate::net::conn::CONNECT_TIMEOUT).inspect_err(|e| {
            *lock(&self.refused) = Some(format!("{e:#}"));
        })?;
        let begin = session.on_start(&start).map_err(|e| self.refuse(e))?;
        *lock(&self.refused) = None;
        *lock(&self.reintegration) = None;
        // A new initial copy or resync forgets an older one's `SyncDone`.
        self.pending_sync_done
            .store(session.pending_sync_done(), Ordering::Release);
        // The copy follows this primary from here: its journal need not be held any more.
        self.vol.retain_after.store(u64::MAX, Ordering::Release);
        match begin {
            Begin::Resume { seq, history } => {
                tracing::info!("resuming at record {seq}");
                self.adopt(&history, seq)?;
                if lock(&self.worker).is_none() {
                    bail!("internal: resume without a running applier");
                }
            }
            Begin::InitialSync {
                seq,
                sync_id,
                history,
            } => self.begin_initial_copy(&session, seq, sync_id, &history)?,
            Begin::Resync {
                seq,
                sync_id,
                history,
            } => self.begin_resync(link, seq, sync_id, &history)?,
        }
        let session = Mutex::new(session);
        let r = self.exchange(link, dec, &session);
        self.pending_sync_done
            .store(lock(&session).pending_sync_done(), Ordering::Release);
        r
    }

    /// A session for this copy (as it is now) that answered `hello`: `Welcome` is sent, or
    /// `Diverged` (`--on-diverged reintegrate`: the session is then reintegrating), or the
    /// primary is refused. With `--on-diverged discard`, a diverged copy is saved and discarded
    /// first, and a fresh session answers.
    pub(super) fn welcome(&self, link: &Duplex, hello: &Msg) -> Result<Session> {
        let label = self.dir.display().to_string();
        let fresh = || {
            let pending = self.pending_sync_done.load(Ordering::Acquire);
            Session::new(self.copy(), &self.reserved, &label, pending)
                .with_on_diverged(self.on_diverged)
        };
        let mut session = fresh();
        let welcome = match session.on_hello(hello) {
            Ok(w) => w,
            Err(e) if e.code == error_code::DIVERGED && self.on_diverged == OnDiverged::Discard => {
                let c = session
                    .divergence()
                    .ok_or_else(|| anyhow!("internal: no divergence"))?;
                self.discard_divergence(&c)?;
                session = fresh();
                session.on_hello(hello).map_err(|e| self.refuse(e))?
            }
            Err(mut e) => {
                if let Some(c) = session.divergence() {
                    e.message = self.explain_divergence(&c, &e.message);
                }
                return Err(self.refuse(e).into());
            }
        };
        if let Msg::Hello { name, compress, .. } = hello {
            tracing::info!("primary {name} connected");
            link.set_compress(*compress);
        }
        link.send(&welcome)?;
        Ok(session)
    }

    /// Records flow in (this thread) and acks flow out (a second one) until either ends; the
    /// other is then stopped and the connection shut down.
    pub(super) fn exchange(
        &self,
        link: &Duplex,
        dec: &mut Decoder,
        session: &Mutex<Session>,
    ) -> Result<()> {
        let done = AtomicBool::new(false);
        let inbound = Inbound::new();
        std::thread::scope(|s| -> Result<()> {
            let acker = s.spawn(|| {
                let r = self.send_acks(link, session, &done);
                done.store(true, Ordering::Release);
                link.shutdown();
                r
            });
            let udp = s.spawn(|| {
                let r = self.udp_in(link, session, &inbound, &done);
                if r.is_err() {
                    done.store(true, Ordering::Release);
                    link.shutdown();
                }
                r
            });
            let r = self.receive(link, dec, session, &inbound, &done);
            // Tell the primary why, before the connection is shut down.
            if let Some(le) = r.as_ref().err().and_then(|e| e.downcast_ref::<LinkError>()) {
                let _ = link.send(&le.to_msg());
            }
            done.store(true, Ordering::Release);
            self.vol.changed.notify_all();
            link.shutdown();
            let a = acker
                .join()
                .unwrap_or_else(|_| Err(anyhow!("ack thread panicked")));
            let u = udp
                .join()
                .unwrap_or_else(|_| Err(anyhow!("UDP thread panicked")));
            // The UDP thread's error (a bad record) is why the connection ended.
            u.and(r).and(a)
        })
    }

    /// Records a refusal for `status` and the log; returns it to be sent to the primary.
    pub(super) fn refuse(&self, e: LinkError) -> LinkError {
        tracing::warn!("refusing the primary: {}", e.message);
        *lock(&self.refused) = Some(e.message.clone());
        e
    }

    /// Takes the primary's messages and does what the session says: append a batch, answer a
    /// ping, end on the primary's error; a silent primary is dropped after `DEAD_AFTER`.
    pub(super) fn receive(
        &self,
        link: &Duplex,
        dec: &mut Decoder,
        session: &Mutex<Session>,
        inbound: &Inbound,
        done: &AtomicBool,
    ) -> Result<()> {
        let dead = crate::net::remote::DEAD_AFTER;
        let mut heard = Instant::now();
        loop {
            let silent = || anyhow!("the primary sent nothing for {dead:?}; closing");
            let Some(msg) = link.next_or_dead(dec, done, &mut heard, dead, silent)? else {
                return Ok(());
            };
            let incoming = lock(session).on_message(&msg)?;
            match incoming {
                Incoming::Append { records, settled } => {
                    self.append(session, records, inbound.settled(settled))?
                }
                Incoming::UdpOffer { first } => {
                    let answer = self.accept_udp(link, inbound, first)?;
                    link.send(&answer)?;
                }
                Incoming::UdpSent { through } => inbound.note_sent(through),
                Incoming::Reply(reply) => {
                    link.send(&reply)?;
                }
                Incoming::PeerError { code, message } => {
                    bail!("the primary reported an error (code {code}): {message}")
                }
                Incoming::Nothing => {}
                // Only a session that answered `Diverged` reintegrates (`reintegration.rs`).
                Incoming::SendTail { .. }
                | Incoming::Fetch { .. }
                | Incoming::Reintegrated { .. } => {
                    bail!("internal: a reintegration message while streaming")
                }
            }
        }
    }

    /// Stores a checked batch at its seqs and lets the applier go up to the primary's `settled`
    /// (a record ≤ it is final once the next record is known, or if it is the watermark itself).
    pub(super) fn append(
        &self,
        session: &Mutex<Session>,
        records: &[Record],
        settled: u64,
    ) -> Result<()> {
        let mut o = lock(&self.vol.order);
        for r in records {
            if let Err(e) = o.journal.append_at(r.seq, &r.op) {
                drop(o);
                self.vol.changed.notify_all();
                return Err(lock(session).on_storage_failure(r.seq, &e).into());
            }
            // Under the order lock, before the record is published (group-atomic mirroring).
            lock(&self.vol.groups).observe(r.seq, &r.op);
        }
        let end = o.journal.next_seq() - 1;
        drop(o);
        if let (Some(first), Some(last)) = (records.first(), records.last()) {
            crate::trace::event("recv", format_args!("{} {}", first.seq, last.seq));
        }
        let bytes = records.iter().map(|r| r.op.data_len() as u64).sum::<u64>();
        self.vol.publish_received(end, settled, bytes);
        Ok(())
    }

    /// Each round (a change of positions, or every 50 ms) hands the positions to the session and
    /// sends the ack it says is due; records a completed copy.
    pub(super) fn send_acks(
        &self,
        link: &Duplex,
        session: &Mutex<Session>,
        done: &AtomicBool,
    ) -> Result<()> {
        let t0 = Instant::now();
        while !done.load(Ordering::Acquire) {
            let seen = self.ack_inputs(&lock(&self.vol.progress));
            // One lock at a time: a guard in this literal would live to its end.
            let received = lock(&self.vol.order).journal.next_seq() - 1;
            let durable = lock(&self.vol.progress).durable_seq;
            let raw = Positions {
                received,
                durable,
                applied: self.m.applied.load(Ordering::Acquire),
                checkpoint: self.m.checkpoint.load(Ordering::Acquire),
            };
            let step = lock(session).ack_at(raw, t0.elapsed());
            if step.sync_complete {
                self.record_sync_complete()?;
                lock(session).sync_recorded();
            }
            if let Some(ack) = step.ack {
                link.send(&ack)?;
                crate::trace::event(
                    "ack",
                    format_args!(
                        "{} {} {} {}",
                        raw.received, raw.durable, raw.applied, raw.checkpoint
                    ),
                );
            }
            let p = lock(&self.vol.progress);
            // A position that moved during this round (while the ack went out) was published
            // before this check, or its wake-up comes after the wait began: never lost.
            if self.ack_inputs(&p) == seen {
                let _ = self.vol.changed.wait_timeout(p, Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// What the positions of an ack are made from, as published under the progress lock `p`:
    /// the journal's end (`publish_received`), durable (the flusher), applied and checkpoint
    /// (`publish_mirror_positions`).
    fn ack_inputs(&self, p: &Progress) -> [u64; 4] {
        [
            self.vol.settled.load(Ordering::Acquire),
            p.durable_seq,
            self.m.applied.load(Ordering::Acquire),
            self.m.checkpoint.load(Ordering::Acquire),
        ]
    }

    /// The initial copy (or resync) is complete, its `SyncDone` durably applied: from now on DIR
    /// is a consistent copy (M1 records it).
    pub(super) fn record_sync_complete(&self) -> Result<()> {
        let mut meta = lock(&self.meta);
        if meta.state == CopyState::Syncing {
            meta.state = CopyState::Consistent;
            write_meta(&self.state, &meta)?;
            tracing::info!(
                "initial copy complete: {} is a consistent mirror",
                self.dir.display()
            );
        }
        Ok(())
    }
}

fn recv_within(d: &Duplex, dec: &mut Decoder, limit: Duration) -> Result<Msg> {
    let t0 = Instant::now();
    loop {
        if let Some(m) = d.recv(dec)? {
            if let Msg::Error { code, message } = &m {
                if *code != 0 {
                    return Err(anyhow!("the peer refused (code {code}): {message}"));
                }
            }
            return Ok(m);
        }
        if t0.elapsed() > limit {
            bail!("the peer did not answer within {limit:?}");
        }
    }
}
