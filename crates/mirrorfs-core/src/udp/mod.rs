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

pub mod control;
mod rate;
pub mod receiver;
pub mod record;
pub mod sender;

#[cfg(test)]
mod tests;

pub use control::{ControlConfig, ControlStats, RateControl, RateMode};
pub use receiver::{ReceiverConfig, ReceiverStats, UdpReceiver};
pub use record::{decode_record, record_body, take_batch};
pub use sender::{NakOutcome, OfferError, SenderConfig, SenderStats, UdpSender};

/// One entry of a NAK: a whole record, or the bytes `[from, to)` of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nak {
    pub seq: u64,
    pub range: Option<(u32, u32)>,
}

/// Bytes of one NAK entry on the control connection.
pub const NAK_ENTRY_LEN: usize = 16;
/// The most entries one NAK message carries.
pub const NAK_ENTRIES_MAX: usize = 1_024;

/// Why NAK bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NakError {
    #[error("length does not match the entry count, or more than {NAK_ENTRIES_MAX} entries")]
    Length,
    #[error("an entry names record 0 or an empty byte range")]
    Entry,
}

/// The body of a NAK message (layout: `docs/protocol.md`, "UDP data path: the stream"): a u16
/// count, then per entry the seq (u64) and the range's from and to (u32 each; both 0: the whole
/// record), big-endian. Entries past `NAK_ENTRIES_MAX` are left for the next NAK.
pub fn encode_naks(naks: &[Nak]) -> Vec<u8> {
    let naks = &naks[..naks.len().min(NAK_ENTRIES_MAX)];
    let mut v = Vec::with_capacity(2 + NAK_ENTRY_LEN * naks.len());
    v.extend_from_slice(&(naks.len() as u16).to_be_bytes());
    for n in naks {
        let (from, to) = n.range.unwrap_or((0, 0));
        v.extend_from_slice(&n.seq.to_be_bytes());
        v.extend_from_slice(&from.to_be_bytes());
        v.extend_from_slice(&to.to_be_bytes());
    }
    v
}

/// Parses and checks a NAK body.
pub fn decode_naks(b: &[u8]) -> Result<Vec<Nak>, NakError> {
    let count = b.get(..2).ok_or(NakError::Length)?;
    let count = usize::from(u16::from_be_bytes([count[0], count[1]]));
    if count > NAK_ENTRIES_MAX || b.len() != 2 + NAK_ENTRY_LEN * count {
        return Err(NakError::Length);
    }
    b[2..].chunks_exact(NAK_ENTRY_LEN).map(decode_nak).collect()
}

fn decode_nak(e: &[u8]) -> Result<Nak, NakError> {
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&e[..8]);
    let seq = u64::from_be_bytes(seq);
    let from = u32::from_be_bytes([e[8], e[9], e[10], e[11]]);
    let to = u32::from_be_bytes([e[12], e[13], e[14], e[15]]);
    let range = match (from, to) {
        (0, 0) => None,
        (f, t) if f < t => Some((f, t)),
        _ => return Err(NakError::Entry),
    };
    if seq == 0 {
        return Err(NakError::Entry);
    }
    Ok(Nak { seq, range })
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
