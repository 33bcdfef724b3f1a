//! The primary's side of the UDP data path (`mount --transport udp|auto`, issue 8): the shell of
//! `mirrorfs_core::udp::UdpSender`. After the handshake the primary offers UDP on the TLS
//! connection (`UdpOffer`); once the daemon accepts (`UdpAccept{port}`), each journal record goes
//! out as sealed datagrams with FEC repairs to that port, and the TLS connection stays the
//! control channel: it carries `UdpSent` (the sender's `sent_through`) to the daemon and brings
//! back `UdpNak`s and the usual `Ack`s (whose `received` frees the sender's store).
//!
//! ```text
//!  journal ≤ min(durable, settled) ─▶ Records body of one record ─▶ UdpSender.offer (Full: later)
//!  Gone(seq) from a NAK ─▶ re-read seq from the journal ─▶ UdpSender.resend
//!  UdpSender.poll_transmit(now) ─▶ UDP socket (connected to the daemon's host:port)
//!  sent_through ─▶ MirrorShared.sent (what `--ack network` waits for) and UdpSent on TLS
//!  datagrams out, Acks' `received`, NAKs, the clock ─▶ RateControl ─▶ UdpSender.set_rate
//! ```
//!
//! The pace is `--udp-rate-mbit` (`--udp-rate-control fixed`, the default) or chosen by
//! `mirrorfs_core::udp::RateControl` below it (`adaptive`): see that module for how.
//!
//! Each record travels as the body of a one-record `Records` message (settled watermark and
//! journal frame, `docs/protocol.md`), so the daemon checks and appends it exactly as a TCP batch.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use mirrorfs_core::journal::Reader;
use mirrorfs_core::op::Record;
use mirrorfs_core::udp::{
    record_body, ControlConfig, Nak, OfferError, RateControl, RateMode, SenderConfig, UdpSender,
};
use mirrorfs_core::wire::Msg;

use crate::net::conn::Duplex;
use crate::site::store::FileStore;
use crate::site::volume::{lock, MirrorShared, Volume};

/// How records travel to a remote mirror (`mount --transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// In `Records` batches on the TLS connection.
    Tcp,
    /// As UDP datagrams with FEC beside the TLS connection; a mirror that declines is an error.
    Udp,
    /// UDP when the mirror accepts it and datagrams get through, else TCP.
    Auto,
}

/// How the UDP data path's pace is chosen (`mount --udp-rate-control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RateControlMode {
    /// Always `--udp-rate-mbit`.
    #[default]
    Fixed,
    /// Slow start, then what the link carries without a queue building (delay) or losses
    /// beyond what FEC masks, never above `--udp-rate-mbit`.
    Adaptive,
}

impl RateControlMode {
    fn mode(self) -> RateMode {
        match self {
            RateControlMode::Fixed => RateMode::Fixed,
            RateControlMode::Adaptive => RateMode::Adaptive,
        }
    }
}

/// NAKed records the sender's store no longer had, waiting to be re-read from the journal; more
/// are dropped (the receiver asks again after its NAK interval).
pub const GONE_MAX: usize = 4_096;
/// With `--transport auto`, records handed out over UDP that no acknowledgement covers for this
/// long, while none sent over UDP was ever acknowledged: the path is taken to be blocked and the
/// link falls back to TCP.
pub const PROOF_WAIT: Duration = Duration::from_secs(3);
/// The socket's send buffer (the kernel may cap it): a burst at the paced rate fits.
const SEND_BUFFER_BYTES: usize = 4 << 20;
/// The shortest sleep of a paced sender: at 200 Mbit/s, 25 KB (20 datagrams) per wake-up.
const PACE_TICK: Duration = Duration::from_millis(1);
/// `UdpSent` goes out at most this often (a NAK for a lost tail needs it; nothing else waits).
const SENT_EVERY: Duration = Duration::from_millis(2);

/// The UDP data path of one connection.
pub struct UdpPath {
    socket: UdpSocket,
    sender: Mutex<UdpSender>,
    /// Locked after `sender` when both are.
    control: Mutex<RateControl>,
    gone: Mutex<VecDeque<u64>>,
    /// Set by a NAK: the sending loop has work (read under the volume's progress lock).
    wake: AtomicBool,
    epoch: Instant,
    /// The first record sent over UDP.
    pub first: u64,
    send_errors: AtomicU64,
    gone_dropped: AtomicU64,
}

