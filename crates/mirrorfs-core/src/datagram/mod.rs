//! The packets of the UDP data path (issue 8), sans I/O: how a journal record travels as
//! authenticated, encrypted datagrams beside the TLS control connection, and what a receiver
//! accepts. Not wired to a socket yet; the layouts are in `docs/protocol.md` ("UDP data path").
//!
//! - **Sealing** (`Sealer`, `Opener`): every packet is AES-256-GCM with a key of its direction,
//!   taken from the TLS session's exporter (RFC 5705), so the packets are as secret and as
//!   authentic as the control connection. The nonce is the packet number, strictly increasing
//!   from 1 per key and never reused; the 16-byte header is authenticated with the body. A
//!   packet that is malformed, of another session, fails authentication, or repeats or lags a
//!   number by more than the replay window is dropped and counted (`Dropped`), never handed on.
//! - **Fragments** (`fragment`): a record is cut into data packets of bounded size, each saying
//!   which record, at which offset, of what total length; the `Reassembler` puts records back
//!   together in journal order within a bounded window and says what is missing (for the NAKs
//!   sent on the control connection).

pub mod fragment;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

/// Version byte of every packet.
pub const VERSION: u8 = 1;
/// Header bytes (authenticated, not encrypted): version, kind, reserved, session, packet number.
pub const HEADER_LEN: usize = 16;
/// The AEAD tag after the ciphertext.
pub const TAG_LEN: usize = 16;
/// The largest datagram accepted: the largest UDP payload over IPv4.
pub const DATAGRAM_MAX: usize = 65_507;
/// Packets older than this many numbers behind the newest are dropped as replays.
pub const REPLAY_WINDOW: u64 = 4_096;
/// Key length (AES-256).
pub const KEY_LEN: usize = 32;

/// What a packet carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A fragment of a journal record (`fragment::Fragment`).
    Data = 1,
    /// A forward-error-correction repair packet (its body is the FEC layer's).
    Repair = 2,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Data),
            2 => Some(Kind::Repair),
            _ => None,
        }
    }
}

/// Why a received packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Shorter than a header and a tag, longer than a datagram, or an unknown version or kind.
    Malformed,
    /// Another session's packet (an old link, or a stray).
    OtherSession,
    /// The tag does not match: forged, corrupted, or under another key.
    Unauthentic,
    /// A number already seen, or too far behind the newest.
    Replayed,
}

/// Dropped packets by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DropCounts {
    pub malformed: u64,
    pub other_session: u64,
    pub unauthentic: u64,
    pub replayed: u64,
}

impl DropCounts {
    fn count(&mut self, d: Dropped) {
        match d {
            Dropped::Malformed => self.malformed += 1,
            Dropped::OtherSession => self.other_session += 1,
            Dropped::Unauthentic => self.unauthentic += 1,
            Dropped::Replayed => self.replayed += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.malformed + self.other_session + self.unauthentic + self.replayed
    }
}

fn key(bytes: &[u8; KEY_LEN]) -> LessSafeKey {
    // AES-256 takes any 32 bytes: `new` fails only on a wrong length, which the type rules out.
    match UnboundKey::new(&AES_256_GCM, bytes) {
        Ok(k) => LessSafeKey::new(k),
        Err(_) => unreachable!("a 32-byte key is a valid AES-256 key"),
    }
}

fn nonce(pn: u64) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&pn.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn header(kind: Kind, session: u32, pn: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = VERSION;
    h[1] = kind as u8;
    h[4..8].copy_from_slice(&session.to_be_bytes());
    h[8..16].copy_from_slice(&pn.to_be_bytes());
    h
}

/// The sending side of one direction: numbers and seals packets.
pub struct Sealer {
    key: LessSafeKey,
    session: u32,
    next_pn: u64,
}

impl Sealer {
    pub fn new(key_bytes: &[u8; KEY_LEN], session: u32) -> Sealer {
        Sealer {
            key: key(key_bytes),
            session,
            next_pn: 1,
        }
    }

    /// The number the next packet gets.
    pub fn next_pn(&self) -> u64 {
        self.next_pn
    }

