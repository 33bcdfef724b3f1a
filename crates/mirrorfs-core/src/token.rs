//! Per-object write tokens for two writable sites (issue 7 item 5; MFS two-writer mode,
//! InterMezzo permits). One [`TokenSite`] per site: events in, actions out, time given as a value.
//!
//! ```text
//!  home (lower site id)                                  other site
//!   every token with no entry rests here
//!                       ◀── Request{object} ────────────  write to a token it lacks: park
//!   idle? ship records ≤ last write of the object,
//!   Persist(Away{lend}) then ─ Grant{object, lend, seq} ─▶ Persist(Held{lend, seq});
//!                                                          writes once the home's records
//!                                                          through `seq` are applied here
//!   wants it back ─ Request{object} ─────────────────────▶ busy: queued (hand over on close,
//!                                                          idle, or after hold_max_ms)
//!                       ◀── Grant{object, lend, seq} ───  given back (idle, asked, table full):
//!   Persist(Held{lend, seq}) then ── Ack{object, lend} ─▶  Persist(Forget): the entry goes
//! ```
//!
//! Why one holder at a time, with messages delayed, links cut and either site crashing:
//! - **A token is never free.** Each object's token is held by exactly one site or travels in
//!   one Grant. The home (the lower site id) holds every token neither table names, so there is
//!   no race for a free token and no tie to break: two requests for one token cross only while
//!   the token travels to one of the askers, and a site ignores a request for a token it does
//!   not hold (its own Grant is ahead of the request's answer on the ordered stream). The holder
//!   serves the queued request within `hold_max_ms` even if its files stay open, and new local
//!   writes park meanwhile, so neither side starves.
//! - **Persist before acting.** A site records `Away` durably before its Grant leaves, and
//!   `Held` durably before a write proceeds or an Ack leaves. A crash therefore never makes a
//!   site believe it holds a token it gave away; at worst a token is in a Grant that a cut link
//!   lost, and every (re)connection sends again the Grant of every `Away` entry.
//! - **Lend ids tell a fresh Grant from a stale one.** The home numbers each lend (`lend`, from a
//!   persisted counter); the other site gives a token back under the same lend id and the home
//!   acknowledges it. A Grant whose lend is not newer than the entry's is a duplicate from a
//!   re-sent Grant and is ignored; the entry that could tell is kept until the Ack, which the
//!   ordered stream delivers after every duplicate.
//! - **Records before the Grant.** A Grant carries `seq`, the granter's last journal record for
//!   the object (or a bound on it); it is sent only once the replication stream has sent every
//!   record through `seq` (ordered stream: they arrive first), and the new holder writes only
//!   once it has applied the granter's records through `seq`. A holder gives a token away only
//!   when no write to the object is in progress.
//!
//! While the link is down a site keeps writing to the tokens it holds; for the others the
//! mount's [`PartitionPolicy`] decides: `Reconcile` lets the write proceed unguarded (a file
//! changed at both sites is reconciled at the heal: `core::reconcile`), `ReadOnly` refuses it (`EROFS`). The shell makes each
//! [`Action::Persist`] durable before it carries out the actions after it, sends [`TokenMsg`]s on
//! the replication stream in order with the journal records, and tells the machine how far the
//! stream has sent ([`Event::Shipped`]) and how far the peer's records are applied here
//! ([`Event::PeerApplied`]). The messages, the states and the record layout are in
//! `docs/protocol.md` ("Write tokens").
//!
//! How a shell drives one site:
//! 1. start: [`TokenSite::recover`] from the durable records and the journal's end (or
//!    [`TokenSite::new`] for a new pair), then `PeerApplied` with its applier's position;
//! 2. each write call: `Write{write, object}`, then wait for the write's `Proceed` or `Refuse`
//!    (it may come out of a later event); once the write is journaled, `Written{object, seq,
//!    guarded}`; files opened and closed for writing: `Opened`, `Closed`;
//! 3. the link: `Connected{shipped}` (the position the peer holds, where the stream resumes),
//!    `Disconnected`, `Shipped` as the stream sends records, each token message received;
//! 4. `Tick` often enough for the timings (every 10 ms, say);
//! 5. the actions, in order: `Persist` made durable before the next action, `Send` after the
//!    records already sent, `Ship` (send records through a seq soon; it may repeat), `Proceed`
//!    and `Refuse` answer the parked or new write.

use std::collections::{BTreeMap, VecDeque};

use crate::op::Op;
use crate::path::RelPath;

/// A file system object whose changes a token guards (the shell's stable id for a name).
pub type ObjectId = u64;
/// A site's id; the lower of the two is the home of every token.
pub type SiteId = u64;
/// The shell's id for one write call, echoed in [`Action::Proceed`] or [`Action::Refuse`].
pub type WriteId = u64;

/// Tokens a site keeps entries for by default.
pub const ENTRIES_MAX: usize = 4096;
/// Writes a site parks (waiting for tokens) by default.
pub const PARKED_MAX: usize = 1024;
/// How long a holder asked for a token keeps it by default while its files stay open: a write
/// session (open, writes, close) shorter than this reaches the other site whole.
pub const HOLD_MAX_MS: u64 = 5_000;
/// A parked write waits at most this long beyond `hold_max_ms` (the records the token waits
/// for, the round trip) before it is refused ([`Refusal::Timeout`]).
pub const PARK_SLACK_MS: u64 = 10_000;

/// What a site does with writes to objects whose token is across a split (issue 7 item 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionPolicy {
    /// Keep writing; the reintegration after the heal merges or lists the conflicts.
    Reconcile,
    /// Refuse the write (`EROFS`) until the link is back.
    ReadOnly,
    /// Only the site holding the witness's partition lease writes (`core::quorum`): the shell
    /// tells the machine with [`Event::Majority`]; in majority a write to a token at the peer
    /// goes on unguarded (as `Reconcile`), otherwise it is refused (as `ReadOnly`).
    Quorum,
}

/// A site's limits and timings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    pub site: SiteId,
    pub peer: SiteId,
    /// Entries in the table (see [`TokenSite`] for what happens at the limit).
    pub entries_max: usize,
    /// Parked writes, all objects together; one more is refused ([`Refusal::ParkedFull`]).
    pub parked_max: usize,
    /// The other site gives back a token nobody used for this long.
    pub idle_ms: u64,
    /// A holder asked for a token hands it over within this long even with files open (once
    /// the writes in progress are done): the longest write session (open, writes, close) that
    /// reaches the other site whole, and the longest the other site waits for a token whose
    /// file stays open here.
    pub hold_max_ms: u64,
    /// A parked write is refused ([`Refusal::Timeout`]) after waiting this long.
    pub park_timeout_ms: u64,
    pub policy: PartitionPolicy,
}

impl TokenConfig {
    /// The defaults for a site `site` paired with `peer`.
    pub fn new(site: SiteId, peer: SiteId, policy: PartitionPolicy) -> Self {
        TokenConfig {
            site,
            peer,
            entries_max: ENTRIES_MAX,
            parked_max: PARKED_MAX,
            idle_ms: 2_000,
            hold_max_ms: HOLD_MAX_MS,
            park_timeout_ms: HOLD_MAX_MS + PARK_SLACK_MS,
            policy,
        }
    }

    /// The same with `hold_max_ms` (`mount --token-hold-max-ms`), the park timeout following
    /// it: a parked write may wait for a whole session at the other site, then for the token.
    pub fn with_hold_max(self, hold_max_ms: u64) -> Self {
        TokenConfig {
            hold_max_ms,
            park_timeout_ms: hold_max_ms.saturating_add(PARK_SLACK_MS),
            ..self
        }
    }
}

/// The names whose tokens a change through the mount takes (`docs/protocol.md`, "Which tokens
/// a change takes"): a data or metadata change (write, truncate, fallocate, chmod, chown,
/// times, xattrs) the token of its object's name; a change that makes or removes a name
/// (create, mkdir, mknod, symlink, unlink, rmdir) that name's token; a rename both names' (the
/// name that goes and the name it takes, whatever that named before); a link both names' (the
/// new name, and the existing one whose file gains a link: a rename or unlink of it at the
/// other site must not cross the link). Never the parent directory's: changes to different
/// names in one directory commute, and two sites filling one directory would otherwise pass
/// its token back and forth on every create. Records that change no tree (aborts, a copy's
/// records, group marks) take none.
pub fn names_of(op: &Op) -> Vec<&RelPath> {
    match op {
        Op::Link { from, to } | Op::Rename { from, to, .. } => vec![from, to],
        // A sync record names the change it syncs, which took its tokens already.
        Op::Sync { .. } => Vec::new(),
        // Every other change names one path (`Op::path`); aborts, sync-done and group marks
        // none.
        _ => op.path().into_iter().collect(),
    }
}

/// The token every change to the data or metadata of a file with more than one link takes, in
/// addition to its name's (`docs/protocol.md`, "Which tokens a change takes"). Write tokens are
/// per name (the object of a name is a hash of its path, which both sites agree on; an inode is
/// known only locally), so two names of one file would otherwise let both sites write the file
/// at once. Both sites agree on *whether* a file is hard-linked once each holds the name's token
/// (every change that makes a name a link of a file — `link` — takes the token of the existing
/// name, and the new holder of a token has applied the granter's records for it), so one shared
/// token serializes the changes to every hard-linked file. Coarse: writes to two different
/// hard-linked files at the two sites pass this one token back and forth.
///
/// The smallest object id a name can not have, so [`acquire_order`] takes it before every
/// name's: a change of a hard-linked file waits for it holding no other token, and a file
/// open for writing that has more than one link holds this token for its session *instead of*
/// its name's (two tokens held by sessions at two sites, each waiting for the other's, would
/// wait for each other until `hold_max_ms` split both sessions). The link count is read before
/// the tokens are taken and again once the names' are held ([`after_names`]): a file that
/// became hard-linked in between (the other site's `link` of the name, applied before its
/// token came here) gives the names back and takes them again after this one.
/// [`name_object`] never gives it (nor 0) to a name.
pub const HARD_LINKED: ObjectId = 1;

/// A name's object from the hash of its path: never 0 (the log's record of the lend counter)
/// nor [`HARD_LINKED`].
pub fn name_object(hash: u64) -> ObjectId {
    hash.max(HARD_LINKED + 1)
}

/// The name of the file whose data or metadata a change changes in place (write, truncate,
/// fallocate, chmod, chown, times, xattrs): such a change takes [`HARD_LINKED`] too when that
/// file has more than one link ([`takes_hard_linked`]). None for a change of names (a `link`
/// takes both names' tokens: the existing name's is what orders it before the other site's
/// next change through that name, which then sees the new link count).
pub fn changed_file(op: &Op) -> Option<&RelPath> {
    match op {
        Op::Write { path, .. }
        | Op::Truncate { path, .. }
        | Op::Fallocate { path, .. }
        | Op::SetMode { path, .. }
        | Op::SetOwner { path, .. }
        | Op::SetTimes { path, .. }
        | Op::SetXattr { path, .. }
        | Op::RemoveXattr { path, .. } => Some(path),
        _ => None,
    }
}

/// Whether a change of a file's data or metadata takes [`HARD_LINKED`] (and a file opened for
/// writing holds it for its session in place of its name's): the entry is not a directory (a
/// directory's link count counts its subdirectories) and has more than one link. Read under
/// the names' tokens ([`after_names`]; the shell reads it once, `Volume::take_file_tokens`):
/// by then the other site's changes to those names (a `link` of one) are applied here. Once
/// the names' tokens are held the count cannot grow at the other site (that needs a `link` of
/// a name whose token this site holds).
pub fn takes_hard_linked(directory: bool, nlink: u64) -> bool {
    !directory && nlink > 1
}