/// Sets a socket buffer size option, forcing past the system limit when allowed (root).
fn set_buffer(socket: &UdpSocket, force: libc::c_int, plain: libc::c_int, bytes: usize) {
    let v = bytes as libc::c_int;
    for opt in [force, plain] {
        // SAFETY: a valid fd and a pointer to an int of the size passed.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

/// Sets the receive buffer of the daemon's socket (shared with `serve`).
pub fn set_receive_buffer(socket: &UdpSocket, bytes: usize) {
    set_buffer(socket, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, bytes);
}

impl UdpPath {
    /// A path to the daemon's `port` on the TLS peer's host, keyed from the TLS session, whose
    /// first record is `first`, paced at `rate_bytes_per_s` (`fixed`) or at most that
    /// (`adaptive`), with `fec_layers` FEC layers.
    pub fn open(
        d: &Duplex,
        port: u16,
        first: u64,
        rate_bytes_per_s: u64,
        rate_control: RateControlMode,
        fec_layers: usize,
    ) -> Result<UdpPath> {
        let keys = d.datagram_keys()?;
        let mut peer: SocketAddr = d.peer_addr().context("the TLS connection's peer")?;
        peer.set_port(port);
        let local: SocketAddr = if peer.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = UdpSocket::bind(local).context("cannot open a UDP socket")?;
        socket
            .connect(peer)
            .with_context(|| format!("cannot address UDP datagrams to {peer}"))?;
        set_buffer(
            &socket,
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            SEND_BUFFER_BYTES,
        );
        let mut control = RateControl::new(
            ControlConfig {
                mode: rate_control.mode(),
                ceiling_bytes_per_s: rate_bytes_per_s,
                // The deepest layer's group: 8 packets at interleave distance 1, 10 or 100.
                fec_horizon_packets: match fec_layers {
                    0 => 0,
                    c => 8 * 10u64.pow(c as u32 - 1),
                },
                ..ControlConfig::default()
            },
            0,
        );
        control.starts_at(first);
        let config = SenderConfig {
            rate_bytes_per_s: control.rate(),
            queue_bytes_max: control.queue_bytes(),
            fec_layers,
            ..SenderConfig::default()
        };
        let sender = UdpSender::new(&keys.send, keys.session, config, first)
            .map_err(|e| anyhow!("the UDP sender's configuration: {e}"))?;
        Ok(UdpPath {
            socket,
            sender: Mutex::new(sender),
            control: Mutex::new(control),
            gone: Mutex::new(VecDeque::new()),
            wake: AtomicBool::new(false),
            epoch: Instant::now(),
            first,
            send_errors: AtomicU64::new(0),
            gone_dropped: AtomicU64::new(0),
        })
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A NAK from the daemon: fragments still kept are queued again, records no longer kept
    /// are to be re-read from the journal; the sending loop is woken.
    pub fn on_nak(&self, naks: &[Nak], vol: &Volume) {
        let out = lock(&self.sender).on_nak(naks);
        lock(&self.control).on_nak(naks.len());
        {
            let mut gone = lock(&self.gone);
            for seq in out.gone {
                if gone.len() >= GONE_MAX {
                    self.gone_dropped.fetch_add(1, Ordering::Relaxed);
                } else if !gone.contains(&seq) {
                    gone.push_back(seq);
                }
            }
        }
        self.wake.store(true, Ordering::Release);
        // Under the lock the sending loop checks `wake` with, so the wake-up is not lost.
        drop(lock(&vol.progress));
        vol.changed.notify_all();
    }

    /// The daemon holds every record through `seq`: the sender need not keep them.
    pub fn on_delivered(&self, seq: u64) {
        lock(&self.sender).on_delivered(seq);
        lock(&self.control).on_delivered(self.now_us(), seq);
    }

    /// Publishes the sender's counters in the link's status.
    fn publish(&self, m: &MirrorShared) {
        let s = lock(&self.sender).stats();
        let c = lock(&self.control).stats();
        let mut l = lock(&m.link);
        l.udp_rate_bytes_per_s = c.rate_bytes_per_s;
        l.udp_srtt_us = c.srtt_us;
        l.udp_base_rtt_us = c.base_rtt_us;
        l.udp_backoffs_delay = c.backoffs_delay;
        l.udp_backoffs_loss = c.backoffs_loss;
        l.udp_data_packets = s.data_packets;
        l.udp_repair_packets = s.repair_packets;
        l.udp_retransmitted_packets = s.retransmitted_packets;
        l.udp_send_errors = self.send_errors.load(Ordering::Relaxed);
    }

    /// Lets rate control end its round, then hands every datagram the rate allows now to the
    /// socket, telling rate control of each.
    fn transmit(&self) {
        let now = self.now_us();
        {
            let mut sender = lock(&self.sender);
            let mut control = lock(&self.control);
            let rate = control.on_tick(now);
            if rate != sender.rate() {
                sender.set_rate(now, rate);
                sender.set_queue_bytes_max(control.queue_bytes());
            }
        }
        loop {
            let datagram = {
                let mut sender = lock(&self.sender);
                let Some(datagram) = sender.poll_transmit(now) else {
                    return;
                };
                lock(&self.control).on_sent(now, datagram.len(), sender.data_sent_through());
                datagram
            };
            // A refused datagram (an ICMP unreachable reported on this connected socket, no
            // buffer space) is a lost packet: FEC or a NAK makes up for it.
            if self.socket.send(&datagram).is_err() {
                self.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Resends, from the journal, the records NAKed after the sender's store dropped them.
    fn resend_gone(&self, vol: &Volume, settled: u64) -> Result<()> {
        loop {
            let Some(seq) = lock(&self.gone).front().copied() else {
                return Ok(());
            };
            // A NAK that crossed the acknowledgement of its record: nothing to resend, and the
            // journal may have released the record since (found by the network simulation).
            if seq <= lock(&self.sender).delivered() {
                lock(&self.gone).pop_front();
                continue;
            }
            let record = read_one(vol, seq)?;
            let body = record_body(settled, record);
            match lock(&self.sender).resend(seq, &body) {
                Ok(()) => {}
                Err(OfferError::Full) => return Ok(()),
                Err(e) => return Err(anyhow!("cannot resend record {seq} over UDP: {e}")),
            }
            lock(&self.gone).pop_front();
        }
    }
}

/// Record `seq`, read again from the journal.
fn read_one(vol: &Volume, seq: u64) -> Result<Record> {
    let mut reader: Reader<crate::site::store::FileSegment> = Reader::new(seq);
    let view = lock(&vol.order).journal.segment_for(seq);
    reader.next::<FileStore>(view, seq)?.ok_or_else(|| {
        anyhow!("record {seq}, asked for again over UDP, is no longer in the journal")
    })
}

/// What the sending loop works with besides the path.
pub struct UdpStream<'a> {
    pub d: &'a Duplex,
    pub vol: &'a Volume,
    pub m: &'a MirrorShared,
    pub sender: &'a Mutex<mirrorfs_core::link::Sender>,
    pub done: &'a AtomicBool,
    pub copy_running: &'a AtomicBool,
    pub path: &'a UdpPath,
    /// `--transport auto`: a path that delivers nothing within [`PROOF_WAIT`] ends the
    /// connection with [`UdpBlocked`].
    pub auto: bool,
}

/// The UDP path delivered nothing: the link falls back to TCP.
#[derive(Debug)]
pub struct UdpBlocked;

impl std::fmt::Display for UdpBlocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no record sent over UDP was acknowledged within {PROOF_WAIT:?}: UDP seems blocked; falling back to TCP"
        )
    }
}

impl std::error::Error for UdpBlocked {}

impl UdpStream<'_> {
    /// The sending loop over UDP: the TCP loop's rules (records ≤ min(durable, settled),
    /// within the window, heartbeats, the drain at a stop) with datagrams instead of batches.
    pub fn run(&self) -> Result<()> {
        let mut reader: Reader<crate::site::store::FileSegment> =
            Reader::new(lock(self.sender).next_send());
        // A record the sender refused (queue full), encoded, to offer again.
        let mut pending: Option<(u64, Vec<u8>)> = None;
        let mut beat = super::remote::Beat::new();
        let mut last_sent_msg = (0u64, Instant::now());
        let mut unproven_since: Option<Instant> = None;
        loop {
            let round = super::remote::round(
                self.vol,
                self.m,
                self.sender,
                self.done,
                self.copy_running,
                &mut beat,
            )?;
            let Some(round) = round else { return Ok(()) };
            self.path.resend_gone(self.vol, round.settled)?;
            if lock(self.sender).may_send() && !round.sent_all {
                self.offer(&mut reader, &mut pending, round.limit, round.settled)?;
            }
            self.path.transmit();
            self.publish_sent(&mut last_sent_msg)?;
            self.check_proof(&mut unproven_since)?;
            beat.maybe_ping(self.d)?;
            let sent_pending = lock(&self.path.sender).sent_through() > last_sent_msg.0;
            self.wait(
                pending.is_some() || round.limit >= reader.next_seq(),
                sent_pending,
                round.limit,
            );
        }
    }

    /// Offers records from the journal until the sender's queue is full or none is left.
    fn offer(
        &self,
        reader: &mut Reader<crate::site::store::FileSegment>,
        pending: &mut Option<(u64, Vec<u8>)>,
        limit: u64,
        settled: u64,
    ) -> Result<()> {
        loop {
            let (seq, body) = match pending.take() {
                Some(p) => p,
                None if reader.next_seq() > limit => return Ok(()),
                None => {
                    let view = lock(&self.vol.order).journal.segment_for(reader.next_seq());
                    match reader.next::<FileStore>(view, limit)? {
                        Some(r) => (r.seq, record_body(settled, r)),
                        None => return Ok(()),
                    }
                }
            };
            match lock(&self.path.sender).offer(seq, &body) {
                Ok(()) => lock(self.sender).sent(seq, body.len() as u64),
                Err(OfferError::Full) => {
                    *pending = Some((seq, body));
                    return Ok(());
                }
                Err(e) => return Err(anyhow!("cannot send record {seq} over UDP: {e}")),
            }
            if !lock(self.sender).may_send() {
                return Ok(());
            }
        }
    }

    /// `sent_through` is the link's `sent` position (`--ack network`), and goes to the daemon
    /// as `UdpSent` when it moved (at most every [`SENT_EVERY`]).
    fn publish_sent(&self, last: &mut (u64, Instant)) -> Result<()> {
        let through = lock(&self.path.sender).sent_through();
        if through > self.m.sent.load(Ordering::Acquire) {
            self.m.sent.store(through, Ordering::Release);
            self.vol.changed.notify_all();
        }
        if through > last.0 && last.1.elapsed() >= SENT_EVERY {
            self.d.send(&Msg::UdpSent { through })?;
            *last = (through, Instant::now());
            self.path.publish(self.m);
        }
        Ok(())
    }

    /// `--transport auto`: records went out over UDP, none was acknowledged for
    /// [`PROOF_WAIT`], and none ever was on this connection: the path is blocked.
    fn check_proof(&self, since: &mut Option<Instant>) -> Result<()> {
        let sent = lock(&self.path.sender).sent_through();
        let received = self.m.received.load(Ordering::Acquire);
        if !self.auto || received >= self.path.first || sent < self.path.first {
            *since = None;
            return Ok(());
        }
        if since.get_or_insert_with(Instant::now).elapsed() > PROOF_WAIT {
            return Err(anyhow::Error::new(UdpBlocked));
        }
        Ok(())
    }

    /// Sleeps until the sender may transmit again, a NAK came, the journal grew, or a
    /// `sent_through` is due to be told.
    fn wait(&self, more_records: bool, sent_pending: bool, limit: u64) {
        let wakeup = lock(&self.path.sender).next_wakeup();
        let now = self.path.now_us();
        let queued = !lock(&self.path.gone).is_empty();
        let timeout = match wakeup {
            _ if queued => return,
            Some(at) if at <= now => return,
            // Paced: sleep at least `PACE_TICK`, so each wake-up sends a batch (the bucket's
            // burst holds it) instead of one datagram.
            Some(at) => {
                Duration::from_micros(at - now).clamp(PACE_TICK, Duration::from_millis(100))
            }
            None if more_records && lock(self.sender).may_send() => {
                // Offers were refused (queue full) or the window is open with records left:
                // the queue drains as datagrams go out.
                Duration::from_millis(1)
            }
            None => Duration::from_millis(100),
        };
        // A `sent_through` not told yet goes out once `SENT_EVERY` passed.
        let timeout = if sent_pending {
            timeout.min(SENT_EVERY)
        } else {
            timeout
        };
        let p = lock(&self.vol.progress);
        if self.path.wake.swap(false, Ordering::AcqRel)
            || p.durable_seq.min(p.settled_seq) != limit
            || p.stopping
        {
            return;
        }
        let _ = self.vol.changed.wait_timeout(p, timeout);
    }
}
