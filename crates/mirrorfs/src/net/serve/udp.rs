//! The daemon's side of the UDP data path (issue 8): the shell of
//! `mirrorfs_core::udp::UdpReceiver`. The daemon binds one UDP socket on its listen address
//! (`serve --no-udp`: none). When a streaming primary offers UDP (`UdpOffer`), the session's
//! receiver is keyed from that TLS session and the daemon answers `UdpAccept{port}`; from then
//! on a thread of the session takes datagrams, and the records the receiver hands on, in journal
//! order, go through the same check and append as a TCP `Records` batch (`Session::on_message`,
//! `Daemon::append`). NAKs go back on the TLS connection; the usual `Ack`s say what arrived.
//!
//! ```text
//!  UDP socket ─▶ UdpReceiver.on_datagram (forged / replayed / malformed: dropped, counted)
//!     pop_record ─▶ Records body ─▶ Session::on_message ─▶ Daemon::append (as over TCP)
//!     naks(now) ─▶ UdpNak on TLS          UdpSent{through} from TLS ─▶ note_sent once the
//!                                                                      socket is drained
//! ```
//!
//! Bounds: the kernel's socket buffer (raised to [`RECEIVE_BUFFER_BYTES`]) is the queue in front
//! of the receiver (datagrams beyond it are lost and asked for again); the receiver's own
//! windows bound what it holds (`core::udp`).

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use mirrorfs_core::session::{Incoming, Session};
use mirrorfs_core::udp::{take_batch, ReceiverConfig, UdpReceiver};
use mirrorfs_core::wire::Msg;

use crate::net::conn::Duplex;
use crate::site::volume::lock;

use super::Daemon;

/// The daemon socket's receive buffer (the kernel may cap it).
pub const RECEIVE_BUFFER_BYTES: usize = 8 << 20;
/// How often the receiver is asked for NAKs (its own rules say when an entry is due).
const NAK_TICK: Duration = Duration::from_millis(1);
/// A socket read returns at least this often (NAK timing, a session's end).
const READ_TICK: Duration = Duration::from_millis(5);

/// What the daemon's UDP path counted, for status (all sessions since it started).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct UdpCounts {
    pub sessions: u64,
    pub packets: u64,
    pub records: u64,
    /// Data packets FEC rebuilt.
    pub recovered: u64,
    pub nak_entries: u64,
    /// Dropped by the packet layer: not a packet of ours, another session's (an earlier
    /// connection's, or forged), failing authentication, replayed.
    pub dropped_malformed: u64,
    pub dropped_other_session: u64,
    pub dropped_unauthentic: u64,
    pub dropped_replayed: u64,
    /// Authentic packets refused above the packet layer (oversize, bad fragment or repair,
    /// inconsistent fragment).
    pub dropped_invalid: u64,
    /// Datagrams that came while no session had UDP on.
    pub dropped_no_session: u64,
}

/// In words, for the log line at the end of a session.
impl std::fmt::Display for UdpCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} packets, {} records, {} rebuilt by FEC, {} NAK entries; dropped {} unauthentic, {} replayed, {} malformed, {} of other sessions, {} invalid, {} with no session",
            self.packets,
            self.records,
            self.recovered,
            self.nak_entries,
            self.dropped_unauthentic,
            self.dropped_replayed,
            self.dropped_malformed,
            self.dropped_other_session,
            self.dropped_invalid,
            self.dropped_no_session
        )
    }
}

impl UdpCounts {
    fn of(r: &UdpReceiver) -> UdpCounts {
        let (s, d) = (r.stats(), r.dropped());
        UdpCounts {
            sessions: 1,
            packets: s.packets,
            records: s.records,
            recovered: s.recovered,
            nak_entries: s.naks_sent,
            dropped_malformed: d.malformed,
            dropped_other_session: d.other_session,
            dropped_unauthentic: d.unauthentic,
            dropped_replayed: d.replayed,
            dropped_invalid: s.oversize
                + s.bad_fragments
                + s.bad_repairs
                + s.refused_repairs
                + s.inconsistent_fragments,
            dropped_no_session: 0,
        }
    }

