//! The replication wire protocol (version 4): message types, their byte layout, and a bounded,
//! validating, incremental decoder. No I/O: bytes in, messages out. The layout is documented in
//! `docs/protocol.md`.
//!
//! ```text
//! wire frame (16-byte header + body)
//!   0  [u8; 4]  magic "MFSW"
//!   4  u8       message type
//!   5  u8       flags: bit 0 = body is zstd-compressed; other bits zero
//!   6  u16      reserved, zero
//!   8  u32      body length on the wire (at most WIRE_BODY_MAX)
//!  12  u32      crc32c of bytes 0..12 and the body as sent
//!  16  ...      body
//! ```
//!
//! Records travel as the journal's own record frames (`journal::frame`), each with its own
//! checksum and seq, inside a `Records` message; the receiver checks that seqs are consecutive.
//! Reintegration (a failback onto a promoted copy, version 4) carries the old primary's journal
//! tail (`Tail`) and its entries (`Entry`) in the same record frames.

use crate::history::{Generation, HISTORY_MAX};
use crate::journal::frame::{
    encode_frame, parse_frame, FrameError, FrameParse, BODY_BYTES_MAX, FRAME_HEADER_BYTES, ZERO_PAD,
};
use crate::op::{Op, Record};
use crate::path::RelPath;
use crate::verify::incremental::Scope;
use crate::verify::{Entry as ScanEntry, Kind as ScanKind};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 4;
/// Magic bytes that open every wire frame.
pub const WIRE_MAGIC: [u8; 4] = *b"MFSW";
/// Size of the wire frame header.
pub const WIRE_HEADER_BYTES: usize = 16;
/// Largest body (compressed or not) a peer may send: one maximal record plus the batch header.
pub const WIRE_BODY_MAX: usize = BODY_BYTES_MAX + FRAME_HEADER_BYTES + 64;
/// A `Records` batch is closed once it holds this many bytes of frames (a single larger record
/// travels alone).
pub const BATCH_BYTES: usize = 1 << 20;
/// Longest text (names, error messages) carried in a message.
pub const TEXT_MAX: usize = 4096;
/// The most items of a `Verify`'s plan, and the most bytes they take (a longer plan: the whole
/// tree is scanned).
pub const VERIFY_PLAN_MAX: usize = 16_384;
pub const VERIFY_PLAN_BYTES_MAX: usize = 512 << 10;

/// Whether `plan` fits in a `Verify` ([`VERIFY_PLAN_MAX`], [`VERIFY_PLAN_BYTES_MAX`]).
pub fn verify_plan_fits(plan: &[(RelPath, Scope)]) -> bool {
    let bytes: usize = plan.iter().map(|(p, _)| 3 + p.as_bytes().len()).sum();
    plan.len() <= VERIFY_PLAN_MAX && bytes <= VERIFY_PLAN_BYTES_MAX
}
/// Flag bit: the body is zstd-compressed.
pub const FLAG_ZSTD: u8 = 1;

/// Message type codes.
pub mod msg_type {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const START: u8 = 3;
    pub const RECORDS: u8 = 4;
    pub const ACK: u8 = 5;
    pub const PING: u8 = 6;
    pub const PONG: u8 = 7;
    pub const ERROR: u8 = 8;
    pub const MANIFEST: u8 = 9;
    pub const MANIFEST_END: u8 = 10;
    pub const DIVERGED: u8 = 11;
    pub const REINTEGRATE: u8 = 12;
    pub const TAIL: u8 = 13;
    pub const FETCH: u8 = 14;
    pub const ENTRY: u8 = 15;
    pub const REINTEGRATED: u8 = 16;
    pub const LEASE_REQUEST: u8 = 17;
    pub const LEASE_RESPONSE: u8 = 18;
    pub const TOKEN_REQUEST: u8 = 19;
    pub const TOKEN_GRANT: u8 = 20;
    pub const TOKEN_ACK: u8 = 21;
    pub const TOKEN_REFUSE: u8 = 22;
    pub const UDP_OFFER: u8 = 23;
    pub const UDP_ACCEPT: u8 = 24;
    pub const UDP_SENT: u8 = 25;
    pub const UDP_NAK: u8 = 26;
    pub const VERIFY: u8 = 27;
    pub const SCAN: u8 = 28;
    pub const SCAN_END: u8 = 29;
    pub const PEER_SEEN: u8 = 30;
    pub const QUORUM_PROBE: u8 = 31;
    pub const QUORUM_ANSWER: u8 = 32;
    pub const LEASE_RELEASE: u8 = 33;
}

/// Block size of the resync's per-file hashes.
pub const RESYNC_BLOCK: u64 = 64 << 10;

/// What a mirror holds at one path, for a block-hash resync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub path: crate::path::RelPath,
    /// 1 regular file, 2 directory, 3 symlink, 4 anything else.
    pub kind: u8,
    pub size: u64,
    /// Regular files: the index of the first block `hashes` covers (a large file's hashes come
    /// in several entries, in order).
    pub first_block: u64,
    /// Regular files: blake3 of each `RESYNC_BLOCK` block from `first_block` on (the file's last
    /// block may be short).
    pub hashes: Vec<[u8; 32]>,
    /// The names of the entry's extended attributes (in the first entry of a file's pieces
    /// only), so the primary can remove those it no longer has.
    pub xattrs: Vec<Vec<u8>>,
}

/// Most hashes one manifest entry carries (8 MiB of hashes, 16 GiB of file).
pub const MANIFEST_HASHES_MAX: usize = 256 << 10;
/// Longest extended attribute name (Linux's `XATTR_NAME_MAX`).
pub const XATTR_NAME_MAX: usize = 255;
/// Most bytes of extended attribute names one manifest entry carries, each counted with a
/// terminating byte as `listxattr` lists them (Linux's `XATTR_LIST_MAX`).
pub const MANIFEST_XATTR_BYTES_MAX: usize = 64 << 10;
/// The most entries in one `Scan` message (the daemon also keeps each under [`BATCH_BYTES`]).
pub const SCAN_ENTRIES_MAX: usize = 4096;
/// The longest symlink target in a `Scan` entry (`PATH_MAX` less its NUL).
pub const SCAN_TARGET_MAX: usize = 4095;

/// A volume's identity: random, made when the primary's state is created.
pub type VolumeId = [u8; 16];

/// What state the mirror's copy is in, as it reports in `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorState {
    /// No state for any volume: an empty directory ready for an initial copy.
    Empty = 0,
    /// A consistent copy of `volume_id` through `applied`.
    Consistent = 1,
    /// An initial copy (sync id in `Welcome`) was interrupted: the tree is a mix.
    Syncing = 2,
    /// The mirror knows its copy cannot be resumed (diverged, or detached for a resync).
    NeedsResync = 3,
}

impl MirrorState {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            0 => MirrorState::Empty,
            1 => MirrorState::Consistent,
            2 => MirrorState::Syncing,
            3 => MirrorState::NeedsResync,
            _ => return Err(WireError::Invalid("unknown mirror state")),
        })
    }
}

/// How the stream starts (`Start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Records from `seq` on continue the mirror's copy.
    Resume = 0,
    /// The mirror must be (or be made) empty; an initial copy with `sync_id` follows as `Sync`
    /// records from `seq` on.
    InitialSync = 1,
    /// The mirror keeps its tree, sends its manifest (per-file block hashes), and receives only
    /// what differs as `Sync` records with `sync_id` from `seq` on.
    Resync = 2,
}

