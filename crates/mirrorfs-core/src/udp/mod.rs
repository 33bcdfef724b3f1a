//! The UDP data path's stream (issue 8), sans I/O: journal records in at the primary, the same
//! records out at the mirror, in journal order, over sealed datagrams with forward error
//! correction, and NAKs for what FEC could not rebuild. No sockets and no clock: the shell hands
//! datagrams to a socket, carries NAKs and positions on the TLS control connection, and passes
//! the time in (microseconds of a monotonic clock).
//!
//! ```text
//!  primary (UdpSender)                                      mirror (UdpReceiver)
//!
//!  offer(seq, record) ──▶ store (bounded, for NAKs)
//!        │ cut ▼
//!  fresh queue (bounded: Full) ─┐                       on_datagram(bytes)
//!  again queue (NAKed, bounded) ┤ poll_transmit(now)          │ Opener: drop + count
//!                               ▼   token bucket              ▼ (malformed, other session,
//!          Sealer (data, pn) ──▶ FecEncoder ──▶ repairs       │  unauthentic, replayed)
//!                │                    │   (Sealer, repair)    ├─ data ──▶ FecDecoder ─┐
//!                ▼                    ▼                       ├─ repair ─▶ FecDecoder ┤ rebuilt
//!           datagram ═══════ UDP ═══ datagram ════════════════╛                      ▼
//!                                                            data fragment ──▶ Reassembler
//!  sent_through() ◀─ data and repairs handed out                                      │
//!  on_nak(naks) ◀═══════════ TLS control ══════════════════ naks(now) ◀─ missing ◀────┤
//!   └─ Gone(seq): resend(seq, record) from the journal      note_sent(seq) ◀─ hint    ▼
//!  on_delivered(seq) ◀══════ TLS control ══════════════════ delivered ◀── pop_record()
//! ```
//!
//! - A record's fragments are sealed, numbered and FEC-encoded when they are handed out, not
//!   when they are queued, so packet numbers go onto the wire in order (the receiver's replay
//!   window never sees a queue's worth of reordering) and retransmissions can go first. A data
//!   packet's FEC seq is its packet number (see `fec`).
//! - Repairs go out right after the data packet that completes them, before any other data.
//!   When nothing is left to send for `flush_idle_us`, the encoder is flushed, so the tail of a
//!   burst is protected and `sent_through` reaches the last record.
//! - `sent_through` is the highest seq whose data packets and every repair covering them were
//!   handed out: what `--ack network` waits for.
//! - The receiver asks again (NAK) for what is missing below the highest seq it knows of (from
//!   fragments, and from `note_sent`, the sender's `sent_through` carried on the control
//!   connection, so a lost tail is asked for too); a record is asked for at most once per
//!   `nak_interval_us`, and only once it has been missing for `nak_delay_us` (time for
//!   reordering and FEC).
//!
//! Layouts of the control messages and every limit: `docs/protocol.md`, "UDP data path: the
//! stream".

pub mod receiver;
mod rate;
pub mod sender;

#[cfg(test)]
mod tests;

pub use receiver::{ReceiverConfig, ReceiverStats, UdpReceiver};
pub use sender::{NakOutcome, OfferError, SenderConfig, SenderStats, UdpSender};

/// One entry of a NAK: a whole record, or the bytes `[from, to)` of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nak {
    pub seq: u64,
    pub range: Option<(u32, u32)>,
}

impl Nak {
    /// Whether `[offset, offset + len)` of record `seq` overlaps what this entry asks for.
    pub fn covers(&self, seq: u64, offset: u32, len: u32) -> bool {
        match self.range {
            _ if seq != self.seq => false,
            None => true,
            // An empty fragment (of an empty record) is asked for by any range of its record.
            Some((from, to)) => offset < to && (offset + len > from || len == 0),
        }
    }
}
