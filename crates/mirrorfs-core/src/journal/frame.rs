//! On-disk framing of journal records. The byte layout is documented in `docs/journal.md`.
//!
//! ```text
//! segment header (32 bytes)
//!   0  [u8; 8]  magic "MFSJRNL1"
//!   8  u32      format version (2; 1 is still read)
//!  12  u32      crc32c of bytes 0..12 and 16..32
//!  16  u64      first_seq: the seq of the segment's first record
//!  24  u64      reserved, zero
//! record frame (32-byte header + body + zero padding to a multiple of 8)
//!   0  u32      magic 0x4A52464D ("MFRJ" little-endian)
//!   4  u32      body length in bytes
//!   8  u32      crc32c of bytes 0..8, 12..32 and the body
//!  12  u8       op kind
//!  13  u8       flags: bit 0 = applied from the peer writable site (`Origin::Peer`); others zero
//!  14  [u8; 2]  reserved, zero
//!  16  u64      seq
//!  24  u64      synced_to: segment offset known durable when this record was written
//!  32  ...      body (see codec.rs), then 0..7 zero bytes of padding
//! ```

use crate::codec::{self, DecodeError};
use crate::op::{Op, Record, WRITE_BYTES_MAX};

pub const SEGMENT_MAGIC: [u8; 8] = *b"MFSJRNL1";
/// The segment format this build writes. 2: its frames may carry flags (byte 13). A build from
/// before the flags knows only 1 and took a flagged frame for a torn tail (byte 13 was reserved),
/// cutting it; it refuses a version-2 segment instead, naming the version (`docs/journal.md`).
pub const SEGMENT_VERSION: u32 = 2;
/// The segment formats this build reads. 1: written before the flags; the journal never appends
/// into one (`Journal::open` continues in a new version-2 segment).
pub const SEGMENT_VERSIONS_READ: &[u32] = &[1, SEGMENT_VERSION];
pub const SEGMENT_HEADER_BYTES: usize = 32;
pub const FRAME_MAGIC: u32 = 0x4A52_464D;
pub const FRAME_HEADER_BYTES: usize = 32;
/// Frame flag: the record is a change of the peer writable site applied here (issue 7,
/// `docs/protocol.md` "No echo"). Durable with the record itself, covered by its checksum.
pub const FLAG_FROM_PEER: u8 = 1;
/// Every flag this build knows; a frame with another bit set is refused (`FrameError::Flags`).
pub const FLAGS_KNOWN: u8 = FLAG_FROM_PEER;

/// Where a journal record's change was made: at this site, or at the peer writable site whose
/// stream this site applies (then the link to the peer never sends it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    #[default]
    Local,
    Peer,
}

impl Origin {
    pub fn flags(self) -> u8 {
        match self {
            Origin::Local => 0,
            Origin::Peer => FLAG_FROM_PEER,
        }
    }

    /// The origin a frame's (known) flags say.
    pub fn of_flags(flags: u8) -> Origin {
        if flags & FLAG_FROM_PEER != 0 {
            Origin::Peer
        } else {
            Origin::Local
        }
    }
}

/// Largest body accepted: a maximal write plus its path and fixed fields.
pub const BODY_BYTES_MAX: usize = WRITE_BYTES_MAX + crate::path::PATH_BYTES_MAX + 8192;

pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    encode_segment_header_version(first_seq, SEGMENT_VERSION)
}

/// The header of a segment of format `version` (tests make the former formats with it).
pub(crate) fn encode_segment_header_version(
    first_seq: u64,
    version: u32,
) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[0..12]), &h[16..32]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentHeaderError {
    #[error("segment is shorter than its header")]
    Short,
    #[error("segment header has the wrong magic bytes (not a mirrorfs journal segment)")]
    Magic,
    #[error(
        "segment format version {found} is not supported by this build (supports {})",
        versions_list(supported)
    )]
    Version {
        found: u32,
        supported: &'static [u32],
    },
    #[error("segment header checksum mismatch")]
    Checksum,
}

fn versions_list(versions: &[u32]) -> String {
    let v: Vec<String> = versions.iter().map(u32::to_string).collect();
    v.join(" and ")
}

/// A valid segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The seq of the segment's first record.
    pub first_seq: u64,
    /// Its format ([`SEGMENT_VERSIONS_READ`]).
    pub version: u32,
}

/// Parses a segment header of a format this build reads.
pub fn decode_segment_header(h: &[u8]) -> Result<SegmentHeader, SegmentHeaderError> {
    decode_segment_header_reading(h, SEGMENT_VERSIONS_READ)
}