/// What a change of a file's data or metadata does once it holds the tokens it took, having
/// read the file's link count under them ([`HARD_LINKED`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterNames {
    /// The tokens held cover the change.
    Go,
    /// The file is hard-linked (perhaps since the other site's `link` of the name, applied
    /// before the name's token came here) and the change took the names' tokens only: give
    /// them back unused and take them again with [`HARD_LINKED`] first. Never asked twice of
    /// one change: the second round holds `HARD_LINKED`.
    Again,
}

/// [`AfterNames`] for a change that took [`HARD_LINKED`] (`shared`) or not, with the link
/// count read under the names' tokens. A count that dropped meanwhile (the other site removed
/// another name) only took the shared token without need.
pub fn after_names(shared: bool, directory: bool, nlink: u64) -> AfterNames {
    if !shared && takes_hard_linked(directory, nlink) {
        AfterNames::Again
    } else {
        AfterNames::Go
    }
}

/// The order a change takes several tokens in, at both sites: ascending object ids, each once
/// (a rename onto its own name takes one). A change that waits for a token holds only lower
/// ones, so two changes can never each wait for a token the other holds (no cycle); and a
/// token held by an open file is served within `hold_max_ms`, so a change never waits for ever.
pub fn acquire_order(mut objects: Vec<ObjectId>) -> Vec<ObjectId> {
    objects.sort_unstable();
    objects.dedup();
    objects
}

/// A token message (wire types 19–22 and 31–32, `docs/protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMsg {
    /// The sender wants to write `object`.
    Request { object: ObjectId },
    /// The token of `object` is the receiver's (lend `lend`, ≥ 1), once it has applied the
    /// sender's records through `seq`.
    Grant {
        object: ObjectId,
        lend: u64,
        seq: u64,
    },
    /// Home → other: the token given back under `lend` is recorded at home.
    Ack { object: ObjectId, lend: u64 },
    /// Home → other: no room in the home's table to lend `object`.
    Refuse { object: ObjectId },
    /// `--partition quorum` (`core::quorum`, wire type 31): may the sender write under its
    /// tokens? The machine ignores it; the shell's quorum answers.
    Probe { nonce: u64 },
    /// The answer to `Probe{nonce}` (wire type 32): the sender writes none of the receiver's
    /// tokens for a ttl, and its records through `seq` come first.
    Answer { nonce: u64, seq: u64 },
}

/// Why a write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("read-only: the write token is at the other site and the link is down")]
    ReadOnly,
    #[error("too many writes wait for write tokens")]
    ParkedFull,
    #[error("the write token table is full of tokens in use")]
    TableFull,
    #[error("the other site's write token table is full of tokens in use")]
    PeerTableFull,
    #[error("the write token did not arrive in time")]
    Timeout,
    /// `--partition quorum`: the peer does not answer and this site may not write (no lease
    /// from the witness, or the peer may still write for a moment: `core::quorum`).
    #[error("read-only: the peer is unreachable and this site is not the majority of the split")]
    NoQuorum,
}

/// An input to [`TokenSite::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A write to `object` wants to start.
    Write {
        write: WriteId,
        object: ObjectId,
    },
    /// A write that proceeded is done and journaled at `seq` (0 if it failed); `guarded` as
    /// its [`Action::Proceed`] said.
    Written {
        object: ObjectId,
        seq: u64,
        guarded: bool,
    },
    /// A file of `object` was opened for writing.
    Opened {
        object: ObjectId,
    },
    /// A file of `object` opened for writing was closed.
    Closed {
        object: ObjectId,
    },
    /// The link is up; the stream has sent (or the peer holds) our records through `shipped`.
    Connected {
        shipped: u64,
    },
    Disconnected,
    /// The stream has sent our records through `seq` (on this connection).
    Shipped {
        seq: u64,
    },
    /// The peer's records through `seq` are applied at this site.
    PeerApplied {
        seq: u64,
    },
    /// A message from the peer.
    Received(TokenMsg),
    /// Time passed.
    Tick,
    /// `PartitionPolicy::Quorum`: this site is (or no longer is) the majority of a split
    /// (`core::quorum::Mode::Majority`): writes to tokens at the peer go on without them, the
    /// parked ones too.
    Majority {
        on: bool,
    },
}

/// An output of [`TokenSite::handle`], to be carried out in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Make this record durable before carrying out any later action.
    Persist(TokenRecord),
    /// Send on the replication stream, after every record already sent.
    Send(TokenMsg),
    /// Please send our records through `through` soon: a Grant waits for them.
    Ship { through: u64 },
    /// The write may go on: with the token (`guarded`), or without it across a split
    /// (`Reconcile`).
    Proceed {
        write: WriteId,
        object: ObjectId,
        guarded: bool,
    },
    Refuse {
        write: WriteId,
        object: ObjectId,
        reason: Refusal,
    },
}

/// What a persisted record says about one object (layout in `docs/protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// This site holds the token under `lend`, writable once the peer's records through `seq`
    /// are applied.
    Held = 1,
    /// This site granted the token under `lend` after its records through `seq`.
    Away = 2,
    /// No entry: the home holds the token.
    Forget = 3,
}

/// One durable change of the token table; the last record of an object wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRecord {
    pub object: ObjectId,
    pub kind: RecordKind,
    pub lend: u64,
    pub seq: u64,
    /// The home's next lend id when the record was made (never reused after a crash).
    pub lend_next: u64,
}

/// Size of an encoded [`TokenRecord`].
pub const RECORD_BYTES: usize = 48;
/// Magic bytes that open every encoded [`TokenRecord`].
pub const RECORD_MAGIC: [u8; 4] = *b"MFTK";

/// Why a persisted token record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("token record of {0} bytes, expected {RECORD_BYTES}")]
    Length(usize),
    #[error("token record has a bad magic, checksum or reserved bytes")]
    Corrupt,
    #[error("token record of unknown kind {0}")]
    Kind(u8),
}

impl TokenRecord {
    /// The record's bytes: magic, kind, reserved, object, lend, seq, lend_next, crc32c, zero.
    pub fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        b[4] = self.kind as u8;
        b[8..16].copy_from_slice(&self.object.to_le_bytes());
        b[16..24].copy_from_slice(&self.lend.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.lend_next.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks one record.
    pub fn decode(b: &[u8]) -> Result<TokenRecord, RecordError> {
        if b.len() != RECORD_BYTES {
            return Err(RecordError::Length(b.len()));
        }
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        let crc = u32::from_le_bytes([b[40], b[41], b[42], b[43]]);
        if b[0..4] != RECORD_MAGIC
            || b[5..8] != [0; 3]
            || b[44..48] != [0; 4]
            || crc32c::crc32c(&b[0..40]) != crc
        {
            return Err(RecordError::Corrupt);
        }
        let kind = match b[4] {
            1 => RecordKind::Held,
            2 => RecordKind::Away,
            3 => RecordKind::Forget,
            k => return Err(RecordError::Kind(k)),
        };
        Ok(TokenRecord {
            object: u64_at(8),
            kind,
            lend: u64_at(16),
            seq: u64_at(24),
            lend_next: u64_at(32),
        })
    }
}

/// Where a token is, as this site sees it (for status and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    /// This site holds it; `writable` once the peer's records it waits for are applied.
    Held { lend: u64, writable: bool },
    /// This site is handing it over: waiting for its records to be shipped.
    Returning { lend: u64 },
    /// Granted to the peer (home) or given back and not yet acknowledged (other site).
    Away { lend: u64 },
    /// The peer holds it.
    Remote,
    /// The peer holds it (or it is on its way here) and this site asked for it.
    Requesting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Ours under `lend` (0: at home, never lent); writes wait for the peer's records ≤ `wait`.
    Held { lend: u64, wait: u64 },
    /// Being handed over once our records ≤ `seq` are shipped (`wait` kept to fall back on).
    Giving { lend: u64, wait: u64, seq: u64 },
    /// Granted under `lend` after our records ≤ `seq`; `sent` on this connection.
    Away { lend: u64, seq: u64, sent: bool },
    /// The peer holds it (the other site only; the home has no such entry).
    Remote,
}

#[derive(Debug, Clone)]
struct Entry {
    state: State,
    /// Files open for writing.
    open: u32,
    /// Writes that proceeded and are not yet `Written`.
    writing: u32,
    /// Our last journal record for the object (or a bound on it).
    last_write: u64,
    /// Last local use, for idle give-backs and the least-recently-used choice.
    used_at: u64,
    /// When the peer's request for the token arrived (we hold it).
    peer_asked: Option<u64>,
    /// Since when the held token is writable (the peer's records it waits for are applied):
    /// `hold_max_ms` counts from here too, so that writes parked before the token came run
    /// once it is usable, however long the records took.
    writable_at: Option<u64>,
    /// We sent a Request on this connection.
    asked: bool,
    /// Parked writes, oldest first, with the time each parked.
    parked: VecDeque<(WriteId, u64)>,
}

impl Entry {
    fn new(state: State, last_write: u64, now: u64) -> Entry {
        Entry {
            state,
            open: 0,
            writing: 0,
            last_write,
            used_at: now,
            peer_asked: None,
            writable_at: None,
            asked: false,
            parked: VecDeque::new(),
        }
    }

    /// Nothing local uses the token.
    fn quiet(&self) -> bool {
        self.open == 0 && self.writing == 0 && self.parked.is_empty()
    }
}

/// One site's token table.
///
/// At home an entry never lent (lend 0) goes as soon as it is quiet (`drop_if_spent`): the
/// home's table holds the tokens in use, lent, or given back, not every object written lately.
/// At the table's limit a new entry first replaces the least-recently used entry that can go
/// without a message (at home an idle token it holds — no entry means "held at home" —; at the
/// other site an idle `Remote`); failing that the other site starts giving back its
/// least-recently used idle token, and the write (or the peer's request, answered with
/// `Refuse`) is refused with [`Refusal::TableFull`]. A Grant is always taken, even at the limit
/// (refusing it would lose the token); only Grants answering requests sent before a crash can
/// come unasked, so the table exceeds its limit by at most that many, and shrinks back by
/// giving idle tokens back.
#[derive(Debug, Clone)]
pub struct TokenSite {
    config: TokenConfig,
    home: bool,
    connected: bool,
    /// Our records through this are sent on this connection (or held by the peer).
    shipped: u64,
    /// The peer's records through this are applied here.
    applied: u64,
    /// The next lend id (home).
    lend_next: u64,
    /// Every record of ours for an object without an entry is ≤ this.
    write_floor: u64,
    entries: BTreeMap<ObjectId, Entry>,
    parked: usize,
    /// Writes that proceeded without a token (across a split) and are not yet `Written`: no
    /// Grant leaves before they are journaled, so that it covers them.
    unguarded: u32,
    /// `PartitionPolicy::Quorum`: this site is the majority of a split ([`Event::Majority`]).
    majority: bool,
}

impl TokenSite {
    /// A site with no token history (a new pair of sites).
    pub fn new(config: TokenConfig) -> TokenSite {
        TokenSite {
            home: config.site < config.peer,
            config,
            connected: false,
            shipped: 0,
            applied: 0,
            lend_next: 1,
            write_floor: 0,
            entries: BTreeMap::new(),
            parked: 0,
            unguarded: 0,
            majority: false,
        }
    }