/// Error codes of `Error` messages.
pub mod error_code {
    /// The peer speaks no protocol version we do.
    pub const VERSION: u16 = 1;
    /// The mirror holds a copy of another volume.
    pub const VOLUME: u16 = 2;
    /// The mirror holds a copy of another generation (a promoted copy, say).
    pub const GENERATION: u16 = 3;
    /// A frame failed validation (checksum, bounds, path, sequence).
    pub const BAD_FRAME: u16 = 4;
    /// Another primary is connected to this mirror.
    pub const BUSY: u16 = 5;
    /// The mirror cannot store what it receives (disk full, I/O error).
    pub const STORAGE: u16 = 6;
    /// The mirror was promoted to a primary and accepts no stream.
    pub const PROMOTED: u16 = 7;
    /// The mirror refuses for another reason (the message says why).
    pub const REFUSED: u16 = 8;
    /// The two sides' generation histories diverged: each holds changes the other lacks (the
    /// message says where they part and how many changes each side holds after that).
    pub const DIVERGED: u16 = 9;
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Primary → mirror, first message.
    Hello {
        version: u16,
        volume_id: VolumeId,
        generation: u64,
        /// Oldest seq the primary's journal still holds.
        first_held: u64,
        /// The seq the primary's journal appends next.
        next_seq: u64,
        /// Ask for zstd-compressed bodies in both directions.
        compress: bool,
        /// The primary's name for itself (for logs and status).
        name: String,
        /// The primary's generation history, oldest first (its end is `next_seq - 1`).
        history: Vec<Generation>,
    },
    /// Mirror → primary, the answer to `Hello`.
    Welcome {
        version: u16,
        state: MirrorState,
        /// The volume the mirror holds (zero when `Empty`).
        volume_id: VolumeId,
        generation: u64,
        /// Every record ≤ this is durable in the mirror's journal.
        durable: u64,
        /// Every record ≤ this is applied to the mirror's tree.
        applied: u64,
        /// The interrupted initial copy's id (`Syncing`), else 0.
        sync_id: u32,
        compress: bool,
        /// The history of the mirror's copy, oldest first (empty when `Empty`; its end is
        /// `durable`).
        history: Vec<Generation>,
    },
    /// Primary → mirror: how the stream starts.
    Start {
        mode: StartMode,
        /// The seq of the first record that will follow.
        seq: u64,
        sync_id: u32,
    },
    /// Primary → mirror: consecutive records, and the primary's settled watermark: a record is
    /// final (cannot be followed by its `Abort`) once it is below the watermark's record or equal
    /// to it.
    Records {
        settled: u64,
        records: Vec<Record>,
    },
    /// Mirror → primary: positions, each monotonic.
    Ack {
        received: u64,
        durable: u64,
        applied: u64,
        /// Every record ≤ this is durably applied to the tree.
        checkpoint: u64,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Error {
        code: u16,
        message: String,
    },
    /// Mirror → primary during a resync: part of its manifest.
    Manifest {
        entries: Vec<ManifestEntry>,
    },
    /// Mirror → primary: the manifest is complete (`count` entries in all).
    ManifestEnd {
        count: u64,
    },
    /// Mirror → primary, the answer to `Hello` instead of `Welcome`: the mirror's consistent
    /// copy diverged from the primary's history after the common point, its journal still holds
    /// every record after it, and it offers to reintegrate them (see docs/protocol.md).
    Diverged {
        /// The common point: the last state both sides share.
        common_generation: u64,
        common_seq: u64,
        /// The mirror's last record (its durable position); `common_seq ≤ end`.
        end: u64,
        /// The mirror's history, oldest first (its end is `end`).
        history: Vec<Generation>,
    },
    /// Primary → mirror: send your records `from..=end` (`from` is `common_seq + 1`).
    Reintegrate {
        from: u64,
    },
    /// Mirror → primary: consecutive records of its journal after the common point, `Write`s
    /// without their data (the primary fetches data by name); `last` on the final batch.
    Tail {
        last: bool,
        records: Vec<Record>,
    },
    /// Primary → mirror: send the ops that recreate your current entry at `path`, naming it
    /// `as_path`.
    Fetch {
        id: u32,
        path: RelPath,
        as_path: RelPath,
    },
    /// Mirror → primary: some of the ops answering `Fetch{id}`, in order; `last` on the final
    /// message (an absent entry is one `Entry` with no ops and `last`).
    Entry {
        id: u32,
        last: bool,
        ops: Vec<Op>,
    },
    /// Primary → mirror: everything was applied; mirror → primary: the mirror saved its
    /// diverged changes and marked its copy for a resync. The connection closes after it.
    Reintegrated {
        conflicts: u64,
    },
    /// Site → witness (witness connections only): grant or renew the volume's write lease.
    LeaseRequest(crate::lease::Request),
    /// Witness → site: the answer to `LeaseRequest` (or `LeaseRelease`).
    LeaseResponse(crate::lease::Response),
    /// Site → witness (witness connections only), at a clean stop: give the volume's write
    /// lease back (the same body as `LeaseRequest`; `ttl_ms` and `renewal` are not used). A
    /// witness that predates it closes the connection (unknown message type).
    LeaseRelease(crate::lease::Request),
    /// Either site (two writable sites): a write token message (`core::token`).
    Token(crate::token::TokenMsg),
    /// Either site (two writable sites), before the records it covers: the sender's records
    /// from `from` on were journaled after it had considered the receiver's records through
    /// `through` (`core::reconcile`, the change points of the stream).
    PeerSeen {
        from: u64,
        through: u64,
    },
    /// Primary → mirror, once streaming: records from `first` on may go as UDP datagrams
    /// (`core::udp`) keyed from this TLS session, if the mirror accepts.
    UdpOffer {
        first: u64,
    },
    /// Mirror → primary, the answer to `UdpOffer`: send the datagrams to this UDP port of the
    /// mirror's address; 0: declined, the records stay on this connection.
    UdpAccept {
        port: u16,
    },
    /// Primary → mirror: the UDP sender's `sent_through` (records that exist, so a lost tail is
    /// asked for again).
    UdpSent {
        through: u64,
    },
    /// Mirror → primary: what the UDP receiver asks for again (`udp::encode_naks` layout).
    UdpNak {
        naks: Vec<crate::udp::Nak>,
    },
    /// `mirrorfs verify` → daemon, the first message of a verify connection (instead of
    /// `Hello`): scan your directory and send its entries (`Scan`… then `ScanEnd`). Refused
    /// unless the daemon holds volume `volume_id`; the connection closes after `ScanEnd`.
    Verify {
        volume_id: VolumeId,
        /// Read every file, neither using nor updating the daemon's hash cache.
        no_cache: bool,
        /// An incremental verify: scan only these entries and subtrees
        /// (`core::verify::incremental::plan`), at most [`VERIFY_PLAN_MAX`] of them, in scan
        /// order. `None` (absent on the wire, as an older `verify` sends it): the whole tree.
        plan: Option<Vec<(RelPath, Scope)>>,
    },
    /// Daemon → `mirrorfs verify`: entries of its scan, in `verify::path_order`, strictly
    /// increasing across messages; at most [`SCAN_ENTRIES_MAX`] per message.
    Scan {
        entries: Vec<ScanEntry>,
    },
    /// Daemon → `mirrorfs verify`: the scan is complete.
    ScanEnd {
        /// `Scan` entries sent in all.
        count: u64,
        /// File data read to hash (0 when every hash came from the cache).
        bytes_read: u64,
        /// Files whose hash came from the cache.
        cache_hits: u64,
        /// Every record ≤ this was applied to the directory when the scan began.
        applied: u64,
    },
}

/// Why bytes from a peer were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("bad wire frame magic (is the peer a mirrorfs of a compatible version?)")]
    Magic,
    #[error("wire frame body of {0} bytes exceeds the limit of {max}", max = WIRE_BODY_MAX)]
    TooLarge(usize),
    #[error("wire frame checksum mismatch")]
    Checksum,
    #[error("wire frame has unknown flags or non-zero reserved bytes")]
    Reserved,
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("message body ends early")]
    Truncated,
    #[error("message body has {0} trailing bytes")]
    Trailing(usize),
    #[error("invalid message: {0}")]
    Invalid(&'static str),
    #[error("record {index} of a batch is invalid: {error}")]
    Record { index: usize, error: FrameError },
    #[error("compressed body does not decompress within the limit")]
    Decompress,
    #[error("records are not consecutive: expected seq {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
}

struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn history(&mut self, h: &[Generation]) {
        let h = &h[h.len().saturating_sub(HISTORY_MAX)..];
        self.u8(h.len() as u8);
        for g in h {
            self.u64(g.number);
            self.u64(g.id);
            self.u64(g.start);
        }
    }
    /// Record frames, preceded by their count u32.
    fn records<'r>(&mut self, records: impl ExactSizeIterator<Item = (u64, &'r Op)>) {
        self.u32(records.len() as u32);
        for (seq, op) in records {
            let f = encode_frame(seq, op, 0);
            self.0.extend_from_slice(&f.head);
            self.0.extend_from_slice(f.tail);
            self.0.extend_from_slice(&ZERO_PAD[..f.padding]);
        }
    }
    fn path(&mut self, p: &RelPath) {
        let b = p.as_bytes();
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
    }
    /// A scan entry (layout in docs/protocol.md, `Scan`).
    fn scan_entry(&mut self, e: &ScanEntry) {
        self.u16(e.path.len() as u16);
        self.0.extend_from_slice(&e.path);
        self.u8(scan_kind_code(e.kind));
        self.u32(e.perm);
        self.u32(e.uid);
        self.u32(e.gid);
        self.u64(e.size);
        self.u64(e.mtime.0 as u64);
        self.u64(e.mtime.1 as u64);
        self.u64(e.nlink);
        self.u64(e.blocks);
        self.u64(e.rdev);
        let flags = u8::from(e.target.is_some())
            | u8::from(e.hash.is_some()) << 1
            | u8::from(e.link_leader.is_some()) << 2;
        self.u8(flags);
        if let Some(t) = &e.target {
            self.u16(t.len() as u16);
            self.0.extend_from_slice(t);
        }
        if let Some(h) = &e.hash {
            self.0.extend_from_slice(h);
        }
        if let Some(l) = &e.link_leader {
            self.u16(l.len() as u16);
            self.0.extend_from_slice(l);
        }
        self.u16(e.xattrs.len() as u16);
        for (n, h) in &e.xattrs {
            self.u8(n.len() as u8);
            self.0.extend_from_slice(n);
            self.0.extend_from_slice(h);
        }
    }
    fn text(&mut self, s: &str) {
        let b = &s.as_bytes()[..floor_char_boundary(s, TEXT_MAX)];
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
    }
}

/// The fixed part of a scan entry: path length, type, perm, uid, gid, size, mtime (2), nlink,
/// blocks, rdev, flags, xattr count.
const SCAN_ENTRY_FIXED_BYTES: usize = 2 + 1 + 4 * 3 + 8 * 6 + 1 + 2;

fn scan_kind_code(k: ScanKind) -> u8 {
    match k {
        ScanKind::File => 0,
        ScanKind::Dir => 1,
        ScanKind::Symlink => 2,
        ScanKind::Fifo => 3,
        ScanKind::Socket => 4,
        ScanKind::CharDev => 5,
        ScanKind::BlockDev => 6,
    }
}

fn scan_kind_from_code(c: u8) -> Result<ScanKind, WireError> {
    Ok(match c {
        0 => ScanKind::File,
        1 => ScanKind::Dir,
        2 => ScanKind::Symlink,
        3 => ScanKind::Fifo,
        4 => ScanKind::Socket,
        5 => ScanKind::CharDev,
        6 => ScanKind::BlockDev,
        _ => return Err(WireError::Invalid("unknown entry type in scan")),
    })
}