/// Parses a segment header of one of the formats `supported` (a build's [`SEGMENT_VERSIONS_READ`]).
pub fn decode_segment_header_reading(
    h: &[u8],
    supported: &'static [u32],
) -> Result<SegmentHeader, SegmentHeaderError> {
    if h.len() < SEGMENT_HEADER_BYTES {
        return Err(SegmentHeaderError::Short);
    }
    if h[0..8] != SEGMENT_MAGIC {
        return Err(SegmentHeaderError::Magic);
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[0..12]), &h[16..32]);
    if u32_at(h, 12) != crc {
        return Err(SegmentHeaderError::Checksum);
    }
    let version = u32_at(h, 8);
    if !supported.contains(&version) {
        return Err(SegmentHeaderError::Version {
            found: version,
            supported,
        });
    }
    Ok(SegmentHeader {
        first_seq: u64_at(h, 16),
        version,
    })
}

/// A record frame ready to be written: `head` (header and the op's head), then `tail` (a write's
/// data, borrowed), then `padding` zero bytes.
pub struct EncodedFrame<'a> {
    pub head: Vec<u8>,
    pub tail: &'a [u8],
    pub padding: usize,
}

impl EncodedFrame<'_> {
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len() + self.padding
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

pub const ZERO_PAD: [u8; 8] = [0u8; 8];

pub const fn padded(len: usize) -> usize {
    (len + 7) & !7
}

/// Encodes `op` as the frame of record `seq` (no flags: a local record, and every record on
/// the wire).
pub fn encode_frame(seq: u64, op: &Op, synced_to: u64) -> EncodedFrame<'_> {
    encode_frame_from(seq, op, synced_to, Origin::Local)
}

/// Encodes `op` as the frame of record `seq` made at `origin`.
pub fn encode_frame_from(seq: u64, op: &Op, synced_to: u64, origin: Origin) -> EncodedFrame<'_> {
    let mut head = Vec::with_capacity(FRAME_HEADER_BYTES + 64);
    head.resize(FRAME_HEADER_BYTES, 0);
    codec::encode_body_head(op, &mut head);
    let tail = codec::body_tail(op);
    let body_len = head.len() - FRAME_HEADER_BYTES + tail.len();
    head[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    head[4..8].copy_from_slice(&(body_len as u32).to_le_bytes());
    head[12] = op.kind();
    head[13] = origin.flags();
    head[16..24].copy_from_slice(&seq.to_le_bytes());
    head[24..32].copy_from_slice(&synced_to.to_le_bytes());
    let mut crc = crc32c::crc32c(&head[0..8]);
    crc = crc32c::crc32c_append(crc, &head[12..]);
    crc = crc32c::crc32c_append(crc, tail);
    head[8..12].copy_from_slice(&crc.to_le_bytes());
    let total = FRAME_HEADER_BYTES + body_len;
    EncodedFrame {
        head,
        tail,
        padding: padded(total) - total,
    }
}

/// What a frame at some offset turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameParse {
    /// A valid record; `len` is the padded length of the frame.
    Record {
        record: Record,
        len: usize,
        synced_to: u64,
        /// Known flags only (`FLAGS_KNOWN`): others are `FrameError::Flags`.
        flags: u8,
    },
    /// The buffer ends before the frame does: read more (or, at the end of the file, a torn tail).
    Incomplete { needed: usize },
    /// Not a valid frame.
    Invalid(FrameError),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("bad frame magic")]
    Magic,
    #[error("frame body of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("frame checksum mismatch")]
    Checksum,
    #[error("frame reserved bytes are not zero")]
    Reserved,
    #[error("frame flags {0:#04x} are not known to this build")]
    Flags(u8),
    #[error("frame body does not decode: {0}")]
    Body(#[from] DecodeError),
}