    /// The table after a restart, from the durable records in the order they were made, and the
    /// last seq of this site's journal (a bound on its records for every object). The shell
    /// feeds [`Event::PeerApplied`] with its applier's position before the first write.
    pub fn recover(
        config: TokenConfig,
        now: u64,
        records: &[TokenRecord],
        journal_end: u64,
    ) -> Self {
        let mut site = TokenSite::new(config);
        site.write_floor = journal_end;
        let mut last: BTreeMap<ObjectId, TokenRecord> = BTreeMap::new();
        for r in records {
            site.lend_next = site
                .lend_next
                .max(r.lend_next)
                .max(r.lend.saturating_add(1));
            match r.kind {
                RecordKind::Forget => {
                    last.remove(&r.object);
                }
                _ => {
                    last.insert(r.object, *r);
                }
            }
        }
        for (object, r) in last {
            let state = match r.kind {
                RecordKind::Held => State::Held {
                    lend: r.lend,
                    wait: r.seq,
                },
                _ => State::Away {
                    lend: r.lend,
                    seq: r.seq,
                    sent: false,
                },
            };
            site.entries
                .insert(object, Entry::new(state, journal_end, now));
        }
        site
    }

    /// True if this site holds the token of `object` (it may be handing it over).
    pub fn holds(&self, object: ObjectId) -> bool {
        match self.entries.get(&object).map(|e| e.state) {
            None => self.home,
            Some(State::Held { .. } | State::Giving { .. }) => true,
            Some(State::Away { .. } | State::Remote) => false,
        }
    }

    /// Where the token of `object` is, as this site sees it.
    pub fn state(&self, object: ObjectId) -> TokenState {
        let Some(e) = self.entries.get(&object) else {
            return if self.home {
                TokenState::Held {
                    lend: 0,
                    writable: true,
                }
            } else {
                TokenState::Remote
            };
        };
        match e.state {
            State::Held { lend, wait } => TokenState::Held {
                lend,
                writable: wait <= self.applied,
            },
            State::Giving { lend, .. } => TokenState::Returning { lend },
            State::Away { .. } | State::Remote if e.asked => TokenState::Requesting,
            State::Away { lend, .. } => TokenState::Away { lend },
            State::Remote => TokenState::Remote,
        }
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes parked now.
    pub fn parked(&self) -> usize {
        self.parked
    }

    pub fn config(&self) -> &TokenConfig {
        &self.config
    }

    /// Writes that proceeded without their token and are not journaled yet.
    pub fn unguarded(&self) -> u32 {
        self.unguarded
    }

    /// Whether a write to `object` without its token goes on now, across a split.
    fn unguarded_ok(&self) -> bool {
        match self.config.policy {
            PartitionPolicy::Reconcile => true,
            PartitionPolicy::ReadOnly => false,
            PartitionPolicy::Quorum => self.majority,
        }
    }

    /// Handles one event at `now` (ms, any monotonic clock) and returns what to do, in order.
    pub fn handle(&mut self, now: u64, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Write { write, object } => self.on_write(now, write, object, &mut out),
            Event::Written {
                object,
                seq,
                guarded,
            } => self.on_written(now, object, seq, guarded, &mut out),
            Event::Opened { object } => {
                if self.entry_or_make(now, object, &mut out) {
                    if let Some(e) = self.entries.get_mut(&object) {
                        e.open = e.open.saturating_add(1);
                    }
                }
            }
            Event::Closed { object } => {
                if let Some(e) = self.entries.get_mut(&object) {
                    e.open = e.open.saturating_sub(1);
                }
                self.maybe_hand_over(now, object, &mut out);
                self.drop_if_spent(object);
            }
            Event::Connected { shipped } => self.on_connected(shipped, &mut out),
            Event::Disconnected => self.on_disconnected(&mut out),
            Event::Shipped { seq } => {
                self.shipped = self.shipped.max(seq);
                self.send_ready(&mut out);
            }
            Event::PeerApplied { seq } => {
                self.applied = self.applied.max(seq);
                // Only an entry with parked writes, or a held token not yet writable, can change
                // here: the home keeps up to `entries_max` idle entries, and a pair streaming
                // name changes sends a `PeerApplied` per batch.
                let objects: Vec<ObjectId> = self
                    .entries
                    .iter()
                    .filter(|(_, e)| {
                        !e.parked.is_empty()
                            || (e.writable_at.is_none() && matches!(e.state, State::Held { .. }))
                    })
                    .map(|(o, _)| *o)
                    .collect();
                for object in objects {
                    self.proceed_parked(now, object, &mut out);
                }
            }
            Event::Received(msg) => self.on_msg(now, msg, &mut out),
            Event::Tick => self.on_tick(now, &mut out),
            Event::Majority { on } => self.on_majority(on, &mut out),
        }
        out
    }

    fn on_write(&mut self, now: u64, write: WriteId, object: ObjectId, out: &mut Vec<Action>) {
        if (!self.connected || self.majority) && !self.holds(object) {
            let go = self.unguarded_ok();
            if go {
                self.unguarded += 1;
            }
            out.push(match go {
                true => Action::Proceed {
                    write,
                    object,
                    guarded: false,
                },
                false => Action::Refuse {
                    write,
                    object,
                    reason: Refusal::ReadOnly,
                },
            });
            return;
        }
        if !self.entry_or_make(now, object, out) {
            out.push(Action::Refuse {
                write,
                object,
                reason: Refusal::TableFull,
            });
            return;
        }
        self.note_writable(now, object);
        let ready = self.writable(now, object);
        let (parked_full, connected) = (self.parked >= self.config.parked_max, self.connected);
        let Some(e) = self.entries.get_mut(&object) else {
            return;
        };
        e.used_at = now;
        if ready {
            e.writing += 1;
            out.push(Action::Proceed {
                write,
                object,
                guarded: true,
            });
            return;
        }
        if parked_full {
            out.push(Action::Refuse {
                write,
                object,
                reason: Refusal::ParkedFull,
            });
            return;
        }
        e.parked.push_back((write, now));
        self.parked += 1;
        // A token on its way out (Giving, or Away whose Grant is not sent yet) is asked for
        // right after its Grant leaves: asked earlier, the peer would ignore the request.
        let away_sent = matches!(e.state, State::Away { sent: true, .. } | State::Remote);
        if away_sent && connected && !e.asked {
            e.asked = true;
            out.push(Action::Send(TokenMsg::Request { object }));
        }
    }

    /// A guarded write to `object` may proceed now.
    fn writable(&self, now: u64, object: ObjectId) -> bool {
        let Some(e) = self.entries.get(&object) else {
            return false;
        };
        let State::Held { wait, .. } = e.state else {
            return false;
        };
        wait <= self.applied && !self.hand_over_due(e, now)
    }

    /// The peer asked and we held the token, writable, for `hold_max_ms` since: new writes
    /// park, and the token goes once the writes in progress are done.
    fn hand_over_due(&self, e: &Entry, now: u64) -> bool {
        match (e.peer_asked, e.writable_at) {
            (Some(asked), Some(writable)) => {
                now >= asked.max(writable).saturating_add(self.config.hold_max_ms)
            }
            _ => false,
        }
    }

    /// Notes when the held token of `object` became writable.
    fn note_writable(&mut self, now: u64, object: ObjectId) {
        let applied = self.applied;
        if let Some(e) = self.entries.get_mut(&object) {
            if matches!(e.state, State::Held { wait, .. } if wait <= applied)
                && e.writable_at.is_none()
            {
                e.writable_at = Some(now);
            }
        }
    }

    fn on_written(
        &mut self,
        now: u64,
        object: ObjectId,
        seq: u64,
        guarded: bool,
        out: &mut Vec<Action>,
    ) {
        if !guarded {
            self.unguarded = self.unguarded.saturating_sub(1);
        }
        match self.entries.get_mut(&object) {
            Some(e) => {
                if guarded {
                    e.writing = e.writing.saturating_sub(1);
                }
                e.last_write = e.last_write.max(seq);
                e.used_at = now;
            }
            None => self.write_floor = self.write_floor.max(seq),
        }
        if guarded {
            self.maybe_hand_over(now, object, out);
            self.drop_if_spent(object);
        } else if self.unguarded == 0 {
            self.send_ready(out);
        }
    }

    fn on_connected(&mut self, shipped: u64, out: &mut Vec<Action>) {
        self.connected = true;
        self.shipped = shipped;
        for e in self.entries.values_mut() {
            e.asked = false;
            if let State::Away { sent, .. } = &mut e.state {
                *sent = false;
            }
        }
        self.send_ready(out);
        for (object, e) in self.entries.iter_mut() {
            match e.state {
                State::Away { sent: true, .. } | State::Remote
                    if !e.parked.is_empty() && !e.asked =>
                {
                    e.asked = true;
                    out.push(Action::Send(TokenMsg::Request { object: *object }));
                }
                _ => {}
            }
        }
    }

    fn on_disconnected(&mut self, out: &mut Vec<Action>) {
        self.connected = false;
        let go = self.unguarded_ok();
        for (object, e) in self.entries.iter_mut() {
            e.asked = false;
            e.peer_asked = None;
            match e.state {
                // The peer's request went with the link; it asks again when it is back.
                State::Giving { lend, wait, .. } => e.state = State::Held { lend, wait },
                State::Away { lend, seq, .. } => {
                    e.state = State::Away {
                        lend,
                        seq,
                        sent: false,
                    }
                }
                State::Held { .. } | State::Remote => {}
            }
            if matches!(e.state, State::Held { .. }) {
                continue;
            }
            // Writes waiting for a token across the split: the policy decides now.
            for (write, _) in e.parked.drain(..) {
                self.parked -= 1;
                if go {
                    self.unguarded += 1;
                }
                out.push(match go {
                    true => Action::Proceed {
                        write,
                        object: *object,
                        guarded: false,
                    },
                    false => Action::Refuse {
                        write,
                        object: *object,
                        reason: Refusal::ReadOnly,
                    },
                });
            }
        }
    }

    /// The quorum made this site the majority of a split (or no longer): in majority the writes
    /// parked for tokens at the peer go on without them.
    fn on_majority(&mut self, on: bool, out: &mut Vec<Action>) {
        self.majority = on && self.config.policy == PartitionPolicy::Quorum;
        if !self.majority {
            return;
        }
        for (object, e) in self.entries.iter_mut() {
            if matches!(e.state, State::Held { .. } | State::Giving { .. }) {
                continue;
            }
            for (write, _) in e.parked.drain(..) {
                self.parked -= 1;
                self.unguarded += 1;
                out.push(Action::Proceed {
                    write,
                    object: *object,
                    guarded: false,
                });
            }
        }
    }

    fn on_msg(&mut self, now: u64, msg: TokenMsg, out: &mut Vec<Action>) {
        match msg {
            TokenMsg::Request { object } => self.on_request(now, object, out),
            TokenMsg::Grant { object, lend, seq } if self.home => {
                self.on_given_back(now, object, lend, seq, out)
            }
            TokenMsg::Grant { object, lend, seq } => self.on_grant(now, object, lend, seq, out),
            TokenMsg::Ack { object, lend } => self.on_ack(object, lend, out),
            TokenMsg::Refuse { object } => self.on_refuse(object, out),
            // The quorum's messages (`core::quorum`): the shell's.
            TokenMsg::Probe { .. } | TokenMsg::Answer { .. } => {}
        }
    }