    /// The sum, field by field.
    pub fn plus(self, o: UdpCounts) -> UdpCounts {
        UdpCounts {
            sessions: self.sessions + o.sessions,
            packets: self.packets + o.packets,
            records: self.records + o.records,
            recovered: self.recovered + o.recovered,
            nak_entries: self.nak_entries + o.nak_entries,
            dropped_malformed: self.dropped_malformed + o.dropped_malformed,
            dropped_other_session: self.dropped_other_session + o.dropped_other_session,
            dropped_unauthentic: self.dropped_unauthentic + o.dropped_unauthentic,
            dropped_replayed: self.dropped_replayed + o.dropped_replayed,
            dropped_invalid: self.dropped_invalid + o.dropped_invalid,
            dropped_no_session: self.dropped_no_session + o.dropped_no_session,
        }
    }
}

/// The daemon's UDP socket and its counters.
pub struct UdpPort {
    pub socket: UdpSocket,
    /// Finished sessions' counts.
    pub done: Mutex<UdpCounts>,
    /// The running session's.
    pub live: Mutex<UdpCounts>,
}

impl UdpPort {
    /// Binds UDP on the TLS listener's address (same port).
    pub fn bind(addr: &str) -> Result<UdpPort> {
        let socket = UdpSocket::bind(addr)?;
        socket.set_read_timeout(Some(READ_TICK))?;
        crate::net::udp::set_receive_buffer(&socket, RECEIVE_BUFFER_BYTES);
        Ok(UdpPort {
            socket,
            done: Mutex::new(UdpCounts::default()),
            live: Mutex::new(UdpCounts::default()),
        })
    }

    pub fn counts(&self) -> UdpCounts {
        lock(&self.done).plus(*lock(&self.live))
    }
}

/// Copies the running session's counters to `port.live`, where `status` reads them (a copy of
/// a few integers: `status` never waits for the receiver's lock).
fn publish_counts(port: &UdpPort, inbound: &Inbound) {
    if let Some(rx) = lock(&inbound.udp).as_ref() {
        let c = UdpCounts::of(rx);
        let mut live = lock(&port.live);
        *live = UdpCounts {
            dropped_no_session: live.dropped_no_session,
            ..c
        };
    }
}

/// One session's inbound side: the UDP receiver once the primary's offer was accepted, and the
/// highest settled watermark seen (records over UDP and the TLS `Records` may interleave).
pub(super) struct Inbound {
    udp: Mutex<Option<UdpReceiver>>,
    settled: AtomicU64,
    /// The primary's last `UdpSent`, for the receiver once the socket is drained.
    sent_hint: AtomicU64,
    epoch: Instant,
}