/// Parses the frame at the start of `buf`. Checks magic, bound and checksum before decoding.
pub fn parse_frame(buf: &[u8]) -> FrameParse {
    if buf.len() < FRAME_HEADER_BYTES {
        return FrameParse::Incomplete {
            needed: FRAME_HEADER_BYTES,
        };
    }
    if u32_at(buf, 0) != FRAME_MAGIC {
        return FrameParse::Invalid(FrameError::Magic);
    }
    let body_len = u32_at(buf, 4) as usize;
    if body_len > BODY_BYTES_MAX {
        return FrameParse::Invalid(FrameError::TooLarge(body_len));
    }
    let total = FRAME_HEADER_BYTES + body_len;
    if buf.len() < padded(total) {
        return FrameParse::Incomplete {
            needed: padded(total),
        };
    }
    let mut crc = crc32c::crc32c(&buf[0..8]);
    crc = crc32c::crc32c_append(crc, &buf[12..total]);
    if crc != u32_at(buf, 8) {
        return FrameParse::Invalid(FrameError::Checksum);
    }
    if buf[14..16] != [0, 0] {
        return FrameParse::Invalid(FrameError::Reserved);
    }
    let flags = buf[13];
    if flags & !FLAGS_KNOWN != 0 {
        return FrameParse::Invalid(FrameError::Flags(flags));
    }
    let seq = u64_at(buf, 16);
    let synced_to = u64_at(buf, 24);
    match codec::decode_body(buf[12], &buf[FRAME_HEADER_BYTES..total]) {
        Ok(op) => FrameParse::Record {
            record: Record { seq, op },
            len: padded(total),
            synced_to,
            flags,
        },
        Err(e) => FrameParse::Invalid(FrameError::Body(e)),
    }
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Writes a whole frame into a contiguous vector (tests, and small records).
pub fn frame_to_vec(f: &EncodedFrame<'_>) -> Vec<u8> {
    let mut v = Vec::with_capacity(f.len());
    v.extend_from_slice(&f.head);
    v.extend_from_slice(f.tail);
    v.extend_from_slice(&ZERO_PAD[..f.padding]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::tests::arb_op;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn frame_roundtrip(op in arb_op(), seq in any::<u64>(), synced in any::<u64>()) {
            let f = encode_frame(seq, &op, synced);
            let v = frame_to_vec(&f);
            prop_assert_eq!(v.len() % 8, 0);
            match parse_frame(&v) {
                FrameParse::Record { record, len, synced_to, flags } => {
                    prop_assert_eq!(record, Record { seq, op });
                    prop_assert_eq!(flags, 0);
                    prop_assert_eq!(len, v.len());
                    prop_assert_eq!(synced_to, synced);
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }

        #[test]
        fn any_bit_flip_is_caught(op in arb_op(), bit in any::<prop::sample::Index>()) {
            let f = encode_frame(7, &op, 0);
            let mut v = frame_to_vec(&f);
            let body_end = FRAME_HEADER_BYTES + u32_at(&v, 4) as usize;
            let i = bit.index(body_end * 8);
            v[i / 8] ^= 1 << (i % 8);
            let ok = matches!(parse_frame(&v), FrameParse::Record { .. });
            prop_assert!(!ok, "bit flip undetected");
        }
    }

    /// The origin travels in the frame's flags byte, under its checksum; a flag this build
    /// does not know is refused, not read as a local record.
    #[test]
    fn the_origin_is_in_the_frame_and_unknown_flags_are_refused() {
        let op = Op::Abort { seq: 3 };
        let v = frame_to_vec(&encode_frame_from(4, &op, 0, Origin::Peer));
        match parse_frame(&v) {
            FrameParse::Record { flags, record, .. } => {
                assert_eq!(Origin::of_flags(flags), Origin::Peer);
                assert_eq!(
                    record,
                    Record {
                        seq: 4,
                        op: op.clone()
                    }
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let local = frame_to_vec(&encode_frame(4, &op, 0));
        assert!(matches!(
            parse_frame(&local),
            FrameParse::Record { flags: 0, .. }
        ));
        assert_eq!(local[13], 0, "a local record's frame is the former layout");
        // An unknown flag with a checksum that covers it.
        let mut bad = v.clone();
        bad[13] = 0x03;
        let body_end = FRAME_HEADER_BYTES + u32_at(&bad, 4) as usize;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bad[0..8]), &bad[12..body_end]);
        bad[8..12].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            parse_frame(&bad),
            FrameParse::Invalid(FrameError::Flags(0x03))
        );
        // The flag is covered by the checksum.
        let mut flipped = v;
        flipped[13] = 0;
        assert_eq!(
            parse_frame(&flipped),
            FrameParse::Invalid(FrameError::Checksum)
        );
    }

    #[test]
    fn segment_header_roundtrip() {
        let h = encode_segment_header(42);
        assert_eq!(
            decode_segment_header(&h),
            Ok(SegmentHeader {
                first_seq: 42,
                version: SEGMENT_VERSION
            })
        );
        assert_eq!(&h[8..12], &2u32.to_le_bytes());
        let mut bad = h;
        bad[20] ^= 1;
        assert_eq!(
            decode_segment_header(&bad),
            Err(SegmentHeaderError::Checksum)
        );
        assert_eq!(
            decode_segment_header(&h[..10]),
            Err(SegmentHeaderError::Short)
        );
    }

    /// Version 1 (before the frame's flags) is still read; a reader that knows only 1, as
    /// builds before the flags do, refuses a version-2 header with an error naming both; an
    /// unknown version is refused by this build with the versions it reads.
    #[test]
    fn segment_versions_read_and_refused() {
        let v1 = encode_segment_header_version(9, 1);
        assert_eq!(
            decode_segment_header(&v1),
            Ok(SegmentHeader {
                first_seq: 9,
                version: 1
            })
        );
        let v2 = encode_segment_header(9);
        let older = decode_segment_header_reading(&v2, &[1]);
        assert_eq!(
            older,
            Err(SegmentHeaderError::Version {
                found: 2,
                supported: &[1]
            })
        );
        assert_eq!(
            older.map_err(|e| e.to_string()),
            Err("segment format version 2 is not supported by this build (supports 1)".into()),
            "the message builds before the flags print"
        );
        assert_eq!(
            decode_segment_header_reading(&v1, &[1]).map(|h| h.version),
            Ok(1)
        );
        let v3 = encode_segment_header_version(9, 3);
        let e = decode_segment_header(&v3).expect_err("unknown version");
        assert_eq!(
            e.to_string(),
            "segment format version 3 is not supported by this build (supports 1 and 2)"
        );
    }
}