    /// One datagram carrying `body`, and its packet number. `None` once the numbers would run
    /// out (2⁶⁴: never in practice) or the body is too large for a datagram: a nonce is never
    /// reused.
    pub fn seal(&mut self, kind: Kind, body: &[u8]) -> Option<(u64, Vec<u8>)> {
        if HEADER_LEN + body.len() + TAG_LEN > DATAGRAM_MAX || self.next_pn == u64::MAX {
            return None;
        }
        let pn = self.next_pn;
        self.next_pn += 1;
        let h = header(kind, self.session, pn);
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
        out.extend_from_slice(&h);
        out.extend_from_slice(body);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(pn), Aad::from(h), &mut out[HEADER_LEN..])
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some((pn, out))
    }
}

/// The receiving side of one direction: checks and opens packets, keeps the replay window.
pub struct Opener {
    key: LessSafeKey,
    session: u32,
    /// The newest number accepted.
    newest: u64,
    /// Bit i set: number `newest - i` was accepted (i < REPLAY_WINDOW).
    seen: Vec<u64>,
    pub dropped: DropCounts,
}

/// An opened packet.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    pub kind: Kind,
    pub pn: u64,
    pub body: Vec<u8>,
}

impl Opener {
    pub fn new(key_bytes: &[u8; KEY_LEN], session: u32) -> Opener {
        Opener {
            key: key(key_bytes),
            session,
            newest: 0,
            seen: vec![0; (REPLAY_WINDOW / 64) as usize],
            dropped: DropCounts::default(),
        }
    }

    /// Opens a received datagram; a dropped one is counted.
    pub fn open(&mut self, datagram: &[u8]) -> Result<Opened, Dropped> {
        let r = self.try_open(datagram);
        if let Err(d) = r {
            self.dropped.count(d);
        }
        r
    }

    fn try_open(&mut self, d: &[u8]) -> Result<Opened, Dropped> {
        if d.len() < HEADER_LEN + TAG_LEN || d.len() > DATAGRAM_MAX || d[0] != VERSION {
            return Err(Dropped::Malformed);
        }
        let kind = Kind::from_u8(d[1]).ok_or(Dropped::Malformed)?;
        if d[2..4] != [0, 0] {
            return Err(Dropped::Malformed);
        }
        let session = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
        if session != self.session {
            return Err(Dropped::OtherSession);
        }
        let mut pn_bytes = [0u8; 8];
        pn_bytes.copy_from_slice(&d[8..16]);
        let pn = u64::from_be_bytes(pn_bytes);
        // Checked before the (costlier) decryption, and marked only after it succeeded, so a
        // forged packet cannot burn a number.
        if pn == 0 || self.is_replay(pn) {
            return Err(Dropped::Replayed);
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&d[..HEADER_LEN]);
        let mut body = d[HEADER_LEN..].to_vec();
        let plain_len = self
            .key
            .open_in_place(nonce(pn), Aad::from(h), &mut body)
            .map_err(|_| Dropped::Unauthentic)?
            .len();
        body.truncate(plain_len);
        self.mark(pn);
        Ok(Opened { kind, pn, body })
    }

    fn is_replay(&self, pn: u64) -> bool {
        if pn > self.newest {
            return false;
        }
        let age = self.newest - pn;
        age >= REPLAY_WINDOW || self.bit(age)
    }

    fn bit(&self, age: u64) -> bool {
        self.seen[(age / 64) as usize] & (1 << (age % 64)) != 0
    }

    fn mark(&mut self, pn: u64) {
        if pn > self.newest {
            let shift = pn - self.newest;
            self.shift(shift);
            self.newest = pn;
        }
        let age = self.newest - pn;
        self.seen[(age / 64) as usize] |= 1 << (age % 64);
    }