    fn on_request(&mut self, now: u64, object: ObjectId, out: &mut Vec<Action>) {
        if !self.holds(object) {
            // The token is on its way to the peer (our Grant is ahead of any answer).
            return;
        }
        if !self.entries.contains_key(&object) && !self.entry_or_make(now, object, out) {
            out.push(Action::Send(TokenMsg::Refuse { object }));
            return;
        }
        if let Some(e) = self.entries.get_mut(&object) {
            if matches!(e.state, State::Held { .. }) && e.peer_asked.is_none() {
                e.peer_asked = Some(now);
            }
        }
        self.maybe_hand_over(now, object, out);
    }

    /// The other site receives a token from the home.
    fn on_grant(&mut self, now: u64, object: ObjectId, lend: u64, seq: u64, out: &mut Vec<Action>) {
        let known = self.entries.get(&object).and_then(|e| match e.state {
            State::Held { lend, .. } | State::Giving { lend, .. } | State::Away { lend, .. } => {
                Some(lend)
            }
            State::Remote => None,
        });
        if known.is_some_and(|l| l >= lend) {
            return;
        }
        let floor = self.write_floor;
        let e = self
            .entries
            .entry(object)
            .or_insert_with(|| Entry::new(State::Remote, floor, now));
        e.state = State::Held { lend, wait: seq };
        e.asked = false;
        e.peer_asked = None;
        e.writable_at = None;
        e.used_at = now;
        out.push(Action::Persist(TokenRecord {
            object,
            kind: RecordKind::Held,
            lend,
            seq,
            lend_next: self.lend_next,
        }));
        self.proceed_parked(now, object, out);
        if self.entries.len() > self.config.entries_max {
            self.make_room(out);
        }
    }

    /// The home receives a token given back.
    fn on_given_back(
        &mut self,
        now: u64,
        object: ObjectId,
        lend: u64,
        seq: u64,
        out: &mut Vec<Action>,
    ) {
        let lend_next = self.lend_next;
        if let Some(e) = self.entries.get_mut(&object) {
            if matches!(e.state, State::Away { lend: l, .. } if l == lend) {
                e.state = State::Held { lend, wait: seq };
                e.asked = false;
                e.peer_asked = None;
                e.writable_at = None;
                e.used_at = now;
                out.push(Action::Persist(TokenRecord {
                    object,
                    kind: RecordKind::Held,
                    lend,
                    seq,
                    lend_next,
                }));
                out.push(Action::Send(TokenMsg::Ack { object, lend }));
                self.proceed_parked(now, object, out);
                return;
            }
        }
        // A duplicate of a give-back already taken: the other site may forget it.
        out.push(Action::Send(TokenMsg::Ack { object, lend }));
    }

    fn on_ack(&mut self, object: ObjectId, lend: u64, out: &mut Vec<Action>) {
        let Some(e) = self.entries.get_mut(&object) else {
            return;
        };
        if !matches!(e.state, State::Away { lend: l, .. } if l == lend) {
            return;
        }
        e.state = State::Remote;
        out.push(Action::Persist(TokenRecord {
            object,
            kind: RecordKind::Forget,
            lend,
            seq: 0,
            lend_next: self.lend_next,
        }));
        if e.quiet() {
            self.drop_entry(object, out);
        }
    }

    fn on_refuse(&mut self, object: ObjectId, out: &mut Vec<Action>) {
        let Some(e) = self.entries.get_mut(&object) else {
            return;
        };
        if !matches!(e.state, State::Remote) {
            return;
        }
        e.asked = false;
        for (write, _) in e.parked.drain(..) {
            self.parked -= 1;
            out.push(Action::Refuse {
                write,
                object,
                reason: Refusal::PeerTableFull,
            });
        }
        if e.quiet() {
            self.drop_entry(object, out);
        }
    }

    fn on_tick(&mut self, now: u64, out: &mut Vec<Action>) {
        let timeout = self.config.park_timeout_ms;
        let objects: Vec<ObjectId> = self.entries.keys().copied().collect();
        for object in objects {
            if let Some(e) = self.entries.get_mut(&object) {
                while let Some(&(write, since)) = e.parked.front() {
                    if now < since.saturating_add(timeout) {
                        break;
                    }
                    e.parked.pop_front();
                    self.parked -= 1;
                    out.push(Action::Refuse {
                        write,
                        object,
                        reason: Refusal::Timeout,
                    });
                }
            }
            self.maybe_hand_over(now, object, out);
            self.drop_if_idle(now, object, out);
        }
        if self.entries.len() > self.config.entries_max {
            self.make_room(out);
        }
    }

    /// Gives the token of `object` away if the peer asked and we may, or (other site) if it
    /// idled for `idle_ms`.
    fn maybe_hand_over(&mut self, now: u64, object: ObjectId, out: &mut Vec<Action>) {
        self.note_writable(now, object);
        let (home, idle_ms) = (self.home, self.config.idle_ms);
        let Some(e) = self.entries.get(&object) else {
            return;
        };
        if !matches!(e.state, State::Held { .. }) || e.writing > 0 || !self.connected {
            return;
        }
        let give = match e.peer_asked {
            Some(_) => e.quiet() || self.hand_over_due(e, now),
            None => !home && e.quiet() && now >= e.used_at.saturating_add(idle_ms),
        };
        if give {
            self.give(object, out);
        }
    }

    /// Starts handing the held token of `object` to the peer.
    fn give(&mut self, object: ObjectId, out: &mut Vec<Action>) {
        let Some(e) = self.entries.get_mut(&object) else {
            return;
        };
        let State::Held { lend, wait } = e.state else {
            return;
        };
        let seq = e.last_write;
        e.state = State::Giving { lend, wait, seq };
        self.send_ready(out);
    }

    /// Sends every Grant whose records are shipped: completes hand-overs, and sends again the
    /// Grants of `Away` entries after a (re)connection.
    fn send_ready(&mut self, out: &mut Vec<Action>) {
        if !self.connected || self.unguarded > 0 {
            return;
        }
        let shipped = self.shipped;
        let home = self.home;
        // One hint for all the Grants that wait for records.
        let mut ship = 0;
        for (object, e) in self.entries.iter_mut() {
            let (lend, seq, giving) = match e.state {
                State::Giving { lend, seq, .. } => (lend, seq, true),
                State::Away {
                    lend,
                    seq,
                    sent: false,
                } => (lend, seq, false),
                _ => continue,
            };
            // Our writes made since (across a split, `Reconcile`, and journaled only now) travel
            // ahead of the Grant too.
            let seq = seq.max(e.last_write);
            if seq > shipped {
                ship = ship.max(seq);
                continue;
            }
            let lend = if giving && home {
                // The home numbers each lend; the other site gives back under the lend.
                let l = self.lend_next;
                self.lend_next += 1;
                l
            } else {
                lend
            };
            if giving {
                out.push(Action::Persist(TokenRecord {
                    object: *object,
                    kind: RecordKind::Away,
                    lend,
                    seq,
                    lend_next: self.lend_next,
                }));
                e.peer_asked = None;
            }
            e.state = State::Away {
                lend,
                seq,
                sent: true,
            };
            out.push(Action::Send(TokenMsg::Grant {
                object: *object,
                lend,
                seq,
            }));
            if !e.parked.is_empty() && !e.asked {
                e.asked = true;
                out.push(Action::Send(TokenMsg::Request { object: *object }));
            }
        }
        if ship > 0 {
            out.push(Action::Ship { through: ship });
        }
    }

    /// Lets the parked writes of `object` proceed if the token is ours and writable.
    fn proceed_parked(&mut self, now: u64, object: ObjectId, out: &mut Vec<Action>) {
        self.note_writable(now, object);
        if !self.writable(now, object) {
            return;
        }
        let Some(e) = self.entries.get_mut(&object) else {
            return;
        };
        for (write, _) in e.parked.drain(..) {
            self.parked -= 1;
            e.writing += 1;
            out.push(Action::Proceed {
                write,
                object,
                guarded: true,
            });
        }
    }

    /// True if the entry can go without a message and loses nothing: an idle token held at
    /// home with nothing to wait for, or an idle `Remote` at the other site.
    fn droppable(&self, e: &Entry) -> bool {
        if !e.quiet() || e.peer_asked.is_some() {
            return false;
        }
        match e.state {
            State::Held { wait, .. } => self.home && wait <= self.applied,
            State::Remote => !self.home,
            State::Giving { .. } | State::Away { .. } => false,
        }
    }

    /// Drops the entry of `object` if it is droppable and idle for `idle_ms` (home), or
    /// droppable at all (`Remote`).
    fn drop_if_idle(&mut self, now: u64, object: ObjectId, out: &mut Vec<Action>) {
        let Some(e) = self.entries.get(&object) else {
            return;
        };
        let idle = now >= e.used_at.saturating_add(self.config.idle_ms);
        if self.droppable(e) && (idle || matches!(e.state, State::Remote)) {
            self.drop_entry(object, out);
        }
    }

    /// At home, drops the entry of `object` as soon as it is droppable if it was never lent
    /// (lend 0): such an entry says nothing that "no entry" does not (held at home, writable,
    /// nothing persisted), except the object's last write, which `drop_entry` folds into
    /// `write_floor` (a later Grant of it names that bound, a seq no lower than its own). The
    /// table at home then holds only the tokens in use, lent, or given back, and not every
    /// object written in the last `idle_ms`: a stream of changes to new names no longer fills
    /// it to `entries_max` (where each change ran `make_room`, a scan of every entry, and each
    /// `PeerApplied` and `Tick` walked them all). An entry given back (lend ≠ 0) keeps waiting
    /// for `idle_ms`: dropping it costs a `Persist(Forget)`.
    fn drop_if_spent(&mut self, object: ObjectId) {
        if !self.home {
            return;
        }
        let Some(e) = self.entries.get(&object) else {
            return;
        };
        if matches!(e.state, State::Held { lend: 0, .. }) && self.droppable(e) {
            // Lend 0: nothing persisted, so no `Persist(Forget)` (drop_entry adds none).
            let mut none = Vec::new();
            self.drop_entry(object, &mut none);
            debug_assert!(none.is_empty());
        }
    }

    fn drop_entry(&mut self, object: ObjectId, out: &mut Vec<Action>) {
        let Some(e) = self.entries.remove(&object) else {
            return;
        };
        self.write_floor = self.write_floor.max(e.last_write);
        if let State::Held { lend, .. } = e.state {
            if lend != 0 {
                // Persisted as held: the home's "no entry" says the same from now on.
                out.push(Action::Persist(TokenRecord {
                    object,
                    kind: RecordKind::Forget,
                    lend,
                    seq: 0,
                    lend_next: self.lend_next,
                }));
            }
        }
    }

    /// Makes sure `object` has an entry (home: held; other site: remote), making room at the
    /// limit. False if there is no room now.
    fn entry_or_make(&mut self, now: u64, object: ObjectId, out: &mut Vec<Action>) -> bool {
        if self.entries.contains_key(&object) {
            return true;
        }
        if self.entries.len() >= self.config.entries_max && !self.make_room(out) {
            return false;
        }
        let state = if self.home {
            State::Held { lend: 0, wait: 0 }
        } else {
            State::Remote
        };
        self.entries
            .insert(object, Entry::new(state, self.write_floor, now));
        true
    }