/// The encoded size of a scan entry (for the daemon's batching under [`BATCH_BYTES`]).
pub fn scan_entry_bytes(e: &ScanEntry) -> usize {
    SCAN_ENTRY_FIXED_BYTES
        + e.path.len()
        + e.target.as_ref().map_or(0, |t| 2 + t.len())
        + e.hash.map_or(0, |_| 32)
        + e.link_leader.as_ref().map_or(0, |l| 2 + l.len())
        + e.xattrs.iter().map(|(n, _)| 33 + n.len()).sum::<usize>()
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

struct In<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.b.get(self.at..end).ok_or(WireError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let mut a = [0u8; 2];
        a.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(a))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Invalid("boolean is not 0 or 1")),
        }
    }
    fn id(&mut self) -> Result<VolumeId, WireError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(a)
    }
    fn text(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        if n > TEXT_MAX {
            return Err(WireError::Invalid("text longer than 4096 bytes"));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Invalid("text is not UTF-8"))
    }
    /// A generation history: count u8 (at most `HISTORY_MAX`), then per generation number u64,
    /// id u64, start u64; numbers and starts strictly increasing.
    fn history(&mut self) -> Result<Vec<Generation>, WireError> {
        let n = self.u8()? as usize;
        if n > HISTORY_MAX {
            return Err(WireError::Invalid("generation history too long"));
        }
        let mut h = Vec::with_capacity(n);
        for _ in 0..n {
            h.push(Generation {
                number: self.u64()?,
                id: self.u64()?,
                start: self.u64()?,
            });
        }
        let ok = h
            .windows(2)
            .all(|w| w[0].number < w[1].number && w[0].start < w[1].start);
        if !ok {
            return Err(WireError::Invalid(
                "generation history is not strictly increasing",
            ));
        }
        Ok(h)
    }
    /// A manifest entry's xattr names: count u16, then per name length u8 + bytes (1 to
    /// `XATTR_NAME_MAX`, no NUL), `MANIFEST_XATTR_BYTES_MAX` in all (a byte more per name);
    /// none in a later piece of a file (`first_block` > 0).
    fn xattr_names(&mut self, first_block: u64) -> Result<Vec<Vec<u8>>, WireError> {
        let n = self.u16()? as usize;
        // Each name takes at least its length byte: bound the count before allocating.
        if n > self.b.len() - self.at || (first_block > 0 && n > 0) {
            return Err(WireError::Invalid("manifest xattr count does not fit"));
        }
        let mut names = Vec::with_capacity(n);
        let mut bytes = 0usize;
        for _ in 0..n {
            let len = self.u8()? as usize;
            let name = self.take(len)?;
            bytes += len + 1;
            if len == 0 || name.contains(&0) || bytes > MANIFEST_XATTR_BYTES_MAX {
                return Err(WireError::Invalid("invalid xattr name in manifest"));
            }
            names.push(name.to_vec());
        }
        Ok(names)
    }
    /// Record frames preceded by their count u32: each valid, seqs consecutive.
    fn records(&mut self) -> Result<Vec<Record>, WireError> {
        let count = self.u32()? as usize;
        // Each frame takes at least its header: bound the count before allocating.
        if count > self.b.len() / FRAME_HEADER_BYTES {
            return Err(WireError::Invalid("record count exceeds the batch size"));
        }
        let mut records = Vec::with_capacity(count);
        for index in 0..count {
            let rest = &self.b[self.at..];
            match parse_frame(rest) {
                // A record's origin is the sending site's business (its link sends the
                // peer's records as placeholders): never on the wire.
                FrameParse::Record { flags, .. } if flags != 0 => {
                    return Err(WireError::Record {
                        index,
                        error: FrameError::Flags(flags),
                    })
                }
                FrameParse::Record { record, len, .. } => {
                    if let Some(prev) = records.last().map(|r: &Record| r.seq) {
                        if record.seq != prev.wrapping_add(1) {
                            return Err(WireError::Gap {
                                expected: prev.wrapping_add(1),
                                got: record.seq,
                            });
                        }
                    }
                    self.take(len)?;
                    records.push(record);
                }
                FrameParse::Incomplete { .. } => return Err(WireError::Truncated),
                FrameParse::Invalid(error) => return Err(WireError::Record { index, error }),
            }
        }
        Ok(records)
    }
    /// A scan entry: every field checked (a valid path or `.`, a known type, permission bits
    /// only, a target exactly for a symlink, a hash exactly for a file, xattr names sorted).
    fn scan_entry(&mut self) -> Result<ScanEntry, WireError> {
        let n = self.u16()? as usize;
        let path = self.take(n)?.to_vec();
        if path != b"." {
            RelPath::new(path.clone()).map_err(|_| WireError::Invalid("invalid scan path"))?;
        }
        let kind = scan_kind_from_code(self.u8()?)?;
        let perm = self.u32()?;
        if perm & !0o7777 != 0 {
            return Err(WireError::Invalid(
                "scan entry mode has more than permission bits",
            ));
        }
        let (uid, gid, size) = (self.u32()?, self.u32()?, self.u64()?);
        let mtime = (self.u64()? as i64, self.u64()? as i64);
        if !(0..1_000_000_000).contains(&mtime.1) {
            return Err(WireError::Invalid("scan entry nanoseconds out of range"));
        }
        let (nlink, blocks, rdev) = (self.u64()?, self.u64()?, self.u64()?);
        let flags = self.u8()?;
        if flags & !0b111 != 0 {
            return Err(WireError::Invalid("scan entry has unknown flags"));
        }
        let target = if flags & 1 != 0 {
            let n = self.u16()? as usize;
            let t = self.take(n)?;
            if n == 0 || n > SCAN_TARGET_MAX || t.contains(&0) {
                return Err(WireError::Invalid("invalid symlink target in scan"));
            }
            Some(t.to_vec())
        } else {
            None
        };
        let hash = if flags & 2 != 0 {
            let mut h = [0u8; 32];
            h.copy_from_slice(self.take(32)?);
            Some(h)
        } else {
            None
        };
        if target.is_some() != (kind == ScanKind::Symlink)
            || hash.is_some() != (kind == ScanKind::File)
        {
            return Err(WireError::Invalid(
                "scan entry's target or hash does not fit its type",
            ));
        }
        let link_leader = if flags & 4 != 0 {
            if kind == ScanKind::Dir {
                return Err(WireError::Invalid(
                    "a directory in a scan has a link leader",
                ));
            }
            let n = self.u16()? as usize;
            let l = RelPath::new(self.take(n)?.to_vec())
                .map_err(|_| WireError::Invalid("invalid link leader in scan"))?;
            Some(l.as_bytes().to_vec())
        } else {
            None
        };
        let nx = self.u16()? as usize;
        // Each xattr takes at least 34 bytes: bound the count before allocating.
        if nx > (self.b.len() - self.at) / 34 {
            return Err(WireError::Invalid("scan xattr count does not fit"));
        }
        let mut xattrs: Vec<(Vec<u8>, [u8; 32])> = Vec::with_capacity(nx);
        for _ in 0..nx {
            let len = self.u8()? as usize;
            let name = self.take(len)?.to_vec();
            let mut h = [0u8; 32];
            h.copy_from_slice(self.take(32)?);
            if len == 0 || name.contains(&0) || xattrs.last().is_some_and(|(p, _)| *p >= name) {
                return Err(WireError::Invalid("invalid or unsorted xattr name in scan"));
            }
            xattrs.push((name, h));
        }
        Ok(ScanEntry {
            path,
            kind,
            perm,
            uid,
            gid,
            size,
            mtime,
            nlink,
            blocks,
            rdev,
            target,
            hash,
            xattrs,
            link_leader,
        })
    }
    /// A path: length u16 + bytes, a valid relative path.
    fn path(&mut self) -> Result<RelPath, WireError> {
        let n = self.u16()? as usize;
        RelPath::new(self.take(n)?.to_vec()).map_err(|_| WireError::Invalid("invalid path"))
    }
    fn end(&self) -> Result<(), WireError> {
        match self.b.len() - self.at {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

impl Msg {
    /// The message's type code.
    pub fn type_code(&self) -> u8 {
        use msg_type::*;
        match self {
            Msg::Hello { .. } => HELLO,
            Msg::Welcome { .. } => WELCOME,
            Msg::Start { .. } => START,
            Msg::Records { .. } => RECORDS,
            Msg::Ack { .. } => ACK,
            Msg::Ping { .. } => PING,
            Msg::Pong { .. } => PONG,
            Msg::Error { .. } => ERROR,
            Msg::Manifest { .. } => MANIFEST,
            Msg::ManifestEnd { .. } => MANIFEST_END,
            Msg::Diverged { .. } => DIVERGED,
            Msg::Reintegrate { .. } => REINTEGRATE,
            Msg::Tail { .. } => TAIL,
            Msg::Fetch { .. } => FETCH,
            Msg::Entry { .. } => ENTRY,
            Msg::Reintegrated { .. } => REINTEGRATED,
            Msg::LeaseRequest(_) => LEASE_REQUEST,
            Msg::LeaseResponse(_) => LEASE_RESPONSE,
            Msg::LeaseRelease(_) => LEASE_RELEASE,
            Msg::Token(t) => {
                use crate::token::TokenMsg as T;
                match t {
                    T::Request { .. } => TOKEN_REQUEST,
                    T::Grant { .. } => TOKEN_GRANT,
                    T::Ack { .. } => TOKEN_ACK,
                    T::Refuse { .. } => TOKEN_REFUSE,
                    T::Probe { .. } => QUORUM_PROBE,
                    T::Answer { .. } => QUORUM_ANSWER,
                }
            }
            Msg::PeerSeen { .. } => PEER_SEEN,
            Msg::UdpOffer { .. } => UDP_OFFER,
            Msg::UdpAccept { .. } => UDP_ACCEPT,
            Msg::UdpSent { .. } => UDP_SENT,
            Msg::UdpNak { .. } => UDP_NAK,
            Msg::Verify { .. } => VERIFY,
            Msg::Scan { .. } => SCAN,
            Msg::ScanEnd { .. } => SCAN_END,
        }
    }

    /// The message's body, uncompressed.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut o = Out(Vec::with_capacity(64));
        match self {
            Msg::Hello {
                version,
                volume_id,
                generation,
                first_held,
                next_seq,
                compress,
                name,
                history,
            } => {
                o.u16(*version);
                o.0.extend_from_slice(volume_id);
                o.u64(*generation);
                o.u64(*first_held);
                o.u64(*next_seq);
                o.u8(u8::from(*compress));
                o.text(name);
                o.history(history);
            }
            Msg::Welcome {
                version,
                state,
                volume_id,
                generation,
                durable,
                applied,
                sync_id,
                compress,
                history,
            } => {
                o.u16(*version);
                o.u8(*state as u8);
                o.0.extend_from_slice(volume_id);
                o.u64(*generation);
                o.u64(*durable);
                o.u64(*applied);
                o.u32(*sync_id);
                o.u8(u8::from(*compress));
                o.history(history);
            }
            Msg::Start { mode, seq, sync_id } => {
                o.u8(*mode as u8);
                o.u64(*seq);
                o.u32(*sync_id);
            }
            Msg::Records { settled, records } => {
                o.u64(*settled);
                o.records(records.iter().map(|r| (r.seq, &r.op)));
            }
            Msg::Ack {
                received,
                durable,
                applied,
                checkpoint,
            } => {
                o.u64(*received);
                o.u64(*durable);
                o.u64(*applied);
                o.u64(*checkpoint);
            }
            Msg::Ping { nonce } | Msg::Pong { nonce } => o.u64(*nonce),
            Msg::Error { code, message } => {
                o.u16(*code);
                o.text(message);
            }
            Msg::Manifest { entries } => {
                o.u32(entries.len() as u32);
                for e in entries {
                    let p = e.path.as_bytes();
                    o.u16(p.len() as u16);
                    o.0.extend_from_slice(p);
                    o.u8(e.kind);
                    o.u64(e.size);
                    o.u64(e.first_block);
                    o.u32(e.hashes.len() as u32);
                    for h in &e.hashes {
                        o.0.extend_from_slice(h);
                    }
                    o.u16(e.xattrs.len() as u16);
                    for n in &e.xattrs {
                        o.u8(n.len() as u8);
                        o.0.extend_from_slice(n);
                    }
                }
            }
            Msg::ManifestEnd { count } => o.u64(*count),
            Msg::Diverged {
                common_generation,
                common_seq,
                end,
                history,
            } => {
                o.u64(*common_generation);
                o.u64(*common_seq);
                o.u64(*end);
                o.history(history);
            }
            Msg::Reintegrate { from } => o.u64(*from),
            Msg::Tail { last, records } => {
                o.u8(u8::from(*last));
                o.records(records.iter().map(|r| (r.seq, &r.op)));
            }
            Msg::Fetch { id, path, as_path } => {
                o.u32(*id);
                o.path(path);
                o.path(as_path);
            }
            Msg::Entry { id, last, ops } => {
                o.u32(*id);
                o.u8(u8::from(*last));
                // Each op as a record (seq 1, 2, ... within the message): checksummed and
                // validated like any record.
                o.records(ops.iter().enumerate().map(|(i, op)| (i as u64 + 1, op)));
            }
            Msg::Reintegrated { conflicts } => o.u64(*conflicts),
            Msg::LeaseRequest(r) | Msg::LeaseRelease(r) => {
                o.0.extend_from_slice(&r.volume_id);
                o.u64(r.generation_number);
                o.u64(r.generation_id);
                o.u64(r.ttl_ms);
                o.u8(u8::from(r.renewal));
                o.text(&r.site);
            }
            Msg::LeaseResponse(r) => {
                use crate::lease::Response as R;
                match r {
                    R::Granted { ttl_ms } => {
                        o.u8(0);
                        o.u64(*ttl_ms);
                    }
                    R::Held {
                        site,
                        generation_number,
                        left_ms,
                    } => {
                        o.u8(1);
                        o.u64(*generation_number);
                        o.u64(*left_ms);
                        o.text(site);
                    }
                    R::Superseded { generation_number } => {
                        o.u8(2);
                        o.u64(*generation_number);
                    }
                    R::Starting { left_ms } => {
                        o.u8(3);
                        o.u64(*left_ms);
                    }
                    R::Full => o.u8(4),
                    R::Released => o.u8(5),
                }
            }
            Msg::Token(t) => {
                use crate::token::TokenMsg as T;
                match *t {
                    T::Request { object } | T::Refuse { object } => o.u64(object),
                    T::Probe { nonce } => o.u64(nonce),
                    T::Answer { nonce, seq } => {
                        o.u64(nonce);
                        o.u64(seq);
                    }
                    T::Grant { object, lend, seq } => {
                        o.u64(object);
                        o.u64(lend);
                        o.u64(seq);
                    }
                    T::Ack { object, lend } => {
                        o.u64(object);
                        o.u64(lend);
                    }
                }
            }
            Msg::PeerSeen { from, through } => {
                o.u64(*from);
                o.u64(*through);
            }
            Msg::UdpOffer { first } => o.u64(*first),
            Msg::UdpAccept { port } => o.u16(*port),
            Msg::UdpSent { through } => o.u64(*through),
            Msg::UdpNak { naks } => o.0.extend_from_slice(&crate::udp::encode_naks(naks)),
            Msg::Verify {
                volume_id,
                no_cache,
                plan,
            } => {
                o.0.extend_from_slice(volume_id);
                o.u8(u8::from(*no_cache));
                if let Some(plan) = plan {
                    o.u32(plan.len() as u32);
                    for (p, scope) in plan {
                        o.u8(*scope as u8);
                        o.path(p);
                    }
                }
            }
            Msg::Scan { entries } => {
                o.u32(entries.len() as u32);
                for e in entries {
                    o.scan_entry(e);
                }
            }
            Msg::ScanEnd {
                count,
                bytes_read,
                cache_hits,
                applied,
            } => {
                o.u64(*count);
                o.u64(*bytes_read);
                o.u64(*cache_hits);
                o.u64(*applied);
            }
        }
        o.0
    }

    /// Decodes a body of type `ty`, validating every field and every record.
    pub fn decode_body(ty: u8, body: &[u8]) -> Result<Msg, WireError> {
        use msg_type::*;
        let mut i = In { b: body, at: 0 };
        let m = match ty {
            HELLO => Msg::Hello {
                version: i.u16()?,
                volume_id: i.id()?,
                generation: i.u64()?,
                first_held: i.u64()?,
                next_seq: i.u64()?,
                compress: i.bool()?,
                name: i.text()?,
                history: i.history()?,
            },
            WELCOME => Msg::Welcome {
                version: i.u16()?,
                state: MirrorState::from_u8(i.u8()?)?,
                volume_id: i.id()?,
                generation: i.u64()?,
                durable: i.u64()?,
                applied: i.u64()?,
                sync_id: i.u32()?,
                compress: i.bool()?,
                history: i.history()?,
            },
            START => Msg::Start {
                mode: match i.u8()? {
                    0 => StartMode::Resume,
                    1 => StartMode::InitialSync,
                    2 => StartMode::Resync,
                    _ => return Err(WireError::Invalid("unknown start mode")),
                },
                seq: i.u64()?,
                sync_id: i.u32()?,
            },
            RECORDS => Msg::Records {
                settled: i.u64()?,
                records: i.records()?,
            },
            ACK => Msg::Ack {
                received: i.u64()?,
                durable: i.u64()?,
                applied: i.u64()?,
                checkpoint: i.u64()?,
            },
            PING => Msg::Ping { nonce: i.u64()? },
            PONG => Msg::Pong { nonce: i.u64()? },
            ERROR => Msg::Error {
                code: i.u16()?,
                message: i.text()?,
            },
            MANIFEST => {
                let count = i.u32()? as usize;
                // Each entry takes at least 25 bytes: bound the count before allocating.
                if count > body.len() / 25 {
                    return Err(WireError::Invalid("manifest count exceeds the body"));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let n = i.u16()? as usize;
                    let path = crate::path::RelPath::new(i.take(n)?.to_vec())
                        .map_err(|_| WireError::Invalid("invalid path in manifest"))?;
                    let kind = i.u8()?;
                    if !(1..=4).contains(&kind) {
                        return Err(WireError::Invalid("unknown manifest entry kind"));
                    }
                    let size = i.u64()?;
                    let first_block = i.u64()?;
                    let blocks = i.u32()? as usize;
                    if blocks > (body.len() - i.at) / 32
                        || blocks > MANIFEST_HASHES_MAX
                        || (kind != 1 && (blocks != 0 || first_block != 0))
                        || first_block.saturating_add(blocks as u64) > size.div_ceil(RESYNC_BLOCK)
                    {
                        return Err(WireError::Invalid("manifest hash count does not fit"));
                    }
                    let mut hashes = Vec::with_capacity(blocks);
                    for _ in 0..blocks {
                        let mut h = [0u8; 32];
                        h.copy_from_slice(i.take(32)?);
                        hashes.push(h);
                    }
                    let xattrs = i.xattr_names(first_block)?;
                    entries.push(ManifestEntry {
                        path,
                        kind,
                        size,
                        first_block,
                        hashes,
                        xattrs,
                    });
                }
                Msg::Manifest { entries }
            }
            MANIFEST_END => Msg::ManifestEnd { count: i.u64()? },
            DIVERGED => {
                let m = Msg::Diverged {
                    common_generation: i.u64()?,
                    common_seq: i.u64()?,
                    end: i.u64()?,
                    history: i.history()?,
                };
                if let Msg::Diverged {
                    common_seq,
                    end,
                    history,
                    ..
                } = &m
                {
                    if common_seq > end || history.is_empty() {
                        return Err(WireError::Invalid(
                            "divergence point after the mirror's end, or no history",
                        ));
                    }
                }
                m
            }
            REINTEGRATE => {
                let from = i.u64()?;
                if from == 0 {
                    return Err(WireError::Invalid("reintegration from seq 0"));
                }
                Msg::Reintegrate { from }
            }
            TAIL => {
                let last = i.bool()?;
                let records = i.records()?;
                // The tail names what changed; data travels by `Fetch`.
                let has_data = |op: &Op| match op {
                    Op::Write { data, .. } => !data.is_empty(),
                    Op::Sync { op, .. } => {
                        matches!(&**op, Op::Write { data, .. } if !data.is_empty())
                    }
                    _ => false,
                };
                if records.iter().any(|r| has_data(&r.op)) {
                    return Err(WireError::Invalid("a tail record carries write data"));
                }
                Msg::Tail { last, records }
            }
            FETCH => Msg::Fetch {
                id: i.u32()?,
                path: i.path()?,
                as_path: i.path()?,
            },
            ENTRY => {
                let id = i.u32()?;
                let last = i.bool()?;
                let records = i.records()?;
                if records.first().is_some_and(|r| r.seq != 1) {
                    return Err(WireError::Invalid("entry ops are not numbered from 1"));
                }
                Msg::Entry {
                    id,
                    last,
                    ops: records.into_iter().map(|r| r.op).collect(),
                }
            }
            REINTEGRATED => Msg::Reintegrated {
                conflicts: i.u64()?,
            },
            LEASE_REQUEST | LEASE_RELEASE => {
                let r = crate::lease::Request {
                    volume_id: i.id()?,
                    generation_number: i.u64()?,
                    generation_id: i.u64()?,
                    ttl_ms: i.u64()?,
                    renewal: i.bool()?,
                    site: i.text()?,
                };
                if r.generation_number == 0 {
                    return Err(WireError::Invalid("lease request for generation 0"));
                }
                if r.site.is_empty() || r.site.len() > crate::lease::SITE_NAME_MAX {
                    return Err(WireError::Invalid(
                        "lease request site name empty or too long",
                    ));
                }
                if ty == LEASE_RELEASE {
                    Msg::LeaseRelease(r)
                } else {
                    Msg::LeaseRequest(r)
                }
            }
            LEASE_RESPONSE => {
                use crate::lease::Response as R;
                Msg::LeaseResponse(match i.u8()? {
                    0 => R::Granted { ttl_ms: i.u64()? },
                    1 => R::Held {
                        generation_number: i.u64()?,
                        left_ms: i.u64()?,
                        site: i.text()?,
                    },
                    2 => R::Superseded {
                        generation_number: i.u64()?,
                    },
                    3 => R::Starting { left_ms: i.u64()? },
                    4 => R::Full,
                    5 => R::Released,
                    _ => return Err(WireError::Invalid("unknown lease answer")),
                })
            }
            TOKEN_REQUEST => Msg::Token(crate::token::TokenMsg::Request { object: i.u64()? }),
            TOKEN_REFUSE => Msg::Token(crate::token::TokenMsg::Refuse { object: i.u64()? }),
            TOKEN_GRANT | TOKEN_ACK => {
                let object = i.u64()?;
                let lend = i.u64()?;
                // Lend ids start at 1: 0 would name the home's own, never lent, token.
                if lend == 0 {
                    return Err(WireError::Invalid("token lend id 0"));
                }
                Msg::Token(if ty == TOKEN_GRANT {
                    crate::token::TokenMsg::Grant {
                        object,
                        lend,
                        seq: i.u64()?,
                    }
                } else {
                    crate::token::TokenMsg::Ack { object, lend }
                })
            }
            QUORUM_PROBE => Msg::Token(crate::token::TokenMsg::Probe { nonce: i.u64()? }),
            QUORUM_ANSWER => Msg::Token(crate::token::TokenMsg::Answer {
                nonce: i.u64()?,
                seq: i.u64()?,
            }),
            PEER_SEEN => Msg::PeerSeen {
                from: i.u64()?,
                through: i.u64()?,
            },
            UDP_OFFER => Msg::UdpOffer { first: i.u64()? },
            UDP_ACCEPT => Msg::UdpAccept { port: i.u16()? },
            UDP_SENT => Msg::UdpSent { through: i.u64()? },
            UDP_NAK => {
                let rest = i.take(body.len() - i.at)?;
                Msg::UdpNak {
                    naks: crate::udp::decode_naks(rest)
                        .map_err(|_| WireError::Invalid("malformed UDP NAK"))?,
                }
            }
            VERIFY => {
                let volume_id = i.id()?;
                let no_cache = i.bool()?;
                let plan = if i.at == body.len() {
                    None
                } else {
                    let n = i.u32()? as usize;
                    // Each item takes at least 3 bytes: bound the count before allocating.
                    if n > VERIFY_PLAN_MAX || n > (body.len() - i.at) / 3 {
                        return Err(WireError::Invalid("verify plan too long"));
                    }
                    let mut plan: Vec<(RelPath, Scope)> = Vec::with_capacity(n);
                    for _ in 0..n {
                        let scope = match i.u8()? {
                            0 => Scope::Entry,
                            1 => Scope::Subtree,
                            _ => return Err(WireError::Invalid("unknown verify plan scope")),
                        };
                        let p = i.path()?;
                        if plan.last().is_some_and(|(q, _)| {
                            crate::verify::path_order(q.as_bytes(), p.as_bytes())
                                != std::cmp::Ordering::Less
                        }) {
                            return Err(WireError::Invalid("verify plan out of order"));
                        }
                        plan.push((p, scope));
                    }
                    Some(plan)
                };
                Msg::Verify {
                    volume_id,
                    no_cache,
                    plan,
                }
            }
            SCAN => {
                let n = i.u32()? as usize;
                // Each entry takes at least its fixed part: bound the count before allocating.
                if n > SCAN_ENTRIES_MAX || n > (body.len() - i.at) / SCAN_ENTRY_FIXED_BYTES {
                    return Err(WireError::Invalid("scan entry count does not fit"));
                }
                let mut entries: Vec<ScanEntry> = Vec::with_capacity(n);
                for _ in 0..n {
                    let e = i.scan_entry()?;
                    if let Some(prev) = entries.last() {
                        if crate::verify::path_order(&prev.path, &e.path)
                            != std::cmp::Ordering::Less
                        {
                            return Err(WireError::Invalid("scan entries out of order"));
                        }
                    }
                    entries.push(e);
                }
                Msg::Scan { entries }
            }
            SCAN_END => Msg::ScanEnd {
                count: i.u64()?,
                bytes_read: i.u64()?,
                cache_hits: i.u64()?,
                applied: i.u64()?,
            },
            other => return Err(WireError::UnknownType(other)),
        };
        i.end()?;
        Ok(m)
    }

    /// The whole wire frame (header and body). With `compress`, bodies of 512 bytes or more are
    /// zstd-compressed when that makes them smaller.
    pub fn encode(&self, compress: bool) -> Vec<u8> {
        let body = self.encode_body();
        let (flags, body) = if compress && body.len() >= 512 {
            match zstd::bulk::compress(&body, 1) {
                Ok(c) if c.len() < body.len() => (FLAG_ZSTD, c),
                _ => (0, body),
            }
        } else {
            (0, body)
        };
        frame(self.type_code(), flags, &body)
    }
}

fn frame(ty: u8, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(WIRE_HEADER_BYTES + body.len());
    v.extend_from_slice(&WIRE_MAGIC);
    v.push(ty);
    v.push(flags);
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&v[0..12]), body);
    v.extend_from_slice(&crc.to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// Incremental decoder of wire frames: push bytes as they arrive, pull messages. It never holds
/// more than one frame (at most `WIRE_HEADER_BYTES + WIRE_BODY_MAX` bytes) plus one read's worth.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of whole frames decoded so far (for accounting).
    pub bytes_in: u64,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many more bytes the current frame needs (at least 1); a reader should not read more
    /// than this plus some slack before calling [`Decoder::next`].
    pub fn wanted(&self) -> usize {
        if self.buf.len() < WIRE_HEADER_BYTES {
            return WIRE_HEADER_BYTES - self.buf.len();
        }
        let len = u32::from_le_bytes([self.buf[8], self.buf[9], self.buf[10], self.buf[11]]);
        (WIRE_HEADER_BYTES + len as usize)
            .saturating_sub(self.buf.len())
            .max(1)
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message, `Ok(None)` if more bytes are needed, or the reason the stream is
    /// invalid (the connection must then be closed: nothing of the bad frame may be used).
    pub fn next_msg(&mut self) -> Result<Option<Msg>, WireError> {
        if self.buf.len() < WIRE_HEADER_BYTES {
            return Ok(None);
        }
        let h = &self.buf[..WIRE_HEADER_BYTES];
        if h[0..4] != WIRE_MAGIC {
            return Err(WireError::Magic);
        }
        let (ty, flags) = (h[4], h[5]);
        if flags & !FLAG_ZSTD != 0 || h[6..8] != [0, 0] {
            return Err(WireError::Reserved);
        }
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        if len > WIRE_BODY_MAX {
            return Err(WireError::TooLarge(len));
        }
        let total = WIRE_HEADER_BYTES + len;
        if self.buf.len() < total {
            return Ok(None);
        }
        let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let body = &self.buf[WIRE_HEADER_BYTES..total];
        if crc32c::crc32c_append(crc32c::crc32c(&self.buf[0..12]), body) != crc {
            return Err(WireError::Checksum);
        }
        let msg = if flags & FLAG_ZSTD != 0 {
            let plain =
                zstd::bulk::decompress(body, WIRE_BODY_MAX).map_err(|_| WireError::Decompress)?;
            Msg::decode_body(ty, &plain)?
        } else {
            Msg::decode_body(ty, body)?
        };
        self.buf.drain(..total);
        self.bytes_in += total as u64;
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::tests::arb_op_with_sync;
    use crate::op::Op;
    use crate::path::RelPath;
    use proptest::prelude::*;

    fn all_kinds() -> Vec<Msg> {
        vec![
            Msg::Hello {
                version: 1,
                volume_id: [7; 16],
                generation: 3,
                first_held: 10,
                next_seq: 99,
                compress: true,
                name: "primary é".into(),
                history: vec![
                    Generation {
                        number: 1,
                        id: 5,
                        start: 1,
                    },
                    Generation {
                        number: 3,
                        id: u64::MAX,
                        start: 40,
                    },
                ],
            },
            Msg::Welcome {
                version: 1,
                state: MirrorState::Syncing,
                volume_id: [9; 16],
                generation: 2,
                durable: 5,
                applied: 4,
                sync_id: 77,
                compress: false,
                history: Vec::new(),
            },
            Msg::Start {
                mode: StartMode::InitialSync,
                seq: 42,
                sync_id: 5,
            },
            Msg::Ack {
                received: 9,
                durable: 8,
                applied: 7,
                checkpoint: 6,
            },
            Msg::Ping { nonce: 1 },
            Msg::Pong { nonce: 2 },
            Msg::Error {
                code: error_code::VOLUME,
                message: "nope".into(),
            },
            Msg::Manifest {
                entries: vec![
                    ManifestEntry {
                        path: RelPath::new(b"d/f".to_vec()).expect("path"),
                        kind: 1,
                        size: RESYNC_BLOCK + 1,
                        first_block: 0,
                        hashes: vec![[3; 32], [4; 32]],
                        xattrs: vec![b"user.a".to_vec(), vec![b'x'; XATTR_NAME_MAX]],
                    },
                    ManifestEntry {
                        path: RelPath::new(b"d".to_vec()).expect("path"),
                        kind: 2,
                        size: 4096,
                        first_block: 0,
                        hashes: vec![],
                        xattrs: vec![],
                    },
                    ManifestEntry {
                        path: RelPath::root(),
                        kind: 2,
                        size: 4096,
                        first_block: 0,
                        hashes: vec![],
                        xattrs: vec![b"trusted.t".to_vec()],
                    },
                ],
            },
            Msg::ManifestEnd { count: 2 },
            Msg::Diverged {
                common_generation: 1,
                common_seq: 40,
                end: 45,
                history: vec![Generation {
                    number: 1,
                    id: 5,
                    start: 1,
                }],
            },
            Msg::Reintegrate { from: 41 },
            Msg::Tail {
                last: false,
                records: vec![
                    Record {
                        seq: 41,
                        op: Op::Write {
                            path: RelPath::new(b"d/f".to_vec()).expect("path"),
                            offset: 7,
                            data: vec![],
                        },
                    },
                    Record {
                        seq: 42,
                        op: Op::Abort { seq: 41 },
                    },
                ],
            },
            Msg::Tail {
                last: true,
                records: vec![],
            },
            Msg::Fetch {
                id: 3,
                path: RelPath::new(b"d/f".to_vec()).expect("path"),
                as_path: RelPath::new(b"d/f.conflict".to_vec()).expect("path"),
            },
            Msg::Entry {
                id: 3,
                last: true,
                ops: vec![
                    Op::Create {
                        path: RelPath::new(b"d/f.conflict".to_vec()).expect("path"),
                        mode: 0o644,
                        uid: 1,
                        gid: 2,
                    },
                    Op::Write {
                        path: RelPath::new(b"d/f.conflict".to_vec()).expect("path"),
                        offset: 0,
                        data: b"hello".to_vec(),
                    },
                ],
            },
            Msg::Entry {
                id: 4,
                last: true,
                ops: vec![],
            },
            Msg::Reintegrated { conflicts: 2 },
            Msg::LeaseRequest(crate::lease::Request {
                volume_id: [5; 16],
                site: "site é".into(),
                generation_number: 2,
                generation_id: u64::MAX,
                ttl_ms: 3000,
                renewal: true,
            }),
            Msg::LeaseResponse(crate::lease::Response::Granted { ttl_ms: 3000 }),
            Msg::LeaseResponse(crate::lease::Response::Held {
                site: "p".into(),
                generation_number: 1,
                left_ms: 17,
            }),
            Msg::LeaseResponse(crate::lease::Response::Superseded {
                generation_number: 9,
            }),
            Msg::LeaseResponse(crate::lease::Response::Starting { left_ms: 5 }),
            Msg::LeaseResponse(crate::lease::Response::Full),
            Msg::LeaseResponse(crate::lease::Response::Released),
            Msg::LeaseRelease(crate::lease::Request {
                volume_id: [6; 16],
                site: "2 (host:/b)".into(),
                generation_number: 1,
                generation_id: 1,
                ttl_ms: 0,
                renewal: false,
            }),
            Msg::Token(crate::token::TokenMsg::Request { object: 7 }),
            Msg::Token(crate::token::TokenMsg::Grant {
                object: u64::MAX,
                lend: 3,
                seq: 99,
            }),
            Msg::Token(crate::token::TokenMsg::Ack { object: 7, lend: 3 }),
            Msg::Token(crate::token::TokenMsg::Refuse { object: 0 }),
            Msg::Token(crate::token::TokenMsg::Probe { nonce: 5 }),
            Msg::Token(crate::token::TokenMsg::Answer {
                nonce: u64::MAX,
                seq: 12,
            }),
            Msg::PeerSeen {
                from: 12,
                through: u64::MAX,
            },
            Msg::UdpOffer { first: 42 },
            Msg::UdpAccept { port: 7070 },
            Msg::UdpAccept { port: 0 },
            Msg::UdpSent { through: u64::MAX },
            Msg::UdpNak { naks: vec![] },
            Msg::UdpNak {
                naks: vec![
                    crate::udp::Nak {
                        seq: 3,
                        range: None,
                    },
                    crate::udp::Nak {
                        seq: 4,
                        range: Some((1_200, 2_400)),
                    },
                ],
            },
            Msg::Verify {
                volume_id: [3; 16],
                no_cache: true,
                plan: None,
            },
            Msg::Verify {
                volume_id: [4; 16],
                no_cache: false,
                plan: Some(vec![
                    (RelPath::root(), Scope::Entry),
                    (RelPath::new("a").expect("path"), Scope::Subtree),
                    (RelPath::new("a.b").expect("path"), Scope::Entry),
                ]),
            },
            Msg::Scan { entries: vec![] },
            Msg::Scan {
                entries: scan_entries(),
            },
            Msg::ScanEnd {
                count: 3,
                bytes_read: 0,
                cache_hits: 7,
                applied: u64::MAX,
            },
        ]
    }

    fn scan_entry(path: &[u8], kind: crate::verify::Kind) -> ScanEntry {
        ScanEntry {
            path: path.to_vec(),
            kind,
            perm: 0o755,
            uid: 1000,
            gid: 0,
            size: 5,
            mtime: (-3, 999_999_999),
            nlink: 1,
            blocks: 8,
            rdev: 0,
            target: None,
            hash: None,
            xattrs: vec![],
            link_leader: None,
        }
    }

    fn scan_entries() -> Vec<ScanEntry> {
        use crate::verify::Kind;
        vec![
            scan_entry(b".", Kind::Dir),
            ScanEntry {
                hash: Some([9; 32]),
                nlink: 2,
                link_leader: Some(b"d/f".to_vec()),
                xattrs: vec![(b"user.a".to_vec(), [1; 32]), (b"user.b".to_vec(), [2; 32])],
                ..scan_entry(b"d/f", Kind::File)
            },
            ScanEntry {
                target: Some(b"/outside".to_vec()),
                ..scan_entry(b"s", Kind::Symlink)
            },
        ]
    }

    #[test]
    fn malformed_scans_are_refused() {
        use crate::verify::Kind;
        let enc = |entries: Vec<ScanEntry>| {
            let mut o = Out(Vec::new());
            o.u32(entries.len() as u32);
            for e in &entries {
                o.scan_entry(e);
            }
            frame(msg_type::SCAN, 0, &o.0)
        };
        let bad = |entries: Vec<ScanEntry>, why: &'static str| {
            assert_eq!(decode_all(&enc(entries)), Err(WireError::Invalid(why)));
        };
        let file = || ScanEntry {
            hash: Some([1; 32]),
            ..scan_entry(b"f", Kind::File)
        };
        bad(vec![scan_entry(b"../etc", Kind::Dir)], "invalid scan path");
        bad(vec![scan_entry(b"/etc", Kind::Dir)], "invalid scan path");
        bad(
            vec![ScanEntry {
                perm: 0o100644,
                ..file()
            }],
            "scan entry mode has more than permission bits",
        );
        bad(
            vec![scan_entry(b"f", Kind::File)],
            "scan entry's target or hash does not fit its type",
        );
        bad(
            vec![ScanEntry {
                target: Some(b"x".to_vec()),
                ..file()
            }],
            "scan entry's target or hash does not fit its type",
        );
        bad(
            vec![ScanEntry {
                mtime: (1, 1_000_000_000),
                ..file()
            }],
            "scan entry nanoseconds out of range",
        );
        bad(
            vec![ScanEntry {
                link_leader: Some(b"../x".to_vec()),
                ..file()
            }],
            "invalid link leader in scan",
        );
        bad(
            vec![ScanEntry {
                xattrs: vec![(b"user.b".to_vec(), [0; 32]), (b"user.a".to_vec(), [0; 32])],
                ..file()
            }],
            "invalid or unsorted xattr name in scan",
        );
        bad(
            vec![scan_entry(b"b", Kind::Dir), scan_entry(b"a", Kind::Dir)],
            "scan entries out of order",
        );
        bad(
            vec![scan_entry(b"a", Kind::Dir), scan_entry(b"a", Kind::Dir)],
            "scan entries out of order",
        );
        // A count larger than the bytes can hold is refused before allocating.
        let mut huge = Out(Vec::new());
        huge.u32(u32::MAX);
        assert_eq!(
            decode_all(&frame(msg_type::SCAN, 0, &huge.0)),
            Err(WireError::Invalid("scan entry count does not fit"))
        );
        // Unknown type code and flags, and a cut body.
        let one = Msg::Scan {
            entries: vec![file()],
        }
        .encode_body();
        let mut b = one.clone();
        b[4 + 2 + 1] = 9; // count, path length, "f", then the type
        assert_eq!(
            decode_all(&frame(msg_type::SCAN, 0, &b)),
            Err(WireError::Invalid("unknown entry type in scan"))
        );
        let mut b = one.clone();
        b[4 + 2 + 1 + 1 + 12 + 48] = 0x80; // the flags
        assert_eq!(
            decode_all(&frame(msg_type::SCAN, 0, &b)),
            Err(WireError::Invalid("scan entry has unknown flags"))
        );
        let good = Msg::Scan {
            entries: scan_entries(),
        }
        .encode_body();
        for cut in [5, good.len() / 2, good.len() - 1] {
            assert!(
                decode_all(&frame(msg_type::SCAN, 0, &good[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        assert_eq!(
            decode_all(&frame(msg_type::VERIFY, 0, &[0; 16])),
            Err(WireError::Truncated)
        );
        let mut v = [0u8; 17];
        v[16] = 2;
        assert_eq!(
            decode_all(&frame(msg_type::VERIFY, 0, &v)),
            Err(WireError::Invalid("boolean is not 0 or 1"))
        );
        assert_eq!(
            scan_entry_bytes(&scan_entries()[1]),
            {
                let mut o = Out(Vec::new());
                o.scan_entry(&scan_entries()[1]);
                o.0.len()
            },
            "the batching size is the encoded size"
        );
    }

    #[test]
    fn malformed_udp_naks_are_refused() {
        let nak = Msg::UdpNak {
            naks: vec![crate::udp::Nak {
                seq: 9,
                range: None,
            }],
        };
        let b = nak.encode_body();
        assert_eq!(b.len(), 2 + crate::udp::NAK_ENTRY_LEN);
        for cut in [1, b.len() - 1] {
            assert_eq!(
                decode_all(&frame(msg_type::UDP_NAK, 0, &b[..cut])),
                Err(WireError::Invalid("malformed UDP NAK")),
                "cut to {cut}"
            );
        }
        let mut zero = b.clone();
        zero[2..10].copy_from_slice(&[0; 8]);
        assert_eq!(
            decode_all(&frame(msg_type::UDP_NAK, 0, &zero)),
            Err(WireError::Invalid("malformed UDP NAK"))
        );
    }

    #[test]
    fn malformed_token_messages_are_refused() {
        let grant = Msg::Token(crate::token::TokenMsg::Grant {
            object: 1,
            lend: 1,
            seq: 5,
        });
        let mut b = grant.encode_body();
        assert_eq!(b.len(), 24);
        b[8..16].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(
            decode_all(&frame(msg_type::TOKEN_GRANT, 0, &b)),
            Err(WireError::Invalid("token lend id 0"))
        );
        assert_eq!(
            decode_all(&frame(msg_type::TOKEN_ACK, 0, &[1; 17])),
            Err(WireError::Trailing(1))
        );
        assert_eq!(
            decode_all(&frame(msg_type::TOKEN_REQUEST, 0, &[1; 7])),
            Err(WireError::Truncated)
        );
    }

    #[test]
    fn malformed_lease_messages_are_refused() {
        let ok = Msg::LeaseRequest(crate::lease::Request {
            volume_id: [5; 16],
            site: "p".into(),
            generation_number: 1,
            generation_id: 1,
            ttl_ms: 3000,
            renewal: false,
        });
        let body = ok.encode_body();
        // Generation 0.
        let mut b = body.clone();
        b[16..24].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(
            decode_all(&frame(msg_type::LEASE_REQUEST, 0, &b)),
            Err(WireError::Invalid("lease request for generation 0"))
        );
        // A release is checked the same way.
        assert_eq!(
            decode_all(&frame(msg_type::LEASE_RELEASE, 0, &b)),
            Err(WireError::Invalid("lease request for generation 0"))
        );
        // A renewal flag that is not a boolean.
        let mut b = body.clone();
        b[40] = 2;
        assert!(decode_all(&frame(msg_type::LEASE_REQUEST, 0, &b)).is_err());
        // A site name too long for the table.
        let long = Msg::LeaseRequest(crate::lease::Request {
            site: "x".repeat(crate::lease::SITE_NAME_MAX + 1),
            ..match ok {
                Msg::LeaseRequest(r) => r,
                _ => unreachable!(),
            }
        });
        assert_eq!(
            decode_all(&long.encode(false)),
            Err(WireError::Invalid(
                "lease request site name empty or too long"
            ))
        );
        assert_eq!(
            decode_all(&frame(msg_type::LEASE_RESPONSE, 0, &[9])),
            Err(WireError::Invalid("unknown lease answer"))
        );
        assert_eq!(
            decode_all(&frame(msg_type::LEASE_RESPONSE, 0, &[4, 0])),
            Err(WireError::Trailing(1))
        );
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Msg>, WireError> {
        let mut d = Decoder::new();
        d.push(bytes);
        let mut out = Vec::new();
        while let Some(m) = d.next_msg()? {
            out.push(m);
        }
        assert_eq!(d.buffered(), 0, "bytes left over");
        Ok(out)
    }

    #[test]
    fn every_message_kind_round_trips() {
        for compress in [false, true] {
            for m in all_kinds() {
                assert_eq!(decode_all(&m.encode(compress)), Ok(vec![m.clone()]));
            }
        }
    }

    #[test]
    fn manifest_xattr_names_are_bounded_and_validated() {
        let entry = |first_block: u64, xattrs: Vec<Vec<u8>>| ManifestEntry {
            path: RelPath::new(b"f".to_vec()).expect("path"),
            kind: 1,
            size: RESYNC_BLOCK * 2,
            first_block,
            hashes: vec![[1; 32]],
            xattrs,
        };
        let decode = |e: ManifestEntry| {
            let body = Msg::Manifest { entries: vec![e] }.encode_body();
            Msg::decode_body(msg_type::MANIFEST, &body)
        };
        let bad_name = Err(WireError::Invalid("invalid xattr name in manifest"));
        assert!(decode(entry(0, vec![b"user.a".to_vec()])).is_ok());
        assert_eq!(decode(entry(0, vec![Vec::new()])), bad_name);
        assert_eq!(decode(entry(0, vec![b"user.\0a".to_vec()])), bad_name);
        // 64 KiB of names in all, each counted with its terminator, and not a byte more.
        let full: Vec<Vec<u8>> = (0..256)
            .map(|i| {
                let mut n = format!("user.{i:03}").into_bytes();
                n.resize(XATTR_NAME_MAX, b'x');
                n
            })
            .collect();
        assert!(decode(entry(0, full.clone())).is_ok());
        let mut over = full;
        over.push(b"u".to_vec());
        assert_eq!(decode(entry(0, over)), bad_name);
        // A later piece of a file carries no names (the first one did).
        assert_eq!(
            decode(entry(1, vec![b"user.a".to_vec()])),
            Err(WireError::Invalid("manifest xattr count does not fit"))
        );
    }

    #[test]
    fn malformed_reintegration_messages_are_refused() {
        let decode = |m: &Msg| Msg::decode_body(m.type_code(), &m.encode_body());
        let path = |p: &[u8]| RelPath::new(p.to_vec()).expect("path");
        // A common point past the mirror's end, or no history.
        let d = Msg::Diverged {
            common_generation: 1,
            common_seq: 9,
            end: 8,
            history: vec![Generation {
                number: 1,
                id: 1,
                start: 1,
            }],
        };
        assert!(matches!(decode(&d), Err(WireError::Invalid(_))));
        let d = Msg::Diverged {
            common_generation: 1,
            common_seq: 1,
            end: 8,
            history: vec![],
        };
        assert!(matches!(decode(&d), Err(WireError::Invalid(_))));
        assert_eq!(
            decode(&Msg::Reintegrate { from: 0 }),
            Err(WireError::Invalid("reintegration from seq 0"))
        );
        // A tail's writes carry no data, nor do a copy's.
        let write = |data: Vec<u8>| Op::Write {
            path: path(b"f"),
            offset: 0,
            data,
        };
        let t = Msg::Tail {
            last: true,
            records: vec![Record {
                seq: 3,
                op: write(b"x".to_vec()),
            }],
        };
        assert_eq!(
            decode(&t),
            Err(WireError::Invalid("a tail record carries write data"))
        );
        let t = Msg::Tail {
            last: true,
            records: vec![Record {
                seq: 3,
                op: Op::Sync {
                    mirror: 1,
                    op: Box::new(write(b"x".to_vec())),
                },
            }],
        };
        assert!(decode(&t).is_err());
        // A tail with a gap.
        let t = Msg::Tail {
            last: false,
            records: vec![
                Record {
                    seq: 3,
                    op: write(vec![]),
                },
                Record {
                    seq: 5,
                    op: write(vec![]),
                },
            ],
        };
        assert_eq!(
            decode(&t),
            Err(WireError::Gap {
                expected: 4,
                got: 5
            })
        );
        // A bad boolean.
        let mut body = Msg::Tail {
            last: true,
            records: vec![],
        }
        .encode_body();
        body[0] = 2;
        assert!(matches!(
            Msg::decode_body(msg_type::TAIL, &body),
            Err(WireError::Invalid(_))
        ));
        // Fetch paths are validated like every path.
        let mut body = Msg::Fetch {
            id: 1,
            path: path(b"abc"),
            as_path: path(b"x"),
        }
        .encode_body();
        body[6..9].copy_from_slice(b"../");
        assert_eq!(
            Msg::decode_body(msg_type::FETCH, &body),
            Err(WireError::Invalid("invalid path"))
        );
        let body = Msg::Fetch {
            id: 1,
            path: path(b"abc"),
            as_path: path(b"x"),
        }
        .encode_body();
        assert_eq!(
            Msg::decode_body(msg_type::FETCH, &body[..body.len() - 1]),
            Err(WireError::Truncated)
        );
        // Entry ops are numbered from 1: a body whose first op has another seq is refused.
        let mut o = Out(Vec::new());
        o.u32(1);
        o.u8(1);
        o.records(std::iter::once((2u64, &write(vec![]))));
        assert_eq!(
            Msg::decode_body(msg_type::ENTRY, &o.0),
            Err(WireError::Invalid("entry ops are not numbered from 1"))
        );
        // Trailing bytes.
        let mut body = Msg::Reintegrated { conflicts: 1 }.encode_body();
        body.push(0);
        assert_eq!(
            Msg::decode_body(msg_type::REINTEGRATED, &body),
            Err(WireError::Trailing(1))
        );
    }

    #[test]
    fn oversize_frame_is_refused_before_buffering_it() {
        let mut f = Msg::Ping { nonce: 1 }.encode(false);
        f[8..12].copy_from_slice(&((WIRE_BODY_MAX + 1) as u32).to_le_bytes());
        let mut d = Decoder::new();
        d.push(&f[..WIRE_HEADER_BYTES]);
        assert_eq!(d.next_msg(), Err(WireError::TooLarge(WIRE_BODY_MAX + 1)));
    }

    #[test]
    fn a_gap_inside_a_batch_is_refused() {
        let recs = vec![
            Record {
                seq: 5,
                op: Op::Rmdir {
                    path: RelPath::new(b"a").expect("path"),
                },
            },
            Record {
                seq: 7,
                op: Op::Rmdir {
                    path: RelPath::new(b"b").expect("path"),
                },
            },
        ];
        let f = Msg::Records {
            settled: 7,
            records: recs,
        }
        .encode(false);
        assert_eq!(
            decode_all(&f),
            Err(WireError::Gap {
                expected: 6,
                got: 7
            })
        );
    }

    #[test]
    fn a_path_with_dotdot_inside_a_valid_frame_is_refused() {
        // Build a record frame by hand whose path is "../x", with a correct checksum.
        let good = Msg::Records {
            settled: 1,
            records: vec![Record {
                seq: 1,
                op: Op::Rmdir {
                    path: RelPath::new(b"abcx").expect("path"),
                },
            }],
        };
        let mut body = good.encode_body();
        let at = body
            .windows(4)
            .position(|w| w == b"abcx")
            .expect("path bytes");
        body[at..at + 3].copy_from_slice(b"../");
        // Fix the inner record checksum (offset 12 = start of the record frame).
        let rec = &mut body[12..];
        let blen = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]) as usize;
        let mut crc = crc32c::crc32c(&rec[0..8]);
        crc = crc32c::crc32c_append(crc, &rec[12..FRAME_HEADER_BYTES + blen]);
        rec[8..12].copy_from_slice(&crc.to_le_bytes());
        let f = frame(msg_type::RECORDS, 0, &body);
        assert!(matches!(
            decode_all(&f),
            Err(WireError::Record {
                index: 0,
                error: FrameError::Body(_)
            })
        ));
        // And an absolute path.
        body[at..at + 4].copy_from_slice(b"/etc");
        let rec = &mut body[12..];
        let mut crc = crc32c::crc32c(&rec[0..8]);
        crc = crc32c::crc32c_append(crc, &rec[12..FRAME_HEADER_BYTES + blen]);
        rec[8..12].copy_from_slice(&crc.to_le_bytes());
        assert!(decode_all(&frame(msg_type::RECORDS, 0, &body)).is_err());
        // A record's origin flag (the journal's) never travels: refused on the wire.
        body[at..at + 4].copy_from_slice(b"abcx");
        let rec = &mut body[12..];
        rec[13] = crate::journal::frame::FLAG_FROM_PEER;
        let mut crc = crc32c::crc32c(&rec[0..8]);
        crc = crc32c::crc32c_append(crc, &rec[12..FRAME_HEADER_BYTES + blen]);
        rec[8..12].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_all(&frame(msg_type::RECORDS, 0, &body)),
            Err(WireError::Record {
                index: 0,
                error: FrameError::Flags(crate::journal::frame::FLAG_FROM_PEER)
            })
        );
    }

    #[test]
    fn a_generation_history_is_bounded_and_ordered() {
        let hello = |history: Vec<Generation>| Msg::Hello {
            version: PROTOCOL_VERSION,
            volume_id: [1; 16],
            generation: 1,
            first_held: 1,
            next_seq: 1,
            compress: false,
            name: "p".into(),
            history,
        };
        let g = |number, start| Generation {
            number,
            id: number * 7,
            start,
        };
        let ok = hello(vec![g(1, 1), g(2, 9)]);
        assert_eq!(decode_all(&ok.encode(false)), Ok(vec![ok.clone()]));
        let bad = hello(vec![g(2, 1), g(1, 9)]).encode(false);
        assert!(matches!(decode_all(&bad), Err(WireError::Invalid(_))));
        let bad = hello(vec![g(1, 9), g(2, 9)]).encode(false);
        assert!(matches!(decode_all(&bad), Err(WireError::Invalid(_))));
        // A count beyond HISTORY_MAX is refused before anything is read.
        let mut body = hello(Vec::new()).encode_body();
        let n = body.len() - 1;
        body[n] = (HISTORY_MAX + 1) as u8;
        body.extend(std::iter::repeat_n(0u8, 24 * (HISTORY_MAX + 1)));
        let f = frame(msg_type::HELLO, 0, &body);
        assert!(matches!(decode_all(&f), Err(WireError::Invalid(_))));
        // The encoder sends at most HISTORY_MAX (the newest).
        let long: Vec<Generation> = (1..=40).map(|n| g(n, n * 10)).collect();
        let m = hello(long).encode(false);
        match decode_all(&m).as_deref() {
            Ok([Msg::Hello { history, .. }]) => {
                assert_eq!(history.len(), HISTORY_MAX);
                assert_eq!(history.last().map(|g| g.number), Some(40));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_verify_plan_out_of_order_or_of_unknown_scope_is_refused() {
        let good = Msg::Verify {
            volume_id: [1; 16],
            no_cache: false,
            plan: Some(vec![
                (RelPath::new("a").expect("path"), Scope::Entry),
                (RelPath::new("b").expect("path"), Scope::Subtree),
            ]),
        };
        let body = good.encode_body();
        assert_eq!(Msg::decode_body(msg_type::VERIFY, &body), Ok(good));
        // Swap the two items: b before a.
        let mut swapped = body[..17].to_vec();
        swapped.extend_from_slice(&2u32.to_le_bytes());
        swapped.extend_from_slice(&[1, 1, 0, b'b', 0, 1, 0, b'a']);
        assert_eq!(
            Msg::decode_body(msg_type::VERIFY, &swapped),
            Err(WireError::Invalid("verify plan out of order"))
        );
        let mut bad_scope = body.clone();
        bad_scope[21] = 7;
        assert_eq!(
            Msg::decode_body(msg_type::VERIFY, &bad_scope),
            Err(WireError::Invalid("unknown verify plan scope"))
        );
        let mut too_many = body[..17].to_vec();
        too_many.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            Msg::decode_body(msg_type::VERIFY, &too_many),
            Err(WireError::Invalid("verify plan too long"))
        );
        assert!(verify_plan_fits(&[(RelPath::root(), Scope::Subtree)]));
        let long = RelPath::new("x".repeat(200)).expect("path");
        assert!(!verify_plan_fits(&vec![(long, Scope::Entry); 3_000]));
    }

    #[test]
    fn unknown_type_flags_and_trailing_bytes_are_refused() {
        assert_eq!(
            decode_all(&frame(99, 0, &[])),
            Err(WireError::UnknownType(99))
        );
        assert_eq!(
            decode_all(&frame(msg_type::PING, 2, &[0; 8])),
            Err(WireError::Reserved)
        );
        assert_eq!(
            decode_all(&frame(msg_type::PING, 0, &[0; 9])),
            Err(WireError::Trailing(1))
        );
        assert_eq!(
            decode_all(&frame(msg_type::PING, 0, &[0; 7])),
            Err(WireError::Truncated)
        );
        assert_eq!(
            decode_all(&frame(
                msg_type::RECORDS,
                0,
                &[0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]
            )),
            Err(WireError::Invalid("record count exceeds the batch size"))
        );
    }

    #[test]
    fn a_zip_bomb_is_refused() {
        let plain = vec![0u8; WIRE_BODY_MAX + 4096];
        let c = zstd::bulk::compress(&plain, 1).expect("compress");
        assert_eq!(
            decode_all(&frame(msg_type::PING, FLAG_ZSTD, &c)),
            Err(WireError::Decompress)
        );
    }

    proptest! {
        #[test]
        fn records_round_trip_in_any_split(ops in prop::collection::vec(arb_op_with_sync(), 1..12),
                                           first in 1u64..1_000_000, cut in any::<prop::sample::Index>(),
                                           compress in any::<bool>()) {
            let records: Vec<Record> = ops.into_iter().enumerate()
                .map(|(i, op)| Record { seq: first + i as u64, op }).collect();
            let m = Msg::Records { settled: first + 3, records };
            let bytes = m.encode(compress);
            let at = cut.index(bytes.len());
            let mut d = Decoder::new();
            d.push(&bytes[..at]);
            let early = d.next_msg();
            prop_assert!(matches!(early, Ok(None)) || at == bytes.len());
            d.push(&bytes[at..]);
            prop_assert_eq!(d.next_msg(), Ok(Some(m)));
        }

        #[test]
        fn any_bit_flip_is_refused(i in any::<prop::sample::Index>(), which in 0usize..23) {
            let m = all_kinds().swap_remove(which);
            let mut bytes = m.encode(false);
            let bit = i.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let mut d = Decoder::new();
            d.push(&bytes);
            // Either refused, or (a flipped length) still waiting for bytes: never a message.
            prop_assert!(!matches!(d.next_msg(), Ok(Some(_))));
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let mut d = Decoder::new();
            d.push(&bytes);
            let _ = d.next_msg();
        }
    }
}