impl Inbound {
    pub(super) fn new() -> Inbound {
        Inbound {
            udp: Mutex::new(None),
            settled: AtomicU64::new(0),
            sent_hint: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// The settled watermark to publish: never lower than one published before.
    pub(super) fn settled(&self, settled: u64) -> u64 {
        self.settled
            .fetch_max(settled, Ordering::AcqRel)
            .max(settled)
    }

    /// The primary's `UdpSent`. It reaches the receiver only when the socket has nothing
    /// waiting (`apply_sent_hint`): the datagrams sent before it may still be in the socket's
    /// buffer behind a busy receiver, and would otherwise be asked for again in vain.
    pub(super) fn note_sent(&self, through: u64) {
        self.sent_hint.fetch_max(through, Ordering::AcqRel);
    }

    fn apply_sent_hint(&self) {
        if let Some(r) = lock(&self.udp).as_mut() {
            r.note_sent(self.sent_hint.load(Ordering::Acquire));
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

impl Daemon {
    /// The answer to `UdpOffer{first}`: the receiver for this session, keyed from its TLS
    /// session, and the port (0: no UDP on this daemon).
    pub(super) fn accept_udp(&self, link: &Duplex, inbound: &Inbound, first: u64) -> Result<Msg> {
        let Some(port) = &self.udp else {
            tracing::info!("the primary offered UDP; declined (--no-udp)");
            return Ok(Msg::UdpAccept { port: 0 });
        };
        let keys = link.datagram_keys()?;
        let receiver = UdpReceiver::new(
            &keys.receive,
            keys.session,
            ReceiverConfig::default(),
            first,
        );
        *lock(&inbound.udp) = Some(receiver);
        let local = port.socket.local_addr()?;
        tracing::info!(
            "records from {first} come as UDP datagrams to port {}",
            local.port()
        );
        Ok(Msg::UdpAccept { port: local.port() })
    }

    /// The session's UDP thread: datagrams in, records appended, NAKs out, until `done`.
    pub(super) fn udp_in(
        &self,
        link: &Duplex,
        session: &Mutex<Session>,
        inbound: &Inbound,
        done: &AtomicBool,
    ) -> Result<()> {
        let Some(port) = &self.udp else {
            return Ok(());
        };
        let r = self.udp_loop(port, link, session, inbound, done);
        let c = lock(&inbound.udp)
            .as_ref()
            .map(UdpCounts::of)
            .unwrap_or_default();
        if c.sessions > 0 {
            tracing::info!("the UDP data path of this session: {c}");
        }
        let mut live = lock(&port.live);
        let mut total = lock(&port.done);
        *total = total.plus(UdpCounts {
            dropped_no_session: live.dropped_no_session,
            ..c
        });
        *live = UdpCounts::default();
        r
    }

    fn udp_loop(
        &self,
        port: &UdpPort,
        link: &Duplex,
        session: &Mutex<Session>,
        inbound: &Inbound,
        done: &AtomicBool,
    ) -> Result<()> {
        let mut buf = vec![0u8; 65_536];
        let mut asked = Instant::now();
        while !done.load(Ordering::Acquire) {
            match port.socket.recv(&mut buf) {
                Ok(n) => match lock(&inbound.udp).as_mut() {
                    Some(rx) => rx.on_datagram(&buf[..n]),
                    None => lock(&port.live).dropped_no_session += 1,
                },
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    inbound.apply_sent_hint()
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(anyhow!("the UDP socket failed: {e}")),
            }
            self.deliver(port, session, inbound)?;
            // What is missing is looked for at most every `NAK_TICK` (a scan of the window).
            if asked.elapsed() >= NAK_TICK {
                self.send_naks(link, inbound)?;
                asked = Instant::now();
            }
            publish_counts(port, inbound);
        }
        Ok(())
    }

    /// The records the receiver has whole, in order, as one batch through the session's
    /// checks and the daemon's append (the path TCP batches take).
    /// The counts go to `status` before the append: `status` never shows fewer records than
    /// the daemon appended (a snapshot taken every 100 ms once did, and a test that read it
    /// right after the trees converged saw no repair of the loss it had caused).
    fn deliver(&self, port: &UdpPort, session: &Mutex<Session>, inbound: &Inbound) -> Result<()> {
        let msg = match lock(&inbound.udp).as_mut() {
            Some(rx) => take_batch(rx).map_err(anyhow::Error::new)?,
            None => return Ok(()),
        };
        let Some(msg) = msg else {
            return Ok(());
        };
        publish_counts(port, inbound);
        // The session's lock is released before the append (which takes it on a failure).
        let incoming = lock(session).on_message(&msg)?;
        match incoming {
            Incoming::Append { records, settled } => {
                self.append(session, records, inbound.settled(settled))
            }
            other => Err(anyhow!("internal: records over UDP gave {other:?}")),
        }
    }

    fn send_naks(&self, link: &Duplex, inbound: &Inbound) -> Result<()> {
        let naks = match lock(&inbound.udp).as_mut() {
            Some(rx) => rx.naks(inbound.now_us()),
            None => return Ok(()),
        };
        if !naks.is_empty() {
            link.send(&Msg::UdpNak { naks })?;
        }
        Ok(())
    }
}