    /// Frees one entry by dropping the least-recently used droppable one; failing that (other
    /// site) starts giving back the least-recently used idle token. True if an entry was freed.
    fn make_room(&mut self, out: &mut Vec<Action>) -> bool {
        let lru = |pred: &dyn Fn(&Entry) -> bool| {
            self.entries
                .iter()
                .filter(|(_, e)| pred(e))
                .min_by_key(|(_, e)| e.used_at)
                .map(|(o, _)| *o)
        };
        if let Some(object) = lru(&|e| self.droppable(e)) {
            self.drop_entry(object, out);
            return true;
        }
        let idle_held = |e: &Entry| {
            matches!(e.state, State::Held { .. }) && e.quiet() && e.peer_asked.is_none()
        };
        if !self.home && self.connected {
            if let Some(object) = lru(&idle_held) {
                self.give(object, out);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: ObjectId = 7;
    const Y: ObjectId = 8;

    fn config(site: SiteId, peer: SiteId, policy: PartitionPolicy) -> TokenConfig {
        TokenConfig {
            entries_max: 3,
            parked_max: 3,
            idle_ms: 100,
            hold_max_ms: 50,
            park_timeout_ms: 1000,
            ..TokenConfig::new(site, peer, policy)
        }
    }

    fn connected(site: SiteId, peer: SiteId, policy: PartitionPolicy) -> TokenSite {
        let mut s = TokenSite::new(config(site, peer, policy));
        assert_eq!(s.handle(0, Event::Connected { shipped: 0 }), vec![]);
        s
    }

    /// The home (site 1) and the other site (2), connected, `Reconcile`.
    fn pair() -> (TokenSite, TokenSite) {
        (
            connected(1, 2, PartitionPolicy::Reconcile),
            connected(2, 1, PartitionPolicy::Reconcile),
        )
    }

    fn write(write: WriteId, object: ObjectId) -> Event {
        Event::Write { write, object }
    }

    fn written(object: ObjectId, seq: u64) -> Event {
        Event::Written {
            object,
            seq,
            guarded: true,
        }
    }

    fn proceed(write: WriteId, object: ObjectId) -> Action {
        Action::Proceed {
            write,
            object,
            guarded: true,
        }
    }

    fn recv(m: TokenMsg) -> Event {
        Event::Received(m)
    }

    fn sent(actions: &[Action]) -> Vec<TokenMsg> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(m) => Some(*m),
                _ => None,
            })
            .collect()
    }