    /// Ages every bit by `by` numbers (bits older than the window fall off).
    fn shift(&mut self, by: u64) {
        if by >= REPLAY_WINDOW {
            self.seen.iter_mut().for_each(|w| *w = 0);
            return;
        }
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        let n = self.seen.len();
        for i in (0..n).rev() {
            let hi = if i >= words { self.seen[i - words] } else { 0 };
            let lo = if bits > 0 && i > words {
                self.seen[i - words - 1] >> (64 - bits)
            } else {
                0
            };
            self.seen[i] = if bits > 0 { (hi << bits) | lo } else { hi };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: [u8; KEY_LEN] = [7; KEY_LEN];

    #[test]
    fn a_sealed_packet_opens_once_and_only_under_its_key_and_session() {
        let mut s = Sealer::new(&K, 9);
        let (pn, d) = s.seal(Kind::Data, b"record bytes").expect("seal");
        assert_eq!(pn, 1);
        let mut o = Opener::new(&K, 9);
        let got = o.open(&d).expect("open");
        assert_eq!(
            got,
            Opened {
                kind: Kind::Data,
                pn: 1,
                body: b"record bytes".to_vec()
            }
        );
        assert_eq!(o.open(&d), Err(Dropped::Replayed), "the same packet again");
        assert_eq!(
            Opener::new(&[8; KEY_LEN], 9).open(&d),
            Err(Dropped::Unauthentic)
        );
        assert_eq!(Opener::new(&K, 10).open(&d), Err(Dropped::OtherSession));
        assert_eq!(o.dropped.replayed, 1);
    }

    #[test]
    fn any_flipped_bit_is_caught() {
        let mut s = Sealer::new(&K, 1);
        let (_, d) = s.seal(Kind::Repair, &[0x55; 100]).expect("seal");
        for i in 0..d.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = d.clone();
                bad[i] ^= bit;
                let r = Opener::new(&K, 1).open(&bad);
                assert!(r.is_err(), "byte {i} bit {bit:#x} flipped was accepted");
            }
        }
    }

    #[test]
    fn short_long_and_unknown_packets_are_malformed() {
        let mut o = Opener::new(&K, 1);
        assert_eq!(o.open(&[]), Err(Dropped::Malformed));
        assert_eq!(
            o.open(&[VERSION; HEADER_LEN + TAG_LEN - 1]),
            Err(Dropped::Malformed)
        );
        assert_eq!(
            o.open(&vec![VERSION; DATAGRAM_MAX + 1]),
            Err(Dropped::Malformed)
        );
        let mut s = Sealer::new(&K, 1);
        let (_, mut d) = s.seal(Kind::Data, b"x").expect("seal");
        d[1] = 9;
        assert_eq!(o.open(&d), Err(Dropped::Malformed));
        assert_eq!(o.dropped.malformed, 4);
        assert!(
            s.seal(Kind::Data, &vec![0; DATAGRAM_MAX]).is_none(),
            "too large to send"
        );
    }

    #[test]
    fn the_replay_window_takes_late_packets_once_and_drops_older_ones() {
        let mut s = Sealer::new(&K, 1);
        let packets: Vec<Vec<u8>> = (0..REPLAY_WINDOW + 100)
            .map(|_| s.seal(Kind::Data, b"p").expect("seal").1)
            .collect();
        let mut o = Opener::new(&K, 1);
        // The newest first, then the rest in reverse: all inside the window open once.
        let last = packets.len() - 1;
        assert!(o.open(&packets[last]).is_ok());
        for i in (0..last).rev() {
            let age = (last - i) as u64;
            let r = o.open(&packets[i]);
            if age < REPLAY_WINDOW {
                assert!(r.is_ok(), "packet {i} (age {age}) inside the window");
                assert_eq!(o.open(&packets[i]), Err(Dropped::Replayed));
            } else {
                assert_eq!(r, Err(Dropped::Replayed), "packet {i} (age {age})");
            }
        }
    }

    #[test]
    fn the_window_slides_across_word_boundaries() {
        let mut s = Sealer::new(&K, 1);
        let packets: Vec<Vec<u8>> = (0..1_000)
            .map(|_| s.seal(Kind::Data, b"p").expect("seal").1)
            .collect();
        let mut o = Opener::new(&K, 1);
        // Every other packet, then the skipped ones: each opens exactly once.
        for p in packets.iter().step_by(2) {
            assert!(o.open(p).is_ok());
        }
        for p in packets.iter().skip(1).step_by(2) {
            assert!(o.open(p).is_ok());
        }
        for p in &packets {
            assert_eq!(o.open(p), Err(Dropped::Replayed));
        }
    }
}