    fn persisted(actions: &[Action]) -> Vec<TokenRecord> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Persist(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    fn grant(lend: u64, seq: u64) -> TokenMsg {
        TokenMsg::Grant {
            object: X,
            lend,
            seq,
        }
    }

    /// The home lends X to the other site (which asked with write 1) under lend 1, seq 0.
    fn lend_x(home: &mut TokenSite, other: &mut TokenSite) {
        let a = other.handle(0, write(1, X));
        assert_eq!(sent(&a), vec![TokenMsg::Request { object: X }]);
        let a = home.handle(1, recv(TokenMsg::Request { object: X }));
        assert_eq!(sent(&a), vec![grant(1, 0)]);
        let a = other.handle(2, recv(grant(1, 0)));
        assert_eq!(a.last(), Some(&proceed(1, X)));
        assert_eq!(other.handle(3, written(X, 1)), vec![]);
    }

    #[test]
    fn the_home_writes_at_once_and_the_other_site_asks() {
        let (mut home, mut other) = pair();
        assert_eq!(home.handle(0, write(1, X)), vec![proceed(1, X)]);
        assert_eq!(
            other.handle(0, write(2, X)),
            vec![Action::Send(TokenMsg::Request { object: X })]
        );
        assert_eq!(other.parked(), 1);
        assert_eq!(other.state(X), TokenState::Requesting);
        // A second write to the same object waits with the first, without a second request.
        assert_eq!(other.handle(0, write(3, X)), vec![]);
        assert!(home.holds(X) && !other.holds(X));
    }

    #[test]
    fn a_grant_leaves_only_after_the_records_of_the_object_are_shipped() {
        let (mut home, _) = pair();
        home.handle(0, write(1, X));
        home.handle(1, written(X, 5));
        home.handle(2, Event::Shipped { seq: 3 });
        let a = home.handle(3, recv(TokenMsg::Request { object: X }));
        assert_eq!(a, vec![Action::Ship { through: 5 }]);
        assert_eq!(home.state(X), TokenState::Returning { lend: 0 });
        let a = home.handle(4, Event::Shipped { seq: 5 });
        let away = TokenRecord {
            object: X,
            kind: RecordKind::Away,
            lend: 1,
            seq: 5,
            lend_next: 2,
        };
        // Durable first, then the message.
        assert_eq!(a, vec![Action::Persist(away), Action::Send(grant(1, 5))]);
        assert!(!home.holds(X));
        // Writes there now ask for it back, after the Grant.
        assert_eq!(
            sent(&home.handle(5, write(2, X))),
            vec![TokenMsg::Request { object: X }]
        );
    }

    #[test]
    fn the_new_holder_writes_once_the_granters_records_are_applied() {
        let (_, mut other) = pair();
        other.handle(0, write(1, X));
        let a = other.handle(1, recv(grant(1, 5)));
        assert_eq!(
            persisted(&a),
            vec![TokenRecord {
                object: X,
                kind: RecordKind::Held,
                lend: 1,
                seq: 5,
                lend_next: 1,
            }]
        );
        assert_eq!(a.len(), 1, "no write before the records are applied");
        assert_eq!(
            other.state(X),
            TokenState::Held {
                lend: 1,
                writable: false
            }
        );
        assert_eq!(other.handle(2, Event::PeerApplied { seq: 4 }), vec![]);
        assert_eq!(
            other.handle(3, Event::PeerApplied { seq: 5 }),
            vec![proceed(1, X)]
        );
        assert_eq!(other.handle(4, write(2, X)), vec![proceed(2, X)]);
    }

    #[test]
    fn a_busy_holder_grants_on_close() {
        let (mut home, _) = pair();
        home.handle(0, Event::Opened { object: X });
        home.handle(0, write(1, X));
        assert_eq!(
            home.handle(1, recv(TokenMsg::Request { object: X })),
            vec![]
        );
        // Still open, within hold_max: the writer keeps the token.
        assert_eq!(home.handle(2, written(X, 1)), vec![]);
        assert_eq!(home.handle(4, write(2, X)), vec![proceed(2, X)]);
        assert_eq!(home.handle(5, written(X, 2)), vec![]);
        assert_eq!(
            home.handle(6, Event::Closed { object: X }),
            vec![Action::Ship { through: 2 }]
        );
        let a = home.handle(7, Event::Shipped { seq: 2 });
        assert_eq!(sent(&a), vec![grant(1, 2)]);
    }

    /// A write session (open, several writes, close) shorter than `hold_max_ms` keeps the token
    /// to its close, however early the other site asks: the other site gets the file whole.
    #[test]
    fn a_write_session_shorter_than_hold_max_keeps_the_token_to_its_close() {
        let c = TokenConfig::new(1, 2, PartitionPolicy::ReadOnly).with_hold_max(3_000);
        assert_eq!(c.hold_max_ms, 3_000);
        assert_eq!(c.park_timeout_ms, 3_000 + PARK_SLACK_MS);
        let default = TokenConfig::new(1, 2, PartitionPolicy::ReadOnly);
        assert_eq!(default.hold_max_ms, HOLD_MAX_MS);
        assert!(default.park_timeout_ms > default.hold_max_ms);
        let mut home = TokenSite::new(c);
        home.handle(0, Event::Connected { shipped: 0 });
        home.handle(0, Event::Opened { object: X });
        assert_eq!(home.handle(1, write(1, X)), vec![proceed(1, X)]);
        // The other site asks right after the session's first write.
        assert_eq!(
            home.handle(2, recv(TokenMsg::Request { object: X })),
            vec![]
        );
        assert_eq!(home.handle(3, written(X, 1)), vec![]);
        // Every later write of the session, up to the bound, runs here.
        for (w, t) in [(2u64, 500u64), (3, 1_500), (4, 2_900)] {
            assert_eq!(home.handle(t, Event::Tick), vec![]);
            assert_eq!(home.handle(t, write(w, X)), vec![proceed(w, X)]);
            assert_eq!(home.handle(t + 1, written(X, w)), vec![]);
        }
        assert!(home.holds(X));
        // The close hands it over at once, after the session's last record.
        assert_eq!(
            home.handle(2_950, Event::Closed { object: X }),
            vec![Action::Ship { through: 4 }]
        );
        assert_eq!(
            sent(&home.handle(2_951, Event::Shipped { seq: 4 })),
            vec![grant(1, 4)]
        );
    }

    /// The starvation bound stays: a session longer than `hold_max_ms` serves the request
    /// at the bound (its later writes park and ask for the token back).
    #[test]
    fn a_session_longer_than_hold_max_serves_the_request_at_the_bound() {
        let mut home =
            TokenSite::new(TokenConfig::new(1, 2, PartitionPolicy::ReadOnly).with_hold_max(3_000));
        home.handle(0, Event::Connected { shipped: 0 });
        home.handle(0, Event::Opened { object: X });
        home.handle(1, write(1, X));
        home.handle(2, written(X, 1));
        home.handle(10, recv(TokenMsg::Request { object: X }));
        assert_eq!(home.handle(3_009, Event::Tick), vec![]);
        assert_eq!(home.handle(3_009, write(2, X)), vec![proceed(2, X)]);
        assert_eq!(home.handle(3_009, written(X, 2)), vec![]);
        let a = home.handle(3_010, Event::Tick);
        assert_eq!(a, vec![Action::Ship { through: 2 }]);
        assert_eq!(home.handle(3_011, write(3, X)), vec![]);
        let a = home.handle(3_012, Event::Shipped { seq: 2 });
        assert_eq!(sent(&a), vec![grant(1, 2), TokenMsg::Request { object: X }]);
    }

    #[test]
    fn every_change_names_the_tokens_it_takes() {
        let p = |s: &str| RelPath::new(s.as_bytes().to_vec()).expect("path");
        let (a, b) = (p("d/a"), p("d/b"));
        let one = [
            Op::Create {
                path: a.clone(),
                mode: 0o644,
                uid: 0,
                gid: 0,
            },
            Op::Mkdir {
                path: a.clone(),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
            Op::Unlink {
                path: a.clone(),
                nlink: 1,
            },
            Op::Rmdir { path: a.clone() },
            Op::Symlink {
                path: a.clone(),
                target: b"t".to_vec(),
                uid: 0,
                gid: 0,
            },
            Op::Mknod {
                path: a.clone(),
                mode: libc_fifo(),
                rdev: 0,
                uid: 0,
                gid: 0,
            },
            Op::SetMode {
                path: a.clone(),
                mode: 0o600,
            },
            Op::SetOwner {
                path: a.clone(),
                uid: Some(1),
                gid: None,
            },
            Op::SetTimes {
                path: a.clone(),
                atime: None,
                mtime: None,
            },
            Op::SetXattr {
                path: a.clone(),
                name: b"user.x".to_vec(),
                value: Vec::new(),
                flags: 0,
            },
            Op::RemoveXattr {
                path: a.clone(),
                name: b"user.x".to_vec(),
            },
            Op::Write {
                path: a.clone(),
                offset: 0,
                data: b"x".to_vec(),
            },
            Op::Truncate {
                path: a.clone(),
                size: 0,
            },
        ];
        for op in &one {
            assert_eq!(names_of(op), vec![&a], "{}", op.name());
        }
        let rename = Op::Rename {
            from: a.clone(),
            to: b.clone(),
            flags: 0,
            from_ino: 9,
        };
        assert_eq!(names_of(&rename), vec![&a, &b]);
        let link = Op::Link {
            from: a.clone(),
            to: b.clone(),
        };
        assert_eq!(names_of(&link), vec![&a, &b]);
        for op in [Op::Abort { seq: 1 }, Op::GroupBegin, Op::GroupEnd] {
            assert!(names_of(&op).is_empty(), "{}", op.name());
        }
        assert_eq!(acquire_order(vec![Y, X, Y]), vec![X, Y]);
        assert_eq!(
            acquire_order(vec![X, X]),
            vec![X],
            "a rename onto its own name"
        );
    }

    fn libc_fifo() -> u32 {
        0o010_644
    }

    /// One change of two names at each site at once (a rename between X and Y), each taking
    /// the two tokens in `order`, the tokens passing between the sites as the messages say.
    /// Returns when each change ran (both tokens held), or the refusals.
    fn two_name_changes(
        home_order: [ObjectId; 2],
        other_order: [ObjectId; 2],
    ) -> Vec<Result<u64, Refusal>> {
        let (mut home, mut other) = pair();
        // X starts at the other site (it wrote it), Y at home.
        lend_x(&mut home, &mut other);
        let mut sites = [home, other];
        let orders = [home_order, other_order];
        let mut next = [0usize; 2];
        let mut held: [Vec<ObjectId>; 2] = [Vec::new(), Vec::new()];
        let mut seq = [10u64; 2];
        let mut result: [Option<Result<u64, Refusal>>; 2] = [None, None];
        let mut inbox: [VecDeque<TokenMsg>; 2] = [VecDeque::new(), VecDeque::new()];
        for now in 10..2_000u64 {
            for i in 0..2 {
                let mut events = VecDeque::new();
                if now == 10 {
                    events.push_back(write(100 * i as u64, orders[i][0]));
                }
                while let Some(m) = inbox[i].pop_front() {
                    if let TokenMsg::Grant { seq, .. } = m {
                        // The granter's records arrive ahead of its Grant.
                        events.push_back(Event::PeerApplied { seq });
                    }
                    events.push_back(recv(m));
                }
                events.push_back(Event::Tick);
                while let Some(e) = events.pop_front() {
                    for a in sites[i].handle(now, e) {
                        match a {
                            Action::Send(m) => inbox[1 - i].push_back(m),
                            Action::Ship { through } => {
                                events.push_back(Event::Shipped { seq: through })
                            }
                            Action::Proceed {
                                object, guarded, ..
                            } => {
                                assert!(guarded);
                                assert!(
                                    !held[1 - i].contains(&object),
                                    "both sites hold {object} at {now}"
                                );
                                held[i].push(object);
                                next[i] += 1;
                                if next[i] < 2 {
                                    events.push_back(write(100 * i as u64 + 1, orders[i][1]));
                                } else {
                                    // Both tokens held: the rename runs, is journaled, done.
                                    seq[i] += 1;
                                    for o in held[i].drain(..) {
                                        events.push_back(written(o, seq[i]));
                                    }
                                    result[i] = Some(Ok(now));
                                }
                            }
                            Action::Refuse { reason, .. } => {
                                for o in held[i].drain(..) {
                                    events.push_back(written(o, 0));
                                }
                                result[i] = Some(Err(reason));
                            }
                            Action::Persist(_) => {}
                        }
                    }
                }
            }
            if result.iter().all(|r| r.is_some()) {
                break;
            }
        }
        result
            .into_iter()
            .map(|r| r.expect("each change ran or was refused within the run"))
            .collect()
    }

    #[test]
    fn a_change_of_a_hard_linked_file_takes_the_shared_token_after_its_names() {
        let p = |s: &[u8]| RelPath::new(s.to_vec()).expect("path");
        let (a, b) = (p(b"a"), p(b"b"));
        let data = [
            Op::Write {
                path: a.clone(),
                offset: 0,
                data: b"x".to_vec(),
            },
            Op::Truncate {
                path: a.clone(),
                size: 0,
            },
            Op::SetMode {
                path: a.clone(),
                mode: 0o600,
            },
            Op::SetXattr {
                path: a.clone(),
                name: b"user.x".to_vec(),
                value: b"1".to_vec(),
                flags: 0,
            },
        ];
        for op in &data {
            assert_eq!(changed_file(op), Some(&a), "{}", op.name());
        }
        let names = [
            Op::Link {
                from: a.clone(),
                to: b.clone(),
            },
            Op::Unlink {
                path: a.clone(),
                nlink: 2,
            },
            Op::Rename {
                from: a.clone(),
                to: b.clone(),
                flags: 0,
                from_ino: 1,
            },
            Op::Abort { seq: 1 },
        ];
        for op in &names {
            assert_eq!(changed_file(op), None, "{}", op.name());
        }
        assert!(takes_hard_linked(false, 2));
        assert!(!takes_hard_linked(false, 1));
        assert!(
            !takes_hard_linked(true, 3),
            "a directory's links are its subdirectories"
        );
        // Linked since the first read: again, with the shared token first; never twice.
        assert_eq!(after_names(false, false, 2), AfterNames::Again);
        assert_eq!(after_names(true, false, 2), AfterNames::Go);
        assert_eq!(after_names(true, false, 1), AfterNames::Go);
        assert_eq!(after_names(false, false, 1), AfterNames::Go);
        assert_eq!(after_names(false, true, 5), AfterNames::Go);
        // No name is the shared object, nor 0; it is taken first, before every name's.
        for h in [0, 1] {
            assert!(![0, HARD_LINKED].contains(&name_object(h)));
        }
        assert_eq!(name_object(u64::MAX), u64::MAX);
        assert_eq!(
            acquire_order(vec![u64::MAX, X, HARD_LINKED]),
            vec![HARD_LINKED, X, u64::MAX]
        );
    }

    /// One file with two names, X and Y: a session (open, `writes` writes, close) at each site
    /// at once, the home's through X and the other site's through Y (lent to it first; or
    /// through X too with `one_name`: each site's mount may name the inode by either), each
    /// write taking its name's token and, with `linked`, [`HARD_LINKED`] first (a session then
    /// holds that one in place of its name's). Returns the order the writes ran in (the site
    /// of each), and when the last ran.
    fn sessions_through_two_names(
        linked: bool,
        one_name: bool,
        writes: usize,
    ) -> (Vec<usize>, u64) {
        let (mut home, mut other) = pair();
        // Y at the other site (it wrote through it once).
        let a = other.handle(0, write(1, Y));
        let a = home.handle(1, recv(sent(&a)[0]));
        let a = other.handle(2, recv(sent(&a)[0]));
        assert_eq!(a.last(), Some(&proceed(1, Y)));
        other.handle(3, written(Y, 1));
        let mut sites = [home, other];
        let objects = |i: usize| {
            let name = if one_name { X } else { [X, Y][i] };
            acquire_order(if linked {
                vec![HARD_LINKED, name]
            } else {
                vec![name]
            })
        };
        // What a session holds: the shared token for a hard-linked file, else its name's.
        let session = |i: usize| objects(i)[0];
        let mut inbox: [VecDeque<TokenMsg>; 2] = [VecDeque::new(), VecDeque::new()];
        let mut seq = [10u64; 2];
        let mut done = [0usize; 2];
        // The tokens of the write in progress taken so far.
        let mut held: [Vec<ObjectId>; 2] = [Vec::new(), Vec::new()];
        let mut asked = [false; 2];
        let mut ran = Vec::new();
        for now in 10..5_000u64 {
            for i in 0..2 {
                let mut events = VecDeque::new();
                if now == 10 {
                    events.push_back(Event::Opened { object: session(i) });
                }
                if done[i] < writes && !asked[i] {
                    asked[i] = true;
                    events.push_back(write(i as u64, objects(i)[0]));
                }
                while let Some(m) = inbox[i].pop_front() {
                    if let TokenMsg::Grant { seq, .. } = m {
                        events.push_back(Event::PeerApplied { seq });
                    }
                    events.push_back(recv(m));
                }
                events.push_back(Event::Tick);
                while let Some(e) = events.pop_front() {
                    for a in sites[i].handle(now, e) {
                        match a {
                            Action::Send(m) => inbox[1 - i].push_back(m),
                            Action::Ship { through } => {
                                events.push_back(Event::Shipped { seq: through })
                            }
                            Action::Proceed { object, .. } => {
                                held[i].push(object);
                                let all = objects(i);
                                if held[i].len() < all.len() {
                                    events.push_back(write(i as u64, all[held[i].len()]));
                                    continue;
                                }
                                // Every token of the write held: it runs and is journaled.
                                ran.push(i);
                                seq[i] += 1;
                                for o in held[i].drain(..) {
                                    events.push_back(written(o, seq[i]));
                                }
                                done[i] += 1;
                                asked[i] = false;
                                if done[i] == writes {
                                    events.push_back(Event::Closed { object: session(i) });
                                }
                            }
                            Action::Refuse { reason, .. } => panic!("refused: {reason:?}"),
                            Action::Persist(_) => {}
                        }
                    }
                }
            }
            if done.iter().all(|d| *d == writes) {
                return (ran, now);
            }
        }
        panic!("the sessions did not end: {done:?}, ran {ran:?}");
    }

    #[test]
    fn sessions_through_two_names_of_a_hard_linked_file_run_one_after_the_other() {
        // Per name only, the two sessions write the one file at once: interleaved.
        let (ran, _) = sessions_through_two_names(false, false, 5);
        let turns = ran.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(turns > 1, "both at once without the shared token: {ran:?}");
        // With it, one session's writes all run before the other's first, through two names
        // or one, well before `hold_max_ms` (50 ms here) would split a session.
        for one_name in [false, true] {
            let (ran, end) = sessions_through_two_names(true, one_name, 5);
            assert_eq!(ran.len(), 10);
            let turns = ran.windows(2).filter(|w| w[0] != w[1]).count();
            assert_eq!(
                turns, 1,
                "one session after the other ({one_name}): {ran:?}"
            );
            assert!(
                end < 45,
                "no session waited for the bound ({one_name}): {end}"
            );
        }
    }

    #[test]
    fn changes_of_two_names_at_both_sites_take_them_in_one_order_and_both_run() {
        let order = acquire_order(vec![Y, X]);
        let [a, b] = [order[0], order[1]];
        let r = two_name_changes([a, b], [a, b]);
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        // Well within the park timeout (1 s here): a few steps, no waiting for a bound.
        assert!(r.iter().all(|r| r.is_ok_and(|t| t < 100)), "{r:?}");
        // Taken in opposite orders, each site holds one and waits for the other's: nothing
        // moves until the park timeout (1 s here) refuses one (what the fixed order prevents).
        let r = two_name_changes([Y, X], [X, Y]);
        assert!(r.contains(&Err(Refusal::Timeout)), "{r:?}");
        assert!(
            r.iter().all(|r| r.is_err() || r.is_ok_and(|t| t >= 1_000)),
            "{r:?}"
        );
    }

    #[test]
    fn an_open_file_hands_the_token_over_after_hold_max() {
        let (mut home, _) = pair();
        home.handle(0, Event::Opened { object: X });
        home.handle(0, write(1, X));
        home.handle(0, written(X, 0));
        home.handle(10, recv(TokenMsg::Request { object: X }));
        assert_eq!(home.handle(59, Event::Tick), vec![]);
        assert_eq!(home.handle(59, write(2, X)), vec![proceed(2, X)]);
        // Due: new writes park; the token goes once the write in progress is done, and the
        // parked write asks for it back right after the Grant.
        assert_eq!(home.handle(60, write(3, X)), vec![]);
        assert_eq!(home.handle(61, Event::Tick), vec![]);
        let a = home.handle(62, written(X, 0));
        assert_eq!(sent(&a), vec![grant(1, 0), TokenMsg::Request { object: X }]);
    }

    /// A token that arrives while its site still applies the granter's records is not taken
    /// away by a request before the writes parked for it ran: `hold_max_ms` counts from when
    /// it became writable (else a slow applier could starve a site for ever).
    #[test]
    fn hold_max_counts_from_when_the_token_is_writable() {
        let (_, mut other) = pair();
        other.handle(0, write(1, X));
        other.handle(1, recv(grant(1, 5)));
        other.handle(2, recv(TokenMsg::Request { object: X }));
        assert_eq!(other.handle(500, Event::Tick), vec![]);
        assert!(other.holds(X));
        assert_eq!(
            other.handle(501, Event::PeerApplied { seq: 5 }),
            vec![proceed(1, X)]
        );
        let a = other.handle(502, written(X, 1));
        assert_eq!(a, vec![Action::Ship { through: 1 }]);
        assert_eq!(
            sent(&other.handle(503, Event::Shipped { seq: 1 })),
            vec![grant(1, 1)]
        );
    }

    #[test]
    fn a_hand_over_cut_by_the_link_falls_back_to_held() {
        let (mut home, _) = pair();
        home.handle(0, write(1, X));
        home.handle(1, written(X, 3));
        home.handle(2, recv(TokenMsg::Request { object: X }));
        assert_eq!(home.state(X), TokenState::Returning { lend: 0 });
        assert_eq!(home.handle(3, Event::Disconnected), vec![]);
        assert_eq!(
            home.state(X),
            TokenState::Held {
                lend: 0,
                writable: true
            }
        );
        assert_eq!(home.handle(4, write(2, X)), vec![proceed(2, X)]);
        // Back on the link, nothing is sent until the peer asks again.
        assert_eq!(home.handle(5, Event::Connected { shipped: 3 }), vec![]);
    }

    #[test]
    fn the_other_site_gives_an_idle_token_back_and_forgets_it_on_the_ack() {
        let (mut home, mut other) = pair();
        lend_x(&mut home, &mut other);
        other.handle(4, Event::Shipped { seq: 1 });
        assert_eq!(other.handle(50, Event::Tick), vec![]);
        let a = other.handle(103, Event::Tick);
        assert_eq!(sent(&a), vec![grant(1, 1)]);
        assert_eq!(persisted(&a)[0].kind, RecordKind::Away);
        assert_eq!(other.state(X), TokenState::Away { lend: 1 });
        let a = home.handle(104, recv(grant(1, 1)));
        assert_eq!(persisted(&a)[0].kind, RecordKind::Held);
        assert_eq!(sent(&a), vec![TokenMsg::Ack { object: X, lend: 1 }]);
        // The home waits for the other site's record 1 before it writes.
        assert_eq!(home.handle(105, write(9, X)), vec![]);
        assert_eq!(
            home.handle(106, Event::PeerApplied { seq: 1 }),
            vec![proceed(9, X)]
        );
        let a = other.handle(107, recv(TokenMsg::Ack { object: X, lend: 1 }));
        assert_eq!(persisted(&a)[0].kind, RecordKind::Forget);
        assert!(other.is_empty());
        assert!(home.holds(X) && !other.holds(X));
    }

    #[test]
    fn duplicate_and_stale_grants_are_ignored() {
        let (mut home, mut other) = pair();
        lend_x(&mut home, &mut other);
        assert_eq!(other.handle(4, recv(grant(1, 0))), vec![]);
        other.handle(5, Event::Shipped { seq: 1 });
        other.handle(200, Event::Tick);
        assert_eq!(other.state(X), TokenState::Away { lend: 1 });
        // The home's Grant sent again on a reconnection crosses the give-back: ignored.
        assert_eq!(other.handle(201, recv(grant(1, 0))), vec![]);
        assert!(!other.holds(X));
        // A newer lend is taken even before the Ack of the old one.
        let a = other.handle(202, recv(grant(2, 0)));
        assert_eq!(persisted(&a)[0].lend, 2);
        assert!(other.holds(X));
    }

    #[test]
    fn a_give_back_the_home_already_took_is_acknowledged_and_nothing_else() {
        let (mut home, _) = pair();
        let a = home.handle(0, recv(grant(7, 3)));
        assert_eq!(a, vec![Action::Send(TokenMsg::Ack { object: X, lend: 7 })]);
        assert!(home.holds(X));
        assert_eq!(home.handle(1, write(1, X)), vec![proceed(1, X)]);
    }

    #[test]
    fn a_request_for_a_token_on_its_way_is_ignored() {
        let (mut home, mut other) = pair();
        assert_eq!(
            other.handle(0, recv(TokenMsg::Request { object: X })),
            vec![]
        );
        lend_x(&mut home, &mut other);
        assert_eq!(
            home.handle(5, recv(TokenMsg::Request { object: X })),
            vec![]
        );
    }

    /// Both sites want X at once while it travels: the Grant in flight decides (the home is
    /// where an unclaimed token rests, so there is no free token to race for), the other
    /// request is served after the holder's writes, and both sites' writes run.
    #[test]
    fn crossing_requests_serve_both_sites_in_turn() {
        let (mut home, mut other) = pair();
        let r = other.handle(0, write(1, X));
        assert_eq!(sent(&r), vec![TokenMsg::Request { object: X }]);
        let g = home.handle(1, recv(TokenMsg::Request { object: X }));
        assert_eq!(sent(&g), vec![grant(1, 0)]);
        // The home wants it back before the Grant arrived: its request follows the Grant.
        let r2 = home.handle(2, write(2, X));
        assert_eq!(sent(&r2), vec![TokenMsg::Request { object: X }]);
        assert!(!home.holds(X) && !other.holds(X));
        let a = other.handle(3, recv(grant(1, 0)));
        assert_eq!(a.last(), Some(&proceed(1, X)));
        assert_eq!(
            other.handle(4, recv(TokenMsg::Request { object: X })),
            vec![]
        );
        let a = other.handle(5, written(X, 1));
        assert_eq!(a, vec![Action::Ship { through: 1 }]);
        let a = other.handle(6, Event::Shipped { seq: 1 });
        assert_eq!(sent(&a), vec![grant(1, 1)]);
        let a = home.handle(7, recv(grant(1, 1)));
        assert_eq!(sent(&a), vec![TokenMsg::Ack { object: X, lend: 1 }]);
        assert_eq!(
            home.handle(8, Event::PeerApplied { seq: 1 }),
            vec![proceed(2, X)]
        );
        assert!(home.holds(X) && !other.holds(X));
    }

    #[test]
    fn a_grant_lost_with_the_link_is_sent_again_on_reconnection() {
        let (mut home, mut other) = pair();
        lend_x(&mut home, &mut other);
        assert_eq!(home.handle(10, Event::Disconnected), vec![]);
        assert_eq!(
            sent(&home.handle(11, Event::Connected { shipped: 0 })),
            vec![grant(1, 0)]
        );
        other.handle(12, Event::Disconnected);
        assert_eq!(other.handle(13, Event::Connected { shipped: 1 }), vec![]);
        assert_eq!(other.handle(14, recv(grant(1, 0))), vec![]);
        assert!(other.holds(X));
    }

    #[test]
    fn recovery_rebuilds_the_table_and_never_reuses_a_lend() {
        let (mut home, mut other) = pair();
        let mut home_log = Vec::new();
        let mut other_log = Vec::new();
        other.handle(0, write(1, X));
        home_log.extend(persisted(
            &home.handle(1, recv(TokenMsg::Request { object: X })),
        ));
        other_log.extend(persisted(&other.handle(2, recv(grant(1, 0)))));
        let home = TokenSite::recover(config(1, 2, PartitionPolicy::Reconcile), 5, &home_log, 9);
        let mut other =
            TokenSite::recover(config(2, 1, PartitionPolicy::Reconcile), 5, &other_log, 9);
        assert!(!home.holds(X) && other.holds(X));
        assert!(home.holds(Y));
        assert_eq!(home.state(X), TokenState::Away { lend: 1 });
        // Writes wait until the shell says how far its applier got.
        other.handle(6, Event::PeerApplied { seq: 0 });
        assert_eq!(other.handle(7, write(2, X)), vec![proceed(2, X)]);
        // The home's next lend is a new number.
        let mut home = home;
        // Its journal ends at 9: a Grant of a token without an entry covers all of it.
        home.handle(8, Event::Connected { shipped: 8 });
        let a = home.handle(9, recv(TokenMsg::Request { object: Y }));
        assert_eq!(a, vec![Action::Ship { through: 9 }]);
        let a = home.handle(9, Event::Shipped { seq: 9 });
        let lend = persisted(&a)[0].lend;
        assert!(lend > 1, "lend {lend} reused");
    }

    #[test]
    fn a_crash_between_decision_and_durability_never_makes_two_holders() {
        // The home crashes before its T1 (`Away`) is durable: its Grant never left, the token
        // is still at home after the restart, and the other site still waits for it.
        let (mut home, mut other) = pair();
        other.handle(0, write(1, X));
        let a = home.handle(1, recv(TokenMsg::Request { object: X }));
        assert!(matches!(a.first(), Some(Action::Persist(r)) if r.kind == RecordKind::Away));
        let home = TokenSite::recover(config(1, 2, PartitionPolicy::Reconcile), 2, &[], 0);
        assert!(home.holds(X) && !other.holds(X));

        // The other site crashes before its T2 (`Held`) is durable: it never wrote under the
        // token, which is in the Grant the home sends again on the next connection.
        let (mut home, mut other) = pair();
        other.handle(0, write(1, X));
        let home_log = persisted(&home.handle(1, recv(TokenMsg::Request { object: X })));
        let a = other.handle(2, recv(grant(1, 0)));
        assert!(
            matches!(a.first(), Some(Action::Persist(r)) if r.kind == RecordKind::Held),
            "T2 comes before the write proceeds: {a:?}"
        );
        let mut home =
            TokenSite::recover(config(1, 2, PartitionPolicy::Reconcile), 3, &home_log, 0);
        let mut other = TokenSite::recover(config(2, 1, PartitionPolicy::Reconcile), 3, &[], 1);
        assert!(!home.holds(X) && !other.holds(X), "the token travels");
        other.handle(4, Event::PeerApplied { seq: 0 });
        assert_eq!(other.handle(4, Event::Connected { shipped: 1 }), vec![]);
        let a = other.handle(5, write(2, X));
        assert_eq!(sent(&a), vec![TokenMsg::Request { object: X }]);
        let resent = sent(&home.handle(6, Event::Connected { shipped: 0 }));
        assert_eq!(resent, vec![grant(1, 0)]);
        // Its own request is ignored (the token is on its way); the Grant answers it.
        assert_eq!(
            home.handle(7, recv(TokenMsg::Request { object: X })),
            vec![]
        );
        let a = other.handle(8, recv(grant(1, 0)));
        assert_eq!(persisted(&a).len(), 1);
        assert_eq!(a.last(), Some(&proceed(2, X)));
        assert!(other.holds(X) && !home.holds(X));
    }

    #[test]
    fn across_a_split_the_policy_decides_for_tokens_over_there() {
        // Quorum without the majority is read-only.
        for policy in [
            PartitionPolicy::Reconcile,
            PartitionPolicy::ReadOnly,
            PartitionPolicy::Quorum,
        ] {
            let mut home = connected(1, 2, policy);
            let mut other = connected(2, 1, policy);
            lend_x(&mut home, &mut other);
            home.handle(4, write(2, X));
            let a = home.handle(5, Event::Disconnected);
            let b = home.handle(6, write(3, X));
            // The token holder keeps writing.
            other.handle(7, Event::Disconnected);
            assert_eq!(other.handle(8, write(4, X)), vec![proceed(4, X)]);
            assert_eq!(home.handle(9, write(5, Y)), vec![proceed(5, Y)]);
            match policy {
                PartitionPolicy::Reconcile => {
                    let unguarded = |write| Action::Proceed {
                        write,
                        object: X,
                        guarded: false,
                    };
                    assert_eq!(a, vec![unguarded(2)]);
                    assert_eq!(b, vec![unguarded(3)]);
                }
                PartitionPolicy::ReadOnly | PartitionPolicy::Quorum => {
                    let refused = |write| Action::Refuse {
                        write,
                        object: X,
                        reason: Refusal::ReadOnly,
                    };
                    assert_eq!(a, vec![refused(2)]);
                    assert_eq!(b, vec![refused(3)]);
                }
            }
        }
    }

    #[test]
    fn quorum_the_majority_writes_tokens_over_there_unguarded_the_rest_is_refused() {
        let mut home = connected(1, 2, PartitionPolicy::Quorum);
        let mut other = connected(2, 1, PartitionPolicy::Quorum);
        lend_x(&mut home, &mut other);
        let unguarded = |write| Action::Proceed {
            write,
            object: X,
            guarded: false,
        };
        // Connected, not majority: the write to X waits for its token.
        assert_eq!(
            sent(&home.handle(4, write(2, X))),
            vec![TokenMsg::Request { object: X }]
        );
        // Made the majority (the link may still look up): the parked write goes on unguarded,
        // and so do new ones; the tokens held here stay guarded.
        assert_eq!(
            home.handle(5, Event::Majority { on: true }),
            vec![unguarded(2)]
        );
        assert_eq!(home.handle(6, write(3, X)), vec![unguarded(3)]);
        assert_eq!(home.handle(6, write(4, Y)), vec![proceed(4, Y)]);
        assert_eq!(home.unguarded(), 2);
        // No longer the majority, the link down: refused, as read-only.
        home.handle(7, Event::Majority { on: false });
        home.handle(8, Event::Disconnected);
        assert_eq!(
            home.handle(9, write(5, X)),
            vec![Action::Refuse {
                write: 5,
                object: X,
                reason: Refusal::ReadOnly
            }]
        );
        // The unguarded writes journaled, the link back: the Grant that gives X back covers
        // them (records before the Grant).
        for seq in [10, 11] {
            home.handle(
                10,
                Event::Written {
                    object: X,
                    seq,
                    guarded: false,
                },
            );
        }
        assert_eq!(home.unguarded(), 0);
        // Majority means nothing to the other policies.
        let mut ro = connected(1, 2, PartitionPolicy::ReadOnly);
        let mut ro2 = connected(2, 1, PartitionPolicy::ReadOnly);
        lend_x(&mut ro, &mut ro2);
        ro.handle(4, Event::Majority { on: true });
        ro.handle(5, Event::Disconnected);
        assert!(matches!(
            ro.handle(6, write(2, X))[..],
            [Action::Refuse { .. }]
        ));
    }

    #[test]
    fn a_grant_waits_for_writes_made_across_the_split() {
        let (mut home, mut other) = pair();
        lend_x(&mut home, &mut other);
        home.handle(4, Event::Disconnected);
        home.handle(5, write(2, X));
        // The link is back while the unguarded write runs: no Grant leaves before it is
        // journaled, and the Grant covers it.
        assert_eq!(home.handle(6, Event::Connected { shipped: 0 }), vec![]);
        let a = home.handle(
            7,
            Event::Written {
                object: X,
                seq: 4,
                guarded: false,
            },
        );
        assert_eq!(a, vec![Action::Ship { through: 4 }]);
        assert_eq!(
            sent(&home.handle(8, Event::Shipped { seq: 4 })),
            vec![grant(1, 4)]
        );
    }

    #[test]
    fn parked_writes_are_bounded_and_time_out() {
        let (_, mut other) = pair();
        for w in 0..3 {
            assert!(!other
                .handle(w, write(w, X))
                .iter()
                .any(|a| matches!(a, Action::Refuse { .. })));
        }
        assert_eq!(
            other.handle(3, write(3, X)),
            vec![Action::Refuse {
                write: 3,
                object: X,
                reason: Refusal::ParkedFull
            }]
        );
        assert_eq!(other.handle(999, Event::Tick), vec![]);
        let a = other.handle(1001, Event::Tick);
        let timed_out: Vec<WriteId> = a
            .iter()
            .filter_map(|a| match a {
                Action::Refuse {
                    write,
                    reason: Refusal::Timeout,
                    ..
                } => Some(*write),
                _ => None,
            })
            .collect();
        assert_eq!(timed_out, vec![0, 1]);
        assert_eq!(other.parked(), 1);
    }

    #[test]
    fn at_the_limit_idle_entries_go_first_and_busy_tables_refuse() {
        let (mut home, mut other) = pair();
        // The home: idle tokens it holds are dropped (no entry means held at home). Tokens it
        // never lent go as soon as they are quiet; tokens given back stay for `idle_ms`.
        for o in 0..3 {
            let a = home.handle(o, recv(TokenMsg::Request { object: o }));
            let lend = o + 1;
            assert_eq!(
                sent(&a),
                vec![TokenMsg::Grant {
                    object: o,
                    lend,
                    seq: 0
                }]
            );
            home.handle(
                o,
                recv(TokenMsg::Grant {
                    object: o,
                    lend,
                    seq: 0,
                }),
            );
        }
        assert_eq!(home.len(), 3);
        // The least recently used (object 0) goes, its Forget persisted, and the write runs.
        let a = home.handle(10, write(9, 100));
        assert_eq!(
            persisted(&a),
            vec![TokenRecord {
                object: 0,
                kind: RecordKind::Forget,
                lend: 1,
                seq: 0,
                lend_next: 4,
            }]
        );
        assert_eq!(a.last(), Some(&proceed(9, 100)));
        assert_eq!(home.len(), 3);
        assert!(
            home.holds(0),
            "the dropped entry's token is still the home's"
        );
        assert_eq!(home.handle(11, written(100, 1)), vec![]);
        assert_eq!(home.len(), 2, "the entry never lent went once quiet");
        // All busy: a write to one more object is refused, a request answered with Refuse.
        let mut home = connected(1, 2, PartitionPolicy::Reconcile);
        for o in 0..3 {
            home.handle(0, Event::Opened { object: o });
        }
        assert_eq!(
            home.handle(1, write(5, 50)),
            vec![Action::Refuse {
                write: 5,
                object: 50,
                reason: Refusal::TableFull
            }]
        );
        assert_eq!(
            home.handle(1, recv(TokenMsg::Request { object: 51 })),
            vec![Action::Send(TokenMsg::Refuse { object: 51 })]
        );
        // The other site refuses its parked writes when the home refuses.
        other.handle(2, write(6, 51));
        assert_eq!(
            other.handle(3, recv(TokenMsg::Refuse { object: 51 })),
            vec![Action::Refuse {
                write: 6,
                object: 51,
                reason: Refusal::PeerTableFull
            }]
        );
        assert!(other.is_empty());
    }

    #[test]
    fn the_home_keeps_no_entry_for_a_token_it_never_lent_once_quiet() {
        let (mut home, _) = pair();
        // A stream of changes to new names (the bench's `names` row): each entry goes once its
        // write is journaled, so the table never reaches its limit (3 here) and never scans.
        for o in 0..10u64 {
            assert_eq!(home.handle(o, write(o, o)), vec![proceed(o, o)]);
            assert_eq!(home.len(), 1, "the entry of a write in progress stays");
            assert_eq!(home.handle(o, written(o, o + 1)), vec![]);
            assert!(home.is_empty(), "object {o}: the quiet entry went");
            assert_eq!(
                home.state(o),
                TokenState::Held {
                    lend: 0,
                    writable: true
                }
            );
        }
        // A file open for writing keeps its entry until closed.
        home.handle(20, Event::Opened { object: X });
        home.handle(20, write(20, X));
        home.handle(20, written(X, 11));
        assert_eq!(home.len(), 1);
        assert_eq!(home.handle(21, Event::Closed { object: X }), vec![]);
        assert!(home.is_empty());
        // A later Grant of an object whose entry went names a seq covering its last write (the
        // floor the dropped entries raised), and leaves once those records are shipped.
        home.handle(22, Event::Shipped { seq: 11 });
        let a = home.handle(23, recv(TokenMsg::Request { object: 3 }));
        assert_eq!(
            sent(&a),
            vec![TokenMsg::Grant {
                object: 3,
                lend: 1,
                seq: 11
            }]
        );
        // A token asked for while written is handed over, not dropped.
        home.handle(24, write(30, Y));
        home.handle(25, recv(TokenMsg::Request { object: Y }));
        let a = home.handle(26, written(Y, 12));
        assert_eq!(a, vec![Action::Ship { through: 12 }]);
        assert_eq!(home.state(Y), TokenState::Returning { lend: 0 });
    }

    #[test]
    fn the_other_site_at_its_limit_gives_back_its_least_recently_used_idle_token() {
        let (_, mut other) = pair();
        for o in 0..3u64 {
            other.handle(o, write(o, o));
            other.handle(
                o,
                recv(TokenMsg::Grant {
                    object: o,
                    lend: o + 1,
                    seq: 0,
                }),
            );
            other.handle(o, written(o, 0));
        }
        other.handle(20, Event::Opened { object: 1 });
        let a = other.handle(21, write(9, 100));
        assert_eq!(
            sent(&a),
            vec![TokenMsg::Grant {
                object: 0,
                lend: 1,
                seq: 0
            }]
        );
        assert_eq!(
            a.last(),
            Some(&Action::Refuse {
                write: 9,
                object: 100,
                reason: Refusal::TableFull
            })
        );
        // Once the home acknowledges, there is room again.
        other.handle(22, recv(TokenMsg::Ack { object: 0, lend: 1 }));
        assert_eq!(
            sent(&other.handle(23, write(10, 100))),
            vec![TokenMsg::Request { object: 100 }]
        );
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let r = TokenRecord {
            object: u64::MAX,
            kind: RecordKind::Away,
            lend: 3,
            seq: 99,
            lend_next: 4,
        };
        let b = r.encode();
        assert_eq!(TokenRecord::decode(&b), Ok(r));
        assert_eq!(TokenRecord::decode(&b[..47]), Err(RecordError::Length(47)));
        for at in [0, 5, 9, 41, 44] {
            let mut d = b;
            d[at] ^= 1;
            assert_eq!(
                TokenRecord::decode(&d),
                Err(RecordError::Corrupt),
                "byte {at}"
            );
        }
        let mut k = b;
        k[4] = 9;
        let crc = crc32c::crc32c(&k[0..40]);
        k[40..44].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(TokenRecord::decode(&k), Err(RecordError::Kind(9)));
    }
}
