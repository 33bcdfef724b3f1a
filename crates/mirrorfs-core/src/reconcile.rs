//! Reconciling what two writable sites changed during a split (issue 7; `mount --peer
//! --write-tokens A:B --partition reconcile`), sans I/O: which of the peer's records is
//! concurrent with one of ours, and what the site does about it.
//!
//! ```text
//!  our data write (seq L, object P) ─▶ local(L, P)          unseen[P] = L
//!  peer record R for P, seen(R) = S  ─▶ peer_record(P, S) ─▶ Apply | Skip{rewrite} | CopyThenApply
//!     seen(R): the last of OUR seqs the peer had considered when it journaled R (the change
//!     points of its stream, `Msg::PeerSeen`); every entry ≤ S is dropped (the peer saw it).
//! ```
//!
//! **The rule.** A peer record R for object P is concurrent with our record L for P iff
//! `L > seen(R)`: the peer wrote R without having considered L. Only data changes (write,
//! truncate, fallocate: what takes a write token) count. While the link is up the token
//! hand-over makes every writer apply the other's records for P first, so `seen(R) ≥ L` and
//! nothing is concurrent; only writes made across a split (`Proceed{guarded: false}`) are.
//!
//! **The outcome is the same at both sites.** The lower site id (the *winner*, the token home)
//! keeps its version at `P`; the higher (the *loser*) keeps its version as a copy,
//! `P.conflict-site<loser>-<time>`, made at the loser and streamed to the winner like any new file.
//! Records are diffs and cannot be redirected, so:
//!
//! - the **loser**, on the first concurrent winner record for P since its own last write to P,
//!   copies its current P to the conflict name (`CopyThenApply`: a local create and writes,
//!   journaled before the winner's record is applied), then applies the winner's records;
//! - the **winner** skips each concurrent loser record for P (`Skip`) and, unless its own last
//!   write to P already is one, journals a full **rewrite** of P (its size and whole content, read
//!   under the order lock: `Skip{rewrite: true}`, then `local(seq, P, true)` for its records).
//!   The rewrite is journaled after the winner considered the skipped records, so at the loser it
//!   is not concurrent (unless the loser wrote P again meanwhile: then it copies again) and is
//!   applied over the mix of diffs: both sites end with the winner's version at P and the loser's
//!   in the copy.
//!
//! **Hard links.** Objects are names, but a file with several names is one object to the rule:
//! the shell tells each entry the file behind its name (its local inode, [`FileId`], when it has
//! more than one link: [`Reconciler::note_file`]), and a peer data record for a name with no
//! entry of ours is decided against an entry of the same file under another name
//! ([`Reconciler::peer_linked_data`]); a peer metadata change of a name with no change of ours
//! of that attribute likewise against ours through another name of the file
//! ([`Reconciler::peer_linked_meta`]). Inodes are per site and never sent: each site resolves
//! the peer's name to its own file.
//!
//! **Bounds and crashes.** At most `entries_max` objects are remembered; past it the oldest is
//! dropped and its seq becomes a *floor*: a peer record with `seen < floor` for an object with
//! no entry is taken as concurrent (a conflict listed that perhaps was none: both versions kept,
//! nothing lost). The entries are rebuilt after a restart from the journal: the shell keeps
//! every record after [`Reconciler::seen_by_peer`] (persisted with the peer's applied position)
//! and replays our data records after it through [`Reconciler::local`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::op::Op;
use crate::path::{PathError, RelPath};

/// An object: the write token's (a hash of the file's path, `site::tokens::object_of`).
pub type Object = u64;

/// A file with more than one name (hard links) as this site knows it: the shell's inode number
/// of it ([`Reconciler::note_file`]); local to the site, never sent. 0: the name was looked at
/// and its file has one name only.
pub type FileId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// This site's id and the peer's (`--write-tokens ME:PEER`); the lower keeps its version.
    pub me: u64,
    pub peer: u64,
    /// The most objects remembered.
    pub entries_max: usize,
}

impl Config {
    pub fn new(me: u64, peer: u64) -> Config {
        Config {
            me,
            peer,
            entries_max: 65_536,
        }
    }

    /// This site's version stays at the path in a conflict.
    pub fn wins(&self) -> bool {
        self.me < self.peer
    }
}

/// What to do with a peer record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not concurrent (or the loser after its copy): apply it.
    Apply,
    /// The winner: concurrent with our own write; do not apply it. With `rewrite`, journal a full
    /// rewrite of the object once the batch of peer records is considered (its records then go
    /// through [`Reconciler::local`] with `rewrite: true`); `first` when this starts a conflict
    /// (to be listed).
    Skip { rewrite: bool, first: bool },
    /// The loser: copy our current version to the conflict name first (listed as a conflict),
    /// then apply the record.
    CopyThenApply,
    /// Either site: the peer removed an object we changed concurrently. Do not apply the
    /// removal; journal the object whole, its creation first, so that the peer gets it back
    /// (`first`: a new conflict, to be listed).
    Restore { first: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Our last record for the object not known to be seen by the peer: a data change, or a
    /// rename of another file onto its name (`made`).
    seq: u64,
    /// Our last data change of it among those (0: none, only a rename onto the name). A peer
    /// record that names the file we renamed (translated through the rename) is concurrent
    /// only with this; one for the name itself (another entry given it) with `seq`.
    data: u64,
    /// The file's name when known ([`Reconciler::local_path`]): a rename of a directory
    /// above it moves the entry with it.
    path: Option<Vec<u8>>,
    /// That record belongs to a resolution rewrite (the winner).
    rewrite: bool,
    /// A conflict copy was made since that record (the loser).
    copied: bool,
    /// The file it names, when the shell looked ([`Reconciler::note_file`]; `Some(0)`: a file
    /// of one name): a peer data record for another name of that file is concurrent with
    /// this entry too ([`Reconciler::peer_linked_data`]).
    file: Option<FileId>,
}

/// One of our metadata changes the peer has not seen (per name and attribute).
#[derive(Debug, Clone)]
struct MetaEntry {
    seq: u64,
    /// The name it was made through (the file is looked up by it again after a restart).
    path: Vec<u8>,
    /// The file it names, when the shell looked ([`Reconciler::note_meta_file`]; `Some(0)`: a
    /// file of one name): a peer change of the same attribute through another name of that
    /// file is concurrent with this one too ([`Reconciler::peer_linked_meta`]).
    file: Option<FileId>,
}

/// Linux's `RENAME_EXCHANGE` (the `flags` of `Op::Rename` are renameat2's).
const RENAME_EXCHANGE: u32 = 2;

/// One of our renames the peer has not seen (or an alias: the peer's name for a file both
/// sites renamed, mapped to ours).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Moved {
    from: Vec<u8>,
    to: Vec<u8>,
    exchange: bool,
    /// `to` was moved by a peer rename applied here ([`Reconciler::peer_renamed`]) after our
    /// renames through this seq: a name current after them, which they do not move again when
    /// a peer name is translated through this rename (0: never moved).
    current_after: u64,
    /// An exchange's ends as named here (`from`'s, `to`'s), where a peer rename applied here
    /// under another name than the peer's (its directory held aside for a clash,
    /// [`Reconciler::hold`]) moved them ([`Reconciler::peer_renamed`]): each end is a source
    /// of the peer's (its name: `from`, `to`) and the new name of the other entry (ours:
    /// these). `None`: the same names.
    here: Option<EndsHere>,
}

/// An exchange's two names here ([`Moved::here`]): its `from` end's, its `to` end's.
type EndsHere = (Vec<u8>, Vec<u8>);

impl Moved {
    /// A peer's name (or a name reached through our renames before this one) after this
    /// rename: a source's entry is at the other end's name here.
    fn apply(&self, path: &[u8]) -> Option<Vec<u8>> {
        let (from_here, to_here) = match &self.here {
            Some((f, t)) => (f.as_slice(), t.as_slice()),
            None => (self.from.as_slice(), self.to.as_slice()),
        };
        moved_path(path, &self.from, to_here).or_else(|| {
            self.exchange
                .then(|| moved_path(path, &self.to, from_here))
                .flatten()
        })
    }
}

/// A local change as the machine notes it ([`Local::of`]): what the rule compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// Write, truncate, fallocate.
    Data(Vec<u8>),
    /// A rename (`exchange`: `RENAME_EXCHANGE`, both names swap).
    Rename {
        from: Vec<u8>,
        to: Vec<u8>,
        exchange: bool,
    },
    /// Unlink or rmdir (an unlink of a file with other names: [`Local::RemovedLinked`]).
    Removed(Vec<u8>),
    /// An unlink of one name of a file that had other names (its link count before was above
    /// 1, as `Op::Unlink` records it): the file lives on under them, and so does our entry of
    /// its data changes ([`Reconciler::peer_linked_data`]). Carried by the unlink itself, so
    /// that the replay after a restart needs no lookup.
    RemovedLinked(Vec<u8>),
    /// mode, owner, times or one xattr (the attribute's key, [`meta_key`]).
    Meta(Vec<u8>, u64),
    /// Create, mknod, symlink, link: a new entry under the name (after our removal of the
    /// name, a reuse: [`Reconciler::reused_since`]). Not mkdir: a directory made again under a
    /// name removed during the split is one with the old (what the peer puts in it or changes
    /// of it lands in it, as when both sites make one directory).
    Made(Vec<u8>),
    /// A directory made (mkdir): the peer's directory given the same name during the split
    /// clashes with it ([`Reconciler::peer_dir_clash`]). After our removal of the name, the
    /// peer's data records and metadata changes of the name itself journaled before it had
    /// seen the mkdir are the old entry's (a file's, or its give-back): a reuse to them
    /// ([`Reconciler::reused_since`]), not to the names beneath it.
    MadeDir(Vec<u8>),
}

impl Local {
    /// What a local change of ours is to the rule (`None`: aborts, marks).
    pub fn of(op: &Op) -> Option<Local> {
        Some(match op {
            Op::Write { path, .. } | Op::Truncate { path, .. } | Op::Fallocate { path, .. } => {
                Local::Data(path.as_bytes().to_vec())
            }
            Op::Rename {
                from, to, flags, ..
            } => Local::Rename {
                from: from.as_bytes().to_vec(),
                to: to.as_bytes().to_vec(),
                exchange: flags & RENAME_EXCHANGE != 0,
            },
            Op::Unlink { path, nlink } if *nlink > 1 => {
                Local::RemovedLinked(path.as_bytes().to_vec())
            }
            Op::Unlink { path, .. } | Op::Rmdir { path } => {
                Local::Removed(path.as_bytes().to_vec())
            }
            Op::Create { path, .. }
            | Op::Mknod { path, .. }
            | Op::Symlink { path, .. }
            | Op::Link { to: path, .. } => Local::Made(path.as_bytes().to_vec()),
            Op::Mkdir { path, .. } => Local::MadeDir(path.as_bytes().to_vec()),
            op => {
                let (path, key) = meta_key(op)?;
                Local::Meta(path.as_bytes().to_vec(), key)
            }
        })
    }
}

/// The attribute a metadata change sets: 1 mode, 2 owner, 3 times, an xattr's name hashed
/// (FNV-1a, ≥ 4); `None` for other changes.
pub fn meta_key(op: &Op) -> Option<(&RelPath, u64)> {
    match op {
        Op::SetMode { path, .. } => Some((path, 1)),
        Op::SetOwner { path, .. } => Some((path, 2)),
        Op::SetTimes { path, .. } => Some((path, 3)),
        Op::SetXattr { path, name, .. } | Op::RemoveXattr { path, name } => {
            let h = name.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
            });
            Some((path, h.max(4)))
        }
        _ => None,
    }
}

/// What to do with a peer's rename ([`Reconciler::peer_rename`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenameDecision {
    /// Apply it with these names (ours: the peer's names translated through our unseen
    /// renames). `clash`: both sites renamed the source; we are the loser and move our name to
    /// the winner's (listed as a conflict; `from` is our name for it). `aside`: `to` is another
    /// file we gave that name concurrently, and we are the loser: copy ours to a conflict name
    /// first (listed), then apply.
    Apply {
        from: Vec<u8>,
        to: Vec<u8>,
        clash: bool,
        aside: bool,
    },
    /// `to` is another file we gave that name concurrently (or changed), and we are the
    /// winner: ours stays at `to`, so the rename is not applied. `source`: what becomes of
    /// `from` here (`Apply`: remove it — the loser's conflict copy brings its content;
    /// `Restore`: we changed it concurrently, keep it and give it back whole). `rewrite`:
    /// journal our `to` whole after the batch; `first`: a new conflict (listed when the
    /// loser's copy arrives).
    Displaced {
        from: Vec<u8>,
        to: Vec<u8>,
        rewrite: bool,
        first: bool,
        source: Decision,
    },
    /// Both sites renamed the source, and we are the winner: ours stays (`ours`, listed as a
    /// conflict unless both chose the same name, `clash`); the peer's later records under its
    /// name follow ours.
    Keep { ours: Vec<u8>, clash: bool },
    /// We removed the source concurrently: not applied (the renamer gives the file back under
    /// its new name when our removal reaches it).
    Removed,
}

/// What to do with a peer's exchange (`renameat2(RENAME_EXCHANGE)`) of two names
/// ([`Reconciler::peer_exchange`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeDecision {
    /// None of our namespace changes (renames, removals) is unseen by it: applied as sent, its
    /// names translated as any record's.
    Apply,
    /// Carried out as what it is to the rule, two renames of two entries: `a` → `via`, then
    /// `b` → `a`, then `via` → `b` (the peer's names), each decided and applied as a peer
    /// rename of its own (so an entry we renamed, removed or changed meanwhile is reconciled
    /// by the rename rows of the table). `via` is a hidden name beside `a`
    /// ([`exchange_via`]) that no record of the peer names.
    Renames { via: Vec<u8> },
}

/// The hidden name a peer's exchange of `a` and `b` (its names) passes through here
/// ([`ExchangeDecision::Renames`]): `.mirrorfs-exchange-<16 hex digits of both names>` in
/// `a`'s directory.
pub fn exchange_via(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut both = a.to_vec();
    both.push(0);
    both.extend_from_slice(b);
    let mut via = match a.iter().rposition(|c| *c == b'/') {
        Some(i) => a[..=i].to_vec(),
        None => Vec::new(),
    };
    via.extend_from_slice(format!(".mirrorfs-exchange-{:016x}", fnv(&both)).as_bytes());
    via
}

/// One site's view of its unseen writes.
#[derive(Debug, Clone)]
pub struct Reconciler {
    cfg: Config,
    entries: HashMap<Object, Entry>,
    /// (entry seq, object) for each entry, to drop the seen ones in order.
    by_seq: BTreeSet<(u64, Object)>,
    /// The entries of files with more than one name, by file ([`Entry::file`]): at most one per
    /// entry (kept and dropped with it), so bounded by `entries_max`.
    files: HashMap<FileId, Object>,
    /// The entries whose name is known, by name (a directory's rename moves those beneath it).
    paths: BTreeMap<Vec<u8>, Object>,
    /// Our renames the peer has not seen, by (seq, n): n > 0 for the aliases of a rename both
    /// sites made.
    renames: BTreeMap<(u64, u32), Moved>,
    /// Our removals (unlink, rmdir) the peer has not seen: object → seq, and by seq.
    removed: HashMap<Object, u64>,
    removed_by_seq: BTreeSet<(u64, Object)>,
    /// Removals up to this seq were dropped for room.
    removed_floor: u64,
    /// Our metadata changes the peer has not seen: (object, attribute) → the change, and by seq.
    meta: HashMap<(Object, u64), MetaEntry>,
    /// Those of files with more than one name, by (file, attribute) ([`MetaEntry::file`]): at
    /// most one per change (kept and dropped with it), so bounded as `meta`. Only the winner
    /// is told the files: only its decision compares them ([`Reconciler::peer_linked_meta`]).
    meta_files: HashMap<(FileId, u64), Object>,
    meta_by_seq: BTreeSet<(u64, Object, u64)>,
    /// Metadata changes up to this seq were dropped for room.
    meta_floor: u64,
    /// Names the peer made (created, or renamed something to) while our renames were unseen:
    /// its later records for them (and beneath them) name its new entry, never translated.
    fresh: BTreeSet<Vec<u8>>,
    /// Names the peer renamed something to whose source we had removed concurrently (the
    /// rename is skipped here): a later peer record beneath one of them, failing for want of
    /// it, makes it again as a directory ([`Reconciler::refill`]: the rename is a change and
    /// wins over the removal). Bounded as `fresh`.
    regained: BTreeSet<Vec<u8>>,
    /// Directories we removed concurrently and made again for a peer's change beneath them
    /// ([`Reconciler::refill`]): what is there now is the peer's directory, so a peer rename of
    /// it applies (it is not a rename of a name we removed). Bounded as `fresh`.
    remade: BTreeSet<Vec<u8>>,
    /// Names we removed, kept after the peer has seen the removal: a later peer record
    /// beneath one that fails here for want of it means the peer kept the directory (our
    /// removal failed there: it had put something in it, by a rename say), so it is made again
    /// ([`Reconciler::refill`]). Bounded as `fresh`; after a restart only the removals the
    /// replay brings back (those after `seen_by_peer`) are known.
    removed_names: BTreeSet<Vec<u8>>,
    /// The peer's removals (rmdir) of a directory we renamed since: its name → (ours, the
    /// removal's `seen`). A later `Mkdir` of that name the peer journaled after it considered
    /// more of ours is its making it again for our changes beneath it (its `refill`, before our
    /// rename reached it): it names our renamed directory, not a new one
    /// ([`Reconciler::translate_new`]). Bounded as `fresh`.
    ghosts: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
    /// Names we removed during the split and then made again (created, linked, a symlink or node
    /// made, or something renamed to it; not a mkdir, [`Local::Made`]): object → the seq of the making. A peer record for the name journaled
    /// before it had considered that seq is about the old entry, not ours
    /// ([`Reconciler::reused_since`]). Rebuilt by the replay after a restart (our removals and
    /// makings are in the journal), except the entries already listed (`true`: a skip listed,
    /// or an entry clash, [`Reconciler::peer_entry_clash`], which the replay cannot rebuild),
    /// which are in the notes; bounded as `fresh` (past it a dropped name's old records
    /// apply to the new entry, as before this rule).
    reused: BTreeMap<Object, (u64, bool)>,
    /// Names whose removal by the peer we undid (`Restore`: we had changed the file), while
    /// the peer had not seen that change: if the peer makes the name again meanwhile
    /// ([`Reconciler::peer_reused`]), its new entry takes the name and ours goes to a conflict
    /// copy. Persisted with the notes; bounded as `fresh`.
    restored: BTreeSet<Vec<u8>>,
    /// Our mkdirs the peer has not seen: name → seq (and by seq, to bound them). With our
    /// renames' entries ([`Reconciler::note_made`]) they are the directories we gave a name
    /// during the split ([`Reconciler::peer_dir_clash`]).
    dirs_made: BTreeMap<Vec<u8>, u64>,
    dirs_made_by_seq: BTreeSet<(u64, Vec<u8>)>,
    /// The peer's directories given a name our directory has kept (we are the lower id): the
    /// peer's name → (the name its directory is held under here, the seq of our making of the
    /// name). Its records journaled before it considered our making follow the hold
    /// ([`Reconciler::translate`]); its rename of the name (moving its directory aside, or
    /// away) or its rmdir of it ends the hold. Bounded as `fresh`.
    held: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
    /// Sources of our unseen renames moved by a peer rename applied here
    /// ([`Reconciler::peer_renamed`]): the peer's names beneath its new name that still
    /// translate (its new name is `fresh` otherwise). Forgotten with the renames; bounded as
    /// `fresh`. In the notes, with the renames whose names a peer rename moved
    /// (`renames_followed`): the replay rebuilds our renames as journaled, not the peer's
    /// renames applied since.
    followed: BTreeSet<Vec<u8>>,
    /// The keys of our renames (in `renames`) whose names a peer rename moved
    /// ([`Reconciler::peer_renamed`]): in the notes with their names now.
    renames_followed: BTreeSet<(u64, u32)>,
    /// Names we removed concurrently that the peer made again since (a create, mkdir or rename
    /// onto it, [`Reconciler::translate_new`]), while we had not made them again ourselves, and
    /// names our entry left (removed) for the peer's directory
    /// ([`Reconciler::moved_aside_for_peer`]): what is there now is the peer's entry, so its
    /// later removal or rename of the name applies ([`Reconciler::peer_unlink`],
    /// [`Reconciler::peer_rename`]). Forgotten with our removal; bounded as `fresh`; in the
    /// notes (the replay rebuilds our removal, not the peer's making after it).
    peer_remade: BTreeSet<Vec<u8>>,
    /// The peer's exchange being carried out here (its record's seq, the steps done: 1 to 3 of
    /// the three renames, 3 also for one applied as sent), until the record is acknowledged
    /// ([`Reconciler::exchange_done`]). In the notes: a crash between the steps would redo them
    /// all when the record comes again, and an exchange redone swaps the entries back.
    exchange: Option<(u64, u8)>,
    /// Names we gave an entry during the split the peer has not seen (created, a symlink,
    /// node or link made, or a rename's new name): name → seq, and by seq. A peer's making of
    /// one of them is two entries given one name ([`Reconciler::peer_entry_clash`]). Rebuilt
    /// by the replay after a restart; bounded by `entries_max` (past it the oldest is
    /// forgotten: the peer's making then fails as existing, as before this rule).
    names_made: BTreeMap<Vec<u8>, u64>,
    names_made_by_seq: BTreeSet<(u64, Vec<u8>)>,
    /// Entries kept at our unlink of one of their file's names ([`Local::RemovedLinked`]):
    /// object → (the unlink's seq, the file the entry was told). In the notes: the removed
    /// name cannot be looked up after a restart ([`Reconciler::drop_removed_entry`]). Bounded
    /// by `entries_max`; forgotten when seen by the peer (`advance`).
    unlinked: BTreeMap<Object, (u64, FileId)>,
    /// `fresh`, `regained`, `remade`, `removed_names`, `ghosts`, `restored`, `held`,
    /// `peer_remade`, `unlinked` or the listed `reused` changed since the last
    /// [`Reconciler::take_notes`] (the shell persists them: the journal does not hold the
    /// peer's `seen` of its records, so the decisions that noted them cannot be replayed).
    notes_dirty: bool,
    /// How a path becomes an object (the shell's token hash; FNV-1a by default).
    hash: fn(&[u8]) -> Object,
    /// The largest of our seqs the peer had considered as of its last record here.
    seen: u64,
    /// Entries up to this seq were dropped for room (see the module docs).
    floor: u64,
}

impl Reconciler {
    /// A fresh machine; `seen_by_peer` is the watermark persisted with the peer's applied
    /// position (0 for a new pair).
    pub fn new(cfg: Config, seen_by_peer: u64) -> Reconciler {
        Reconciler {
            cfg,
            entries: HashMap::new(),
            by_seq: BTreeSet::new(),
            files: HashMap::new(),
            paths: BTreeMap::new(),
            seen: seen_by_peer,
            floor: 0,
            renames: BTreeMap::new(),
            removed: HashMap::new(),
            removed_by_seq: BTreeSet::new(),
            removed_floor: 0,
            meta: HashMap::new(),
            meta_files: HashMap::new(),
            meta_by_seq: BTreeSet::new(),
            meta_floor: 0,
            fresh: BTreeSet::new(),
            regained: BTreeSet::new(),
            remade: BTreeSet::new(),
            removed_names: BTreeSet::new(),
            ghosts: BTreeMap::new(),
            reused: BTreeMap::new(),
            restored: BTreeSet::new(),
            dirs_made: BTreeMap::new(),
            dirs_made_by_seq: BTreeSet::new(),
            held: BTreeMap::new(),
            followed: BTreeSet::new(),
            renames_followed: BTreeSet::new(),
            peer_remade: BTreeSet::new(),
            exchange: None,
            names_made: BTreeMap::new(),
            names_made_by_seq: BTreeSet::new(),
            unlinked: BTreeMap::new(),
            notes_dirty: false,
            hash: fnv,
        }
    }

    /// Objects are `hash(path)` (the shell's token hash, so that its objects and ours agree).
    pub fn with_hash(mut self, hash: fn(&[u8]) -> Object) -> Reconciler {
        self.hash = hash;
        self
    }

    pub fn config(&self) -> Config {
        self.cfg
    }

    /// Our change `seq` (journaled under the order lock; also the replay after a restart).
    pub fn local_change(&mut self, seq: u64, change: &Local) {
        if seq <= self.seen {
            return;
        }
        let max = self.cfg.entries_max;
        match change {
            Local::Data(p) => self.local_path(seq, p, false),
            Local::Rename { from, to, exchange } => {
                // The replay after a restart, over the notes: a rename whose names a peer's
                // rename moved since keeps them (the rest of the change is as journaled).
                self.renames.entry((seq, 0)).or_insert_with(|| Moved {
                    from: from.clone(),
                    to: to.clone(),
                    exchange: *exchange,
                    current_after: 0,
                    here: None,
                });
                while self.renames.len() > max {
                    self.renames.pop_first();
                }
                self.move_entries(from, to, *exchange, false);
                self.note_reuse(seq, to);
                self.unmake_dirs(from);
                if *exchange {
                    self.unmake_dirs(to);
                }
                self.note_made(seq, to);
                if *exchange {
                    self.note_made(seq, from);
                }
                self.name_moved(seq, from, to, *exchange);
            }
            Local::Removed(p) | Local::RemovedLinked(p) => {
                self.unmake_dirs(p);
                self.unmake_name(p);
                self.drop_removed_entry(seq, p, matches!(change, Local::RemovedLinked(_)));
                self.notes_dirty |= self.removed_names.insert(p.clone());
                while self.removed_names.len() > max {
                    self.removed_names.pop_first();
                }
                let o = (self.hash)(p);
                if let Some(old) = self.removed.insert(o, seq) {
                    self.removed_by_seq.remove(&(old, o));
                }
                self.removed_by_seq.insert((seq, o));
                while self.removed.len() > max {
                    let Some((s, o)) = self.removed_by_seq.pop_first() else {
                        break;
                    };
                    self.removed.remove(&o);
                    self.removed_floor = self.removed_floor.max(s);
                }
            }
            Local::Meta(p, key) => {
                let k = ((self.hash)(p), *key);
                // The file stays with the change of the name's attribute (looked at once).
                let file = self.meta_remove(k.0, k.1).and_then(|m| m.file);
                self.meta_put(
                    k,
                    MetaEntry {
                        seq,
                        path: p.clone(),
                        file,
                    },
                );
                while self.meta.len() > max {
                    let Some((s, o, a)) = self.meta_by_seq.first().copied() else {
                        break;
                    };
                    if self.meta_remove(o, a).is_none() {
                        self.meta_by_seq.remove(&(s, o, a));
                    }
                    self.meta_floor = self.meta_floor.max(s);
                }
            }
            Local::Made(p) => {
                self.note_reuse(seq, p);
                self.note_name_made(seq, p);
            }
            Local::MadeDir(p) => {
                self.note_dir_made(seq, p);
                // Made under a name we removed: the peer's data records of the old entry (a
                // file's, or its give-back) are not of this directory.
                self.note_reuse(seq, p);
            }
        }
    }

    /// We removed `path`: our unseen data changes of the file were of a file gone here (the
    /// peer's records journaled before it saw the removal are decided by the removal, not by
    /// them), so a peer record for a later entry of the name, made by the peer, is not
    /// concurrent with them (seed 213,715: `rm x` at one site after its write of `x`, `rm x`,
    /// `touch x`, a write of the new `x` at the other; the writes of the new `x` were skipped
    /// or copied aside against the old file's). A file that had other names (`linked`: the
    /// unlink's link count, [`Local::RemovedLinked`]) keeps its entry: it lives on under them
    /// ([`Reconciler::peer_linked_data`]). Its file can no longer be looked up by the removed
    /// name, so the file the entry was told is kept in the notes with the removal's seq
    /// (`unlinked`), and the replay after a restart tells it again to the entry it rebuilds.
    fn drop_removed_entry(&mut self, seq: u64, path: &[u8], linked: bool) {
        let o = (self.hash)(path);
        if !linked {
            self.take_entry(o);
            return;
        }
        let Some(file) = self.entries.get(&o).map(|e| e.file) else {
            return;
        };
        match file {
            Some(f) if f != 0 => {
                self.unlinked.insert(o, (seq, f));
                self.notes_dirty = true;
                while self.unlinked.len() > self.cfg.entries_max {
                    self.unlinked.pop_first();
                }
            }
            // The replay after a restart: the file the notes hold for this very removal.
            None => {
                if let Some(&(_, f)) = self.unlinked.get(&o).filter(|&&(s, _)| s == seq) {
                    self.note_file(path, f);
                }
            }
            Some(_) => {}
        }
    }

    /// Our entry of the file we unlinked `path` of is kept with its file
    /// ([`Reconciler::drop_removed_entry`]): the shell makes the notes durable.
    pub fn kept_unlinked(&self, path: &[u8]) -> bool {
        self.unlinked.contains_key(&(self.hash)(path))
    }

    /// Our change `seq` made `path` again: a reuse if we removed the name during the split and
    /// the peer has not seen that removal.
    fn note_reuse(&mut self, seq: u64, path: &[u8]) {
        let o = (self.hash)(path);
        if self.removed.get(&o).is_some_and(|&u| u < seq) {
            // The same making again (the replay after a restart, over the notes): as it was.
            if self.reused.get(&o).is_none_or(|&(c, _)| c != seq) {
                self.reused.insert(o, (seq, false));
            }
            self.bound_reused();
        }
    }

    /// A peer record for `object` journaled before it considered our making of the name again
    /// after our removal of it (`seen` below that making): it is about the old entry (removed
    /// here) or the peer's restore of it, never about our new entry of the name. It is not
    /// applied; the peer, which holds the old entry, moves it to a conflict copy when our new
    /// entry reaches it ([`Reconciler::peer_reused`]).
    pub fn reused_since(&self, object: Object, seen: u64) -> bool {
        self.reused.get(&object).is_some_and(|&(c, _)| c > seen)
    }

    /// `reused` bounded by `entries_max` (the first objects dropped; one listed changes the
    /// notes).
    fn bound_reused(&mut self) {
        while self.reused.len() > self.cfg.entries_max {
            if self.reused.pop_first().is_some_and(|(_, r)| r.1) {
                self.notes_dirty = true;
            }
        }
    }

    /// The peer makes `path` (our name; a create, mknod, symlink, link or rename onto it), journaled having considered ours through `seen`, and `path` is our file here: if we
    /// kept it against the peer's removal of it (`Restore`) and the peer had not seen that
    /// (our entry is concurrent), the peer removed the name and made it again (a reuse). The
    /// new entry takes the name: `true`, our file goes to a conflict copy (listed), then
    /// [`Reconciler::reused_aside`], and the peer's making applies.
    pub fn peer_reused(&mut self, path: &[u8], seen: u64) -> bool {
        self.advance(seen);
        self.restored.contains(path) && self.entries.contains_key(&(self.hash)(path))
    }

    /// Our file at `path` went to its conflict copy for the peer's new entry
    /// ([`Reconciler::peer_reused`]): our entry for the name is forgotten (its changes went
    /// with the copy; the peer's records of its new entry are not concurrent with them).
    pub fn reused_aside(&mut self, path: &[u8]) {
        self.notes_dirty |= self.restored.remove(path);
        self.take_entry((self.hash)(path));
    }

    /// A file or directory changed its name here (our rename, or the peer's applied here): our
    /// unseen data changes of it, or of the files beneath it, go with it.
    /// (A peer's rename applied here moves only our data changes: a rename of ours onto one
    /// of its names is settled by [`Reconciler::peer_rename`].)
    pub fn moved(&mut self, from: &[u8], to: &[u8], exchange: bool) {
        self.move_entries(from, to, exchange, true);
    }

    fn move_entries(&mut self, from: &[u8], to: &[u8], exchange: bool, data_only: bool) {
        if from == to || (self.hash)(from) == (self.hash)(to) {
            return;
        }
        let src = self.take_beneath(from);
        let dst = self.take_beneath(to);
        for (rest, e) in src {
            self.put_at(to, &rest, e, data_only);
        }
        if exchange {
            for (rest, e) in dst {
                self.put_at(from, &rest, e, data_only);
            }
        }
    }

    /// The peer's records for our entry's name are for our own file after all: only our data
    /// changes of it count.
    fn strip_made(&mut self, o: Object) {
        if let Some(e) = self.take_entry(o) {
            if let Some(p) = e.path.clone() {
                self.put_at(&p, b"", e, true);
            } else if e.data > 0 {
                self.put_entry(o, Entry { seq: e.data, ..e });
            }
        }
    }

    /// Our rename `seq` gave `path` another file: the peer's records for the name itself (not
    /// for our file under its old name) are concurrent with it.
    fn note_made(&mut self, seq: u64, path: &[u8]) {
        let o = (self.hash)(path);
        let old = self.take_entry(o);
        let data = old.as_ref().map_or(0, |e| e.data);
        // The entry moved here by the rename (`move_entries`): the renamed file's.
        let file = old.and_then(|e| e.file);
        self.put_entry(
            o,
            Entry {
                seq,
                data,
                path: Some(path.to_vec()),
                rewrite: false,
                copied: false,
                file,
            },
        );
        self.bound_entries();
    }

    /// Takes the entries of `base` and beneath it, each with its name after `base`.
    fn take_beneath(&mut self, base: &[u8]) -> Vec<(Vec<u8>, Entry)> {
        let mut out = Vec::new();
        if let Some(e) = self.take_entry((self.hash)(base)) {
            out.push((Vec::new(), e));
        }
        let mut prefix = base.to_vec();
        prefix.push(b'/');
        let below: Vec<(Vec<u8>, Object)> = self
            .paths
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(p, o)| (p[base.len()..].to_vec(), *o))
            .collect();
        for (rest, o) in below {
            if let Some(e) = self.take_entry(o) {
                out.push((rest, e));
            }
        }
        out
    }

    /// Puts an entry taken by [`Reconciler::take_beneath`] at `base` + `rest`.
    fn put_at(&mut self, base: &[u8], rest: &[u8], mut e: Entry, data_only: bool) {
        if data_only && e.seq != e.data {
            if e.data == 0 {
                return;
            }
            e.seq = e.data;
        }
        let mut p = base.to_vec();
        p.extend_from_slice(rest);
        let o = (self.hash)(&p);
        if let Some(old) = self.take_entry(o) {
            // Two entries on one name (a hash collision): the newer stays.
            if old.seq > e.seq {
                e = old;
            }
        }
        e.path = Some(p);
        self.put_entry(o, e);
    }

    fn take_entry(&mut self, o: Object) -> Option<Entry> {
        let e = self.entries.remove(&o)?;
        self.by_seq.remove(&(e.seq, o));
        self.unfile(o, e.file);
        if let Some(p) = &e.path {
            if self.paths.get(p) == Some(&o) {
                self.paths.remove(p);
            }
        }
        Some(e)
    }

    fn put_entry(&mut self, o: Object, e: Entry) {
        self.by_seq.insert((e.seq, o));
        if let Some(f) = e.file.filter(|&f| f != 0) {
            self.files.insert(f, o);
        }
        if let Some(p) = &e.path {
            self.paths.insert(p.clone(), o);
        }
        self.entries.insert(o, e);
    }

    /// The peer's name `path`, journaled there after it had considered our records through
    /// `seen`, translated through our renames it had not seen (`None`: unchanged). A change
    /// the peer made to a file we renamed follows the file to its new name here.
    pub fn translate(&mut self, path: &[u8], seen: u64) -> Option<Vec<u8>> {
        self.translate_moved(path, seen).0
    }

    /// The peer's name `path` went through our unseen renames and came back to itself (a
    /// file renamed or exchanged away and back, `a` → `e` → `a`): a peer data record for it
    /// names our file, as a translated one does ([`Reconciler::peer_data_record`]'s
    /// `translated`), not a new entry our renames gave the name.
    pub fn moved_and_back(&mut self, path: &[u8], seen: u64) -> bool {
        matches!(self.translate_moved(path, seen), (None, true))
    }

    /// [`Reconciler::translate`], and whether any of our renames moved the name (even back).
    fn translate_moved(&mut self, path: &[u8], seen: u64) -> (Option<Vec<u8>>, bool) {
        self.advance(seen);
        if let Some(q) = self.held_path(path, seen) {
            // Beneath the peer's held directory: our renames of names in it before the peer
            // moved it onto the clash (`d/x` → `d/y`, then its `d` → `e`) followed its rename
            // ([`Reconciler::peer_renamed`]), so they name its entries here, and come first
            // (seed 508,052: its write of `e/x` went to the held `e.conflict/x`, which our
            // rename had moved to `e.conflict/y`).
            if self.follows(path) {
                if let (Some(r), true) = self.through_renames(path) {
                    return (Some(r), true);
                }
            }
            return (Some(q), true);
        }
        self.through_renames(path)
    }

    /// [`Reconciler::translate_moved`] through our unseen renames only.
    fn through_renames(&self, path: &[u8]) -> (Option<Vec<u8>>, bool) {
        if self.renames.is_empty() {
            return (None, false);
        }
        let fresh = self
            .fresh
            .range(..=path.to_vec())
            .next_back()
            .is_some_and(|f| moved_path(path, f, f).is_some());
        if fresh && !self.follows(path) {
            return (None, false);
        }
        let mut p: Option<Vec<u8>> = None;
        // Our renames that a name reached through a peer-moved rename is current after.
        let mut passed = 0;
        // An alias (n > 0: the peer's new name for an entry both sites renamed, ours kept) is
        // a name the peer gave after its rename, so it is matched against the peer's name
        // itself, not against that name moved through our renames, and the last one made
        // counts: it names our entry where our renames then had put it, which they do not
        // move again (seed 671,076: our `a` ⇄ `d` twice against its `a` ⇄ `d` carried out as
        // renames, whose aliases `a` → `d` and `d` → `a` moved its write of `d` back onto our
        // directory `d`).
        let alias = self
            .renames
            .iter()
            .rev()
            .filter(|((_, n), _)| *n > 0)
            .find_map(|(_, m)| Some((moved_path(path, &m.from, &m.to)?, m.current_after)));
        let aliased = alias.as_ref().map(|(_, after)| *after);
        if let Some((q, after)) = alias {
            p = Some(q);
            passed = after;
        }
        for (&(seq, n), m) in &self.renames {
            if aliased.is_some_and(|after| n > 0 || seq <= after) {
                continue;
            }
            // (One whose source a peer rename moved too names the peer's entry: it applies.)
            if seq <= passed && !self.followed.contains(&m.from) {
                continue;
            }
            let next = m.apply(p.as_deref().unwrap_or(path));
            if next.is_some() {
                p = next;
                passed = passed.max(m.current_after);
            }
        }
        let moved = p.is_some();
        (p.filter(|q| q.as_slice() != path), moved)
    }

    /// A name the peer makes (creates, links, renames to): a new entry, so only its directory
    /// is translated; later records of the peer for it are not translated at all.
    /// A `Mkdir` of a name whose removal by the peer we translated through our rename of it
    /// ([`Reconciler::translate_removal`]), journaled after the peer considered more of ours,
    /// is the peer making our directory again for our changes beneath it: our name for it.
    pub fn translate_new(&mut self, path: &[u8], seen: u64) -> Option<Vec<u8>> {
        self.advance(seen);
        self.note_peer_remade(path, seen);
        if let Some((ours, removal)) = self.ghosts.get(path) {
            if seen > *removal {
                return Some(ours.clone());
            }
        }
        let (dir, name) = match path.iter().rposition(|b| *b == b'/') {
            Some(i) => (&path[..i], &path[i..]),
            None => (&path[..0], path),
        };
        let out = self.translate(dir, seen).map(|mut d| {
            d.extend_from_slice(name);
            d
        });
        if !self.renames.is_empty() {
            self.notes_dirty |= self
                .fresh
                .insert(out.clone().unwrap_or_else(|| path.to_vec()));
            while self.fresh.len() > self.cfg.entries_max {
                self.fresh.pop_first();
            }
        }
        out
    }

    /// The peer's removal (rmdir) of `path`, translated as [`Reconciler::translate`]; a
    /// directory we renamed since is noted, for the peer's making it again
    /// ([`Reconciler::translate_new`]). A held name's rmdir names the holding name; the hold
    /// lasts until [`Reconciler::peer_rmdir_done`], so that translating the record again
    /// (the shell does, for its reuse window and under the order lock) gives one answer.
    pub fn translate_removal(&mut self, path: &[u8], seen: u64) -> Option<Vec<u8>> {
        if let Some(q) = self.held_removal(path, seen) {
            return Some(q);
        }
        let q = self.translate(path, seen)?;
        self.ghosts.insert(path.to_vec(), (q.clone(), seen));
        self.notes_dirty = true;
        while self.ghosts.len() > self.cfg.entries_max {
            self.ghosts.pop_first();
        }
        Some(q)
    }

    /// The peer's `op` with every name translated ([`Reconciler::translate`]); `None`:
    /// unchanged. A name that would be too long here is an error (the record fails).
    pub fn translate_op(&mut self, op: &Op, seen: u64) -> Result<Option<Op>, PathError> {
        if let Op::Unlink { path, .. } = op {
            if let Some((ours, _)) = self.held.get(path.as_bytes()) {
                // Its file held here ([`Reconciler::hold_source`]), whatever it had seen (it
                // moves the file aside having seen our directory): the holding name.
                let ours = RelPath::new(ours.clone())?;
                let mut out = op.clone();
                if let Op::Unlink { path, .. } = &mut out {
                    *path = ours;
                }
                return Ok(Some(out));
            }
        }
        let mut t = |p: &RelPath, new: bool| -> Result<Option<RelPath>, PathError> {
            let q = if new {
                self.translate_new(p.as_bytes(), seen)
            } else {
                self.translate(p.as_bytes(), seen)
            };
            q.map(RelPath::new).transpose()
        };
        if let Op::Rmdir { path } = op {
            return Ok(match self.translate_removal(path.as_bytes(), seen) {
                Some(q) => Some(Op::Rmdir {
                    path: RelPath::new(q)?,
                }),
                None => None,
            });
        }
        let mut changed = false;
        let mut out = op.clone();
        for (p, new) in out.names_mut() {
            if let Some(q) = t(p, new)? {
                *p = q;
                changed = true;
            }
        }
        Ok(changed.then_some(out))
    }

    /// The peer's rename `from` → `to` (its names), journaled after it had considered our
    /// records through `seen`.
    pub fn peer_rename(&mut self, from: &[u8], to: &[u8], seen: u64) -> RenameDecision {
        self.advance(seen);
        if let Some(from2) = self.end_hold_by_rename(from) {
            let to2 = self.translate_new(to, seen).unwrap_or_else(|| to.to_vec());
            return RenameDecision::Apply {
                from: from2,
                to: to2,
                clash: false,
                aside: false,
            };
        }
        if self.removed_concurrently(from, seen)
            && !self.remade.contains(from)
            && !self.peer_remade.contains(from)
            && !self.renamed_away_before_removal(from)
        {
            // The peer's later records beneath its new name (a directory it renamed, then
            // perhaps filled) make that name again here.
            let to2 = self.translate_new(to, seen).unwrap_or_else(|| to.to_vec());
            self.notes_dirty |= self.regained.insert(to2);
            while self.regained.len() > self.cfg.entries_max {
                self.regained.pop_first();
            }
            return RenameDecision::Removed;
        }
        if self.regained.contains(from) {
            // A name that holds the peer's directory we removed (its rename of it was not
            // applied here, above), renamed on by the peer: the directory is not here to move,
            // and its later records beneath the new name make that again (seeds 235,067 and
            // 832,708: its exchange of `d` and `a`, carried out as `d` → hidden, `a` → `d`,
            // hidden → `a`, against our `rm d/x`, `rmdir d`; its give-back of `a/x`).
            let to2 = self.translate_new(to, seen).unwrap_or_else(|| to.to_vec());
            self.regained.remove(from);
            self.regained.insert(to2);
            self.notes_dirty = true;
            return RenameDecision::Removed;
        }
        let to2 = self.translate_new(to, seen).unwrap_or_else(|| to.to_vec());
        // Our first unseen rename of exactly this name: both sites renamed it.
        let ours = self.our_rename_of(from);
        // Moved by our renames and back (exchanged twice): both sites renamed it all the same,
        // ours under its old name.
        let from2 = match self.translate_moved(from, seen) {
            (None, true) => Some(from.to_vec()),
            (q, _) => q,
        };
        let (Some((seq, _)), Some(from2)) = (ours, from2) else {
            let from2 = self.translate(from, seen).unwrap_or_else(|| from.to_vec());
            return self.peer_rename_onto(from2, to2, seen);
        };
        if from2 == to2 {
            // The same new name at both sites: nothing to do, no conflict (one file: the peer's
            // records for the name are for it).
            self.strip_made((self.hash)(&to2));
            self.exchange_end_renamed((seq, 0), from, to);
            if self.cfg.wins() && self.renames.get(&(seq, 0)).is_some_and(|m| m.exchange) {
                // Our exchange's end: the peer's later records for the name (a rename of it by
                // its next exchange, say) are of our entry there, which both sites renamed, not
                // of a fresh one (seed 388,136: our `d/x` ⇄ `a` against its `d/x` ⇄ `a` twice;
                // its second exchange, taken for renames of names it made, undid ours here). The
                // name as it is: our renames before do not move it.
                self.alias(seq, to2.clone(), to2);
            }
            return RenameDecision::Keep {
                ours: from2,
                clash: false,
            };
        }
        if !self.cfg.wins() {
            return RenameDecision::Apply {
                from: from2,
                to: to2,
                clash: true,
                aside: false,
            };
        }
        // The peer's old name no longer names the entry there (its exchange carried out as
        // renames moves another onto it next; seed 388,136): our exchange's end follows it to
        // the peer's new name, as for the same new name above.
        self.exchange_end_renamed((seq, 0), from, to);
        let known = !self.alias(seq, to2, from2.clone());
        RenameDecision::Keep {
            ours: from2,
            clash: !known,
        }
    }

    /// The peer's later records under its new name `theirs` for an entry both sites renamed
    /// (our rename `seq`) follow ours, `ours` (once: the same record can be decided again):
    /// `true` when the alias is new.
    fn alias(&mut self, seq: u64, theirs: Vec<u8>, ours: Vec<u8>) -> bool {
        let alias = Moved {
            from: theirs,
            to: ours,
            exchange: false,
            // `ours` is our name after all our renames so far.
            current_after: self.renames.keys().next_back().map_or(0, |k| k.0),
            here: None,
        };
        // Not a fresh name of the peer's: its records for it follow the alias.
        self.notes_dirty |= self.fresh.remove(&alias.from);
        let aliases = (seq, 1)..(seq, u32::MAX);
        let known = self
            .renames
            .range(aliases.clone())
            .any(|(_, m)| m.from == alias.from && m.to == alias.to);
        if !known {
            let n = self.renames.range(aliases).count() as u32 + 1;
            self.renames.insert((seq, n), alias);
        }
        !known
    }

    /// The peer's exchange of `a` and `b` (its names), journaled after it had considered our
    /// records through `seen`. To the rule it is two renames (each name now holds the other's
    /// entry): while we have a rename or removal the peer had not seen, it is carried out as
    /// such ([`ExchangeDecision::Renames`]), so that our rename, removal or change of either
    /// entry meets the peer's move of it as for a plain rename (both renamed it: the lower
    /// id's name; we removed it: the peer's move wins and it comes back under its new name;
    /// we changed it: the change follows). Otherwise it is applied as sent.
    pub fn peer_exchange(&mut self, a: &[u8], b: &[u8], seen: u64) -> ExchangeDecision {
        self.advance(seen);
        let unseen = !self.renames.is_empty()
            || !self.removed.is_empty()
            || seen < self.removed_floor
            || !self.held.is_empty();
        if !unseen || a == b {
            return ExchangeDecision::Apply;
        }
        ExchangeDecision::Renames {
            via: exchange_via(a, b),
        }
    }

    /// How many of the steps of the peer's exchange record `seq` (its seq) are done here: 0
    /// (none, or another record's), 1 or 2 (a crash came between the renames it is carried out
    /// as: the next ones are done, as renames whatever [`Reconciler::peer_exchange`] says now),
    /// 3 (done: nothing more is done, the record came again after a crash before its
    /// acknowledgement). The shell makes the notes durable after each step
    /// ([`Reconciler::exchange_step_done`]).
    pub fn exchange_done(&self, seq: u64) -> u8 {
        match self.exchange {
            Some((s, done)) if s == seq => done,
            _ => 0,
        }
    }

    /// `done` of the steps of the peer's exchange record `seq` are carried out here (3: all of
    /// them, or the exchange applied as sent).
    pub fn exchange_step_done(&mut self, seq: u64, done: u8) {
        let now = Some((seq, done.min(3)));
        self.notes_dirty |= self.exchange != now;
        self.exchange = now;
    }

    /// The peer's records through `seq` (its seqs) are acknowledged: they do not come again.
    pub fn peer_acknowledged(&mut self, seq: u64) {
        if self.exchange.is_some_and(|(s, _)| s <= seq) {
            self.exchange = None;
            self.notes_dirty = true;
        }
    }

    /// The peer's rename of `from` onto `to` (our names): concurrent with our change of `to` (a
    /// rename of another file onto it, or a write of it), two entries are given one name. The
    /// lower id's stays; the higher id's goes to a conflict copy. The loser copies its own
    /// aside first, then applies the rename (`Apply { aside: true }`); the winner does not
    /// apply it (`Displaced`): it removes the source, whose content the loser's copy brings,
    /// unless it changed the source concurrently (then it gives it back whole), and rewrites
    /// its `to` whole once (the loser may have applied the winner's diffs of `to` over its own).
    fn peer_rename_onto(&mut self, from: Vec<u8>, to: Vec<u8>, seen: u64) -> RenameDecision {
        if self.peer_reused(&to, seen) {
            // The peer removed `to` and renamed another file onto it: its file takes the name,
            // ours (kept against the removal) goes aside, at either site id.
            self.reused_aside(&to);
            return RenameDecision::Apply {
                from,
                to,
                clash: false,
                aside: true,
            };
        }
        if self.removed_concurrently(&to, seen) && !self.reused.contains_key(&(self.hash)(&to)) {
            // We removed the entry at `to` and made nothing of ours there since (the peer's
            // exchange carried out as renames moves one onto a name it vacated): our changes
            // of it went with it, the name is free here.
            return RenameDecision::Apply {
                from,
                to,
                clash: false,
                aside: false,
            };
        }
        let wins = self.cfg.wins();
        let Some(e) = self.concurrent((self.hash)(&to), seen) else {
            return RenameDecision::Apply {
                from,
                to,
                clash: false,
                aside: false,
            };
        };
        if !wins {
            let aside = !e.copied;
            e.copied = true;
            return RenameDecision::Apply {
                from,
                to,
                clash: false,
                aside,
            };
        }
        let first = !e.rewrite && !e.copied;
        let rewrite = !e.rewrite;
        e.copied = true;
        e.rewrite = true;
        let source = self.peer_rename_onto_dir(&from, seen);
        RenameDecision::Displaced {
            from,
            to,
            rewrite,
            first,
            source,
        }
    }

    /// The peer's unlink of `path` (its name), journaled after it had considered our records
    /// through `seen`: the name to act on here and the decision. We renamed the file since: the
    /// rename is a change, and it wins (`Restore` under its new name).
    /// We removed the name ourselves since (and perhaps made a new file under it): the peer's
    /// removal was of the old file, which is gone here already: `Skip`.
    pub fn peer_unlink(&mut self, path: &[u8], seen: u64) -> (Vec<u8>, Decision) {
        self.advance(seen);
        if let Some((ours, _)) = self.held.remove(path) {
            // Its file held here ([`Reconciler::hold_source`]; a held directory is not
            // unlinked), moved aside there: the holding name goes.
            self.notes_dirty = true;
            return (ours, Decision::Apply);
        }
        if self.removed_concurrently(path, seen)
            && !self.renamed_away_before_removal(path)
            && !self.peer_remade.contains(path)
        {
            let skip = Decision::Skip {
                rewrite: false,
                first: false,
            };
            return (path.to_vec(), skip);
        }
        if let Some(p) = self.translate(path, seen) {
            let o = (self.hash)(&p);
            let first = match self.entries.get_mut(&o) {
                Some(e) => {
                    let first = !e.copied && !e.rewrite;
                    e.copied = true;
                    e.rewrite = true;
                    first
                }
                None => true,
            };
            return (p, Decision::Restore { first });
        }
        let d = self.peer_remove((self.hash)(path), seen);
        if matches!(d, Decision::Restore { .. }) {
            // Kept under the peer's name: a making of it by the peer since is a reuse.
            self.notes_dirty |= self.restored.insert(path.to_vec());
            while self.restored.len() > self.cfg.entries_max {
                self.restored.pop_first();
            }
        }
        (path.to_vec(), d)
    }

    /// The peer renamed `from` (our name) onto a name that is a directory here, made during the
    /// split (else the rename would have failed at the peer too): the directory stays, and the
    /// peer moves its file aside to a conflict copy when our directory reaches it (or renames it
    /// away before). So the source is held here till then (`Apply`: moved to a holding name,
    /// [`Reconciler::hold_source`]) — unless we changed it concurrently: then it is kept and
    /// given back to the peer (`Restore`).
    pub fn peer_rename_onto_dir(&mut self, from: &[u8], seen: u64) -> Decision {
        self.advance(seen);
        let Some(e) = self.concurrent((self.hash)(from), seen) else {
            return Decision::Apply;
        };
        let first = !e.copied && !e.rewrite;
        e.copied = true;
        e.rewrite = true;
        Decision::Restore { first }
    }

    /// [`Reconciler::peer_rename_onto_dir`] said `Apply`: the peer's rename `theirs_from` →
    /// `theirs_to` (its names) of a file onto our directory `to` was carried out here as
    /// `from` → `hold` (ours: a free holding name), the file held there until the peer moves
    /// it aside (its unlink of `theirs_to` when our directory reaches it, which removes the
    /// holding name: [`Reconciler::peer_unlink`]) or renames it away before (which moves it
    /// on from the holding name: [`Reconciler::peer_rename`]). Removed at once, it was lost
    /// here when the peer renamed it away first (seed 252,772: `d/x` ⇄ `a` and back there,
    /// `a` ⇄ `d` here; its second exchange, carried out as renames, then took our directory
    /// for its `a` and left it under the hidden name). Its records for `theirs_to` journaled
    /// before it considered our directory there follow the hold ([`Reconciler::hold`]).
    pub fn hold_source(
        &mut self,
        (theirs_from, theirs_to): (&[u8], &[u8]),
        (from, to): (&[u8], &[u8]),
        hold: &[u8],
        seen: u64,
    ) {
        let mkdir = self.dirs_made.get(to).copied().filter(|&s| s > seen);
        let renamed = self
            .entries
            .get(&(self.hash)(to))
            .filter(|e| e.seq > seen && e.path.as_deref() == Some(to))
            .map(|e| e.seq);
        let made = mkdir.max(renamed).unwrap_or(seen + 1);
        self.peer_renamed(theirs_from, theirs_to, from, hold, false);
        self.hold(theirs_to, hold, made);
    }

    /// The peer's data change of `path` (its name): the name here and the decision.
    /// A name our rename gave the peer's file and that we removed since (perhaps making it
    /// again) is the old entry's: the record is decided as one naming the name itself
    /// ([`Reconciler::removed_since_moved`]).
    pub fn peer_data(&mut self, path: &[u8], seen: u64) -> (Vec<u8>, Decision) {
        let (p, translated) = match self.translate_moved(path, seen) {
            (Some(p), _) => (p, true),
            (None, moved) => (path.to_vec(), moved),
        };
        let translated = translated && !self.removed_since_moved(path, &p);
        let d = self.peer_data_record(Some((self.hash)(&p)), seen, translated);
        (p, d)
    }

    /// The peer's name `path`, translated to `ours` through our renames: we removed `ours`
    /// after the last of those renames moved the peer's entry there (`a` → `b`, `rm b`, and
    /// perhaps `c` → `b`). The peer's entry is gone here; what is at `ours` now is another.
    pub fn removed_since_moved(&self, path: &[u8], ours: &[u8]) -> bool {
        let Some(&removal) = self.removed.get(&(self.hash)(ours)) else {
            return false;
        };
        let mut cur = path.to_vec();
        let mut last = None;
        for (&(seq, _), m) in &self.renames {
            if let Some(n) = m.apply(&cur) {
                cur = n;
                last = Some(seq);
            }
        }
        cur == ours && last.is_some_and(|t| removal > t)
    }

    /// The peer's metadata change of attribute `key` of `path` (our name for it), journaled
    /// after it had considered our records through `seen`: `false` when we changed the same
    /// attribute concurrently and win (ours stays at both sites: the loser applies ours).
    pub fn peer_meta(&mut self, path: &[u8], key: u64, seen: u64) -> bool {
        self.peer_linked_meta(path, key, 0, seen)
    }

    /// A peer record for `path` (its name, translated) failed here because a directory on
    /// the way is missing: the ancestors we removed concurrently, or the peer's new names of
    /// directories we removed concurrently (its rename was skipped here), outermost first, to
    /// be made again before the record is applied again (a change beneath a directory, or its
    /// rename, wins over its removal).
    pub fn refill(&mut self, path: &[u8], seen: u64) -> Vec<Vec<u8>> {
        self.advance(seen);
        let mut out = Vec::new();
        for (i, b) in path.iter().enumerate() {
            if *b != b'/' {
                continue;
            }
            let dir = &path[..i];
            if self.removed_concurrently(dir, seen) {
                // Made again for the peer: its directory now (a rename of it by the peer
                // applies, [`Reconciler::peer_rename`]).
                self.notes_dirty |= self.remade.insert(dir.to_vec());
                while self.remade.len() > self.cfg.entries_max {
                    self.remade.pop_first();
                }
                out.push(dir.to_vec());
            } else if self.regained.contains(dir) || self.removed_names.contains(dir) {
                out.push(dir.to_vec());
            }
        }
        out
    }

    /// Our unseen removal of `path` came after an unseen rename of ours moved the entry at
    /// `path` (or a directory above it) away (`d` → `e`, `mkdir d`, `rmdir d`): the removal
    /// was of a later entry of the name, and a peer record naming `path` that had not seen the
    /// rename is about the renamed one ([`Reconciler::translate`] finds it).
    fn renamed_away_before_removal(&self, path: &[u8]) -> bool {
        let Some(&removal) = self.removed.get(&(self.hash)(path)) else {
            return false;
        };
        self.renames.iter().any(|(&(seq, n), m)| {
            n == 0
                && seq < removal
                && (moved_path(path, &m.from, &m.to).is_some()
                    || (m.exchange && moved_path(path, &m.to, &m.from).is_some())
                    // An exchange's ends as named here: a peer rename of the entry there (both
                    // renamed it) moved its end to the peer's name (seed 590,374: our `d/x` ⇄
                    // `a`, the peer's `a` ⇄ `d` twice carried out as renames; its directory
                    // moved onto our `a`, our file aside and removed, then back).
                    || m.here.as_ref().is_some_and(|(f, t)| {
                        moved_path(path, f, f).is_some() || moved_path(path, t, t).is_some()
                    }))
        })
    }

    /// The peer makes `path` (its name): if we removed it concurrently and have not made it
    /// again ourselves (a file, [`Local::Made`], or an unseen mkdir), the peer's entry will be
    /// there ([`Reconciler::peer_remade`]).
    fn note_peer_remade(&mut self, path: &[u8], seen: u64) {
        let o = (self.hash)(path);
        if self.removed_concurrently(path, seen)
            && !self.reused.contains_key(&o)
            && !self.dirs_made.contains_key(path)
        {
            self.notes_dirty |= self.peer_remade.insert(path.to_vec());
            while self.peer_remade.len() > self.cfg.entries_max {
                self.peer_remade.pop_first();
            }
        }
    }

    /// Our entry at `path` went to a conflict copy and was removed (journaled) so that the
    /// peer's directory takes the name (its mkdir of it, its rename of a directory onto it, or
    /// a directory made again for its change): our removal was of our entry, not of the peer's
    /// now there, so the peer's later rename or removal of the name applies
    /// ([`Reconciler::peer_remade`]; seed 290,319: our file `b` aside for its `mkdir b`, then
    /// its exchange of `a` and `b`, carried out as renames, took `b` → `a` for a rename of a
    /// name we removed and lost its directory and file).
    pub fn moved_aside_for_peer(&mut self, path: &[u8]) {
        self.notes_dirty |= self.peer_remade.insert(path.to_vec());
        while self.peer_remade.len() > self.cfg.entries_max {
            self.peer_remade.pop_first();
        }
    }

    /// We removed `path` after the peer's record that considered ours through `seen`.
    fn removed_concurrently(&self, path: &[u8], seen: u64) -> bool {
        match self.removed.get(&(self.hash)(path)) {
            Some(&s) => s > seen,
            None => seen < self.removed_floor,
        }
    }

    /// Our data record `seq` for `object` (a local write, truncate or fallocate; `rewrite` for
    /// the records of a resolution rewrite). Records at or below the watermark are ignored (the
    /// replay after a restart starts after it anyway).
    pub fn local(&mut self, seq: u64, object: Object, rewrite: bool) {
        self.note_local(seq, object, None, rewrite);
    }

    /// [`Reconciler::local`] of the file `path`: the entry also follows a rename of a
    /// directory above it (ours or the peer's applied here, [`Reconciler::moved`]).
    pub fn local_path(&mut self, seq: u64, path: &[u8], rewrite: bool) {
        self.note_local(seq, (self.hash)(path), Some(path.to_vec()), rewrite);
    }

    fn note_local(&mut self, seq: u64, object: Object, path: Option<Vec<u8>>, rewrite: bool) {
        if seq <= self.seen {
            return;
        }
        let old = self.take_entry(object);
        let file = old.as_ref().and_then(|e| e.file);
        let path = path.or_else(|| old.and_then(|e| e.path));
        self.put_entry(
            object,
            Entry {
                seq,
                data: seq,
                path,
                rewrite,
                copied: false,
                file,
            },
        );
        self.bound_entries();
    }

    /// Past `entries_max`, the oldest entries are dropped and the floor rises.
    fn bound_entries(&mut self) {
        while self.entries.len() > self.cfg.entries_max {
            let Some(&(s, o)) = self.by_seq.first() else {
                break;
            };
            if self.take_entry(o).is_none() {
                self.by_seq.remove(&(s, o));
            }
            self.floor = self.floor.max(s);
        }
    }

    /// The peer's record for `object` (`None`: not a data change, only moves the watermark),
    /// journaled there after it had considered our records through `seen`.
    pub fn peer_record(&mut self, object: Option<Object>, seen: u64) -> Decision {
        self.peer_data_record(object, seen, false)
    }

    /// [`Reconciler::peer_record`]; `translated`: the peer named the file by a name we renamed
    /// it from since (only our data changes of it count, not the rename).
    pub fn peer_data_record(
        &mut self,
        object: Option<Object>,
        seen: u64,
        translated: bool,
    ) -> Decision {
        self.advance(seen);
        let Some(object) = object else {
            return Decision::Apply;
        };
        if !translated && self.reused_since(object, seen) {
            // The old entry's change (a record that named our file by the name we renamed it
            // from is about our file, not the old entry of its new name): the peer brings it
            // back as a conflict copy (`first`: the
            // first such record, listed when the copy arrives).
            let listed = self
                .reused
                .get_mut(&object)
                .map(|r| std::mem::replace(&mut r.1, true));
            // Listed now: kept in the notes, so that a restart does not list it again.
            self.notes_dirty |= listed == Some(false);
            return Decision::Skip {
                rewrite: false,
                first: listed == Some(false),
            };
        }
        let wins = self.cfg.wins();
        let Some(entry) = self.concurrent(object, seen) else {
            return Decision::Apply;
        };
        if translated && entry.data <= seen {
            return Decision::Apply;
        }
        if wins {
            let first = !entry.rewrite && !entry.copied;
            // `copied` marks "this conflict is already counted" on the winner, `rewrite` that
            // its rewrite is asked (its records follow through `local`): one per conflict.
            let rewrite = !entry.rewrite;
            entry.copied = true;
            entry.rewrite = true;
            Decision::Skip { rewrite, first }
        } else if entry.copied {
            Decision::Apply
        } else {
            entry.copied = true;
            Decision::CopyThenApply
        }
    }

    /// The peer's removal (unlink) of `object`, journaled after it had considered our records
    /// through `seen`. Concurrent with our change of it: the change wins at both sites, whichever
    /// site removed it (`Restore`).
    pub fn peer_remove(&mut self, object: Object, seen: u64) -> Decision {
        self.advance(seen);
        let Some(entry) = self.concurrent(object, seen) else {
            return Decision::Apply;
        };
        let first = !entry.copied && !entry.rewrite;
        entry.copied = true;
        entry.rewrite = true;
        Decision::Restore { first }
    }

    /// The copy aside or the rewrite the machine asked for `object` could not be made (the
    /// volume refused it: the peer's record is not acknowledged and comes again): ask again
    /// when it does.
    pub fn retry(&mut self, object: Object) {
        if let Some(e) = self.entries.get_mut(&object) {
            e.copied = false;
            e.rewrite = false;
        }
    }

    /// Our entry for `object` if a peer record that considered ours through `seen` is
    /// concurrent with it.
    fn concurrent(&mut self, object: Object, seen: u64) -> Option<&mut Entry> {
        let floor = self.floor;
        if !self.entries.contains_key(&object) {
            // Perhaps dropped for room: concurrent if the peer had not seen the floor.
            if seen >= floor {
                return None;
            }
            self.put_entry(
                object,
                Entry {
                    seq: floor,
                    data: floor,
                    path: None,
                    rewrite: false,
                    copied: false,
                    file: None,
                },
            );
        }
        self.entries.get_mut(&object)
    }

    /// The peer considered our records through `seen`: forget what it saw.
    fn advance(&mut self, seen: u64) {
        if seen <= self.seen {
            return;
        }
        self.seen = seen;
        let next = seen.saturating_add(1);
        let keep = self.by_seq.split_off(&(next, 0));
        for (_, o) in std::mem::replace(&mut self.by_seq, keep) {
            let Some(e) = self.entries.remove(&o) else {
                continue;
            };
            self.unfile(o, e.file);
            if let Some(p) = e.path {
                if self.paths.get(&p) == Some(&o) {
                    self.paths.remove(&p);
                }
            }
        }
        self.renames = self.renames.split_off(&(next, 0));
        if self.renames.is_empty() && !self.followed.is_empty() {
            self.followed.clear();
            self.notes_dirty = true;
        }
        let before = self.renames_followed.len();
        let renames = &self.renames;
        self.renames_followed.retain(|k| renames.contains_key(k));
        self.notes_dirty |= self.renames_followed.len() != before;
        if self.renames.is_empty() && !(self.fresh.is_empty() && self.ghosts.is_empty()) {
            self.fresh.clear();
            self.ghosts.clear();
            self.notes_dirty = true;
        }
        let keep = self.removed_by_seq.split_off(&(next, 0));
        for (_, o) in std::mem::replace(&mut self.removed_by_seq, keep) {
            self.removed.remove(&o);
        }
        let before = self.unlinked.len();
        self.unlinked.retain(|_, &mut (s, _)| s > seen);
        self.notes_dirty |= self.unlinked.len() != before;
        if self.removed.is_empty() && self.seen >= self.removed_floor && !self.remade.is_empty() {
            self.remade.clear();
            self.notes_dirty = true;
        }
        let keep = self.dirs_made_by_seq.split_off(&(next, Vec::new()));
        for (_, p) in std::mem::replace(&mut self.dirs_made_by_seq, keep) {
            self.dirs_made.remove(&p);
        }
        let keep = self.meta_by_seq.split_off(&(next, 0, 0));
        for (_, o, a) in std::mem::replace(&mut self.meta_by_seq, keep) {
            if let Some(m) = self.meta.remove(&(o, a)) {
                self.meta_unfile(o, a, m.file);
            }
        }
        self.forget_reuses(seen);
        if !self.peer_remade.is_empty() {
            let (hash, removed) = (self.hash, &self.removed);
            let before = self.peer_remade.len();
            self.peer_remade.retain(|p| removed.contains_key(&hash(p)));
            self.notes_dirty |= self.peer_remade.len() != before;
        }
        self.forget_names_made(seen);
    }

    /// The peer considered ours through `seen`: our makings it saw are no reuse to it any more,
    /// and a restore it saw is no longer concurrent with its makings.
    fn forget_reuses(&mut self, seen: u64) {
        let mut listed_dropped = false;
        self.reused.retain(|_, (c, listed)| {
            let keep = *c > seen;
            listed_dropped |= !keep && *listed;
            keep
        });
        self.notes_dirty |= listed_dropped;
        if !self.restored.is_empty() {
            let (hash, entries) = (self.hash, &self.entries);
            let before = self.restored.len();
            self.restored.retain(|p| entries.contains_key(&hash(p)));
            self.notes_dirty |= self.restored.len() != before;
        }
    }

    /// The names noted by the peer's records (`fresh`, `regained`, `remade`, `ghosts`,
    /// `restored`, `held`, `peer_remade`, the listed `reused`) and our removed names, encoded
    /// with a checksum ([`Reconciler::restore_notes`]), if they changed since the last call
    /// (`None`: unchanged). The shell makes them durable before the peer's records that noted
    /// them are acknowledged (`STATE/peer-applied`): the journal holds those records but not
    /// the peer's `seen` of each, so they cannot be decided again at the mount.
    pub fn take_notes(&mut self) -> Option<Vec<u8>> {
        if !std::mem::take(&mut self.notes_dirty) {
            return None;
        }
        let mut b = Vec::new();
        b.extend_from_slice(&NOTES_MAGIC);
        for set in [
            &self.fresh,
            &self.regained,
            &self.remade,
            &self.removed_names,
        ] {
            b.extend_from_slice(&(set.len() as u32).to_le_bytes());
            for p in set {
                put_name(&mut b, p);
            }
        }
        b.extend_from_slice(&(self.ghosts.len() as u32).to_le_bytes());
        for (p, (q, seen)) in &self.ghosts {
            put_name(&mut b, p);
            put_name(&mut b, q);
            b.extend_from_slice(&seen.to_le_bytes());
        }
        // Since the name-reuse rule: the restored names, a list after the ghosts; then the held
        // names, laid out as the ghosts (a file written before either ends before it, and
        // decodes with none).
        b.extend_from_slice(&(self.restored.len() as u32).to_le_bytes());
        for p in &self.restored {
            put_name(&mut b, p);
        }
        b.extend_from_slice(&(self.held.len() as u32).to_le_bytes());
        for (p, (q, made)) in &self.held {
            put_name(&mut b, p);
            put_name(&mut b, q);
            b.extend_from_slice(&made.to_le_bytes());
        }
        // Since the restart rules: the names the peer made again after our removal
        // (`peer_remade`), then the reuses listed or skipped for an entry clash (`reused`
        // entries already listed: object, the seq of our making), the replay rebuilding only
        // the others (a file written before them ends before them, and decodes with none).
        b.extend_from_slice(&(self.peer_remade.len() as u32).to_le_bytes());
        for p in &self.peer_remade {
            put_name(&mut b, p);
        }
        let listed: Vec<_> = self.reused.iter().filter(|(_, r)| r.1).collect();
        b.extend_from_slice(&(listed.len() as u32).to_le_bytes());
        for (o, (made, _)) in listed {
            b.extend_from_slice(&o.to_le_bytes());
            b.extend_from_slice(&made.to_le_bytes());
        }
        // Since the exchange's progress was kept: a count (0 or 1), then the peer's record seq
        // and the steps done (a file written before it ends before it, and decodes with none).
        match self.exchange {
            Some((seq, done)) => {
                b.extend_from_slice(&1u32.to_le_bytes());
                b.extend_from_slice(&seq.to_le_bytes());
                b.push(done);
            }
            None => b.extend_from_slice(&0u32.to_le_bytes()),
        }
        // Since `followed` was kept: its names, then our renames a peer rename moved (seq, n,
        // exchange, from, to, current_after), as they are now (a file written before it ends
        // before them).
        b.extend_from_slice(&(self.followed.len() as u32).to_le_bytes());
        for p in &self.followed {
            put_name(&mut b, p);
        }
        let moved: Vec<_> = self
            .renames_followed
            .iter()
            .filter_map(|k| self.renames.get(k).map(|m| (k, m)))
            .collect();
        b.extend_from_slice(&(moved.len() as u32).to_le_bytes());
        let moved_here: Vec<_> = moved
            .iter()
            .filter_map(|(k, m)| m.here.as_ref().map(|h| (**k, h)))
            .collect();
        for ((seq, n), m) in moved {
            b.extend_from_slice(&seq.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            b.push(u8::from(m.exchange));
            put_name(&mut b, &m.from);
            put_name(&mut b, &m.to);
            b.extend_from_slice(&m.current_after.to_le_bytes());
        }
        // Since the unlinked entries' files were kept: object, the unlink's seq, the file (a
        // file written before it ends before them).
        b.extend_from_slice(&(self.unlinked.len() as u32).to_le_bytes());
        for (o, (seq, f)) in &self.unlinked {
            b.extend_from_slice(&o.to_le_bytes());
            b.extend_from_slice(&seq.to_le_bytes());
            b.extend_from_slice(&f.to_le_bytes());
        }
        // Since an exchange's ends were kept under two names: per moved rename above whose
        // ends are named otherwise here ([`Moved::here`]), its seq, its alias number and the
        // two names here (a file written before it ends before them: the names here are the
        // peer's).
        b.extend_from_slice(&(moved_here.len() as u32).to_le_bytes());
        for ((seq, n), (f, t)) in moved_here {
            b.extend_from_slice(&seq.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            put_name(&mut b, f);
            put_name(&mut b, t);
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        Some(b)
    }

    /// The notes of [`Reconciler::take_notes`] again (at the mount, before the journal's replay):
    /// `false` (nothing restored) when `bytes` are damaged.
    pub fn restore_notes(&mut self, bytes: &[u8]) -> bool {
        let Some(notes) = Notes::decode(bytes) else {
            return false;
        };
        let max = self.cfg.entries_max;
        let sets = [
            &mut self.fresh,
            &mut self.regained,
            &mut self.remade,
            &mut self.removed_names,
        ];
        for (set, names) in sets.into_iter().zip(notes.sets) {
            set.extend(names);
            while set.len() > max {
                set.pop_first();
            }
        }
        self.ghosts.extend(notes.ghosts);
        while self.ghosts.len() > max {
            self.ghosts.pop_first();
        }
        self.restored.extend(notes.restored);
        while self.restored.len() > max {
            self.restored.pop_first();
        }
        self.held.extend(notes.held);
        while self.held.len() > max {
            self.held.pop_first();
        }
        self.peer_remade.extend(notes.peer_remade);
        while self.peer_remade.len() > max {
            self.peer_remade.pop_first();
        }
        self.reused
            .extend(notes.listed.into_iter().map(|(o, made)| (o, (made, true))));
        self.bound_reused();
        if notes.exchange.is_some() {
            self.exchange = notes.exchange;
        }
        for (k, m) in notes.renames_followed {
            // Seen by the peer since: forgotten, as `advance` does.
            if k.0 > self.seen && self.renames.len() < max {
                self.renames.insert(k, m);
                self.renames_followed.insert(k);
            }
        }
        for (k, h) in notes.here {
            if let Some(m) = self.renames.get_mut(&k).filter(|m| m.exchange) {
                m.here = Some(h);
            }
        }
        if !self.renames.is_empty() {
            self.followed.extend(notes.followed);
        }
        self.bound_followed();
        // Seen by the peer since: forgotten (the replay rebuilds no entry for them).
        self.unlinked.extend(
            notes
                .unlinked
                .into_iter()
                .filter(|(_, (s, _))| *s > self.seen),
        );
        while self.unlinked.len() > max {
            self.unlinked.pop_first();
        }
        true
    }

    /// The largest of our seqs the peer has considered (the journal keeps every record after it
    /// for the replay after a restart).
    pub fn seen_by_peer(&self) -> u64 {
        self.seen
    }

    /// Objects remembered now (data changes; [`Reconciler::names_len`] for the others).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Renames, removals and metadata changes remembered now.
    pub fn names_len(&self) -> usize {
        self.renames.len() + self.removed.len() + self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A directory the peer gave a name during the split that we gave a directory of ours too
/// ([`Reconciler::peer_dir_clash`]; a directory against a file or symlink: the directory stays,
/// [`clash_moves_ours_aside`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirClash {
    /// Ours was not made during the split, or the peer had seen its making: no clash (a
    /// mkdir fails as existing, as before).
    Apart,
    /// We are the lower id: ours stays at the name. Apply the peer's making under a free
    /// holding name (its directory's contents follow it there), then
    /// [`Reconciler::hold`] with `made`; the peer moves its directory aside to a conflict name
    /// when our making reaches it, and that rename moves the held directory here.
    Ours { made: u64 },
    /// We are the higher id: our directory goes aside with its contents (a local rename to a
    /// conflict name, journaled, listed), then [`Reconciler::yielded`], then the peer's making
    /// is applied.
    Theirs,
}

/// Directories given one new name at both sites (the helpers of [`DirClash`]).
impl Reconciler {
    /// Our mkdir `seq` of `p`.
    fn note_dir_made(&mut self, seq: u64, p: &[u8]) {
        if let Some(old) = self.dirs_made.insert(p.to_vec(), seq) {
            self.dirs_made_by_seq.remove(&(old, p.to_vec()));
        }
        self.dirs_made_by_seq.insert((seq, p.to_vec()));
        while self.dirs_made.len() > self.cfg.entries_max {
            let Some((_, q)) = self.dirs_made_by_seq.pop_first() else {
                break;
            };
            self.dirs_made.remove(&q);
        }
    }

    /// Our directories made at or beneath `p` are gone from there (renamed or removed; a
    /// rename's new name is an entry of its own, [`Reconciler::note_made`]).
    fn unmake_dirs(&mut self, p: &[u8]) {
        let gone: Vec<Vec<u8>> = self
            .dirs_made
            .range(p.to_vec()..)
            .take_while(|(q, _)| q.starts_with(p))
            .filter(|(q, _)| moved_path(q, p, p).is_some())
            .map(|(q, _)| q.clone())
            .collect();
        for q in gone {
            if let Some(seq) = self.dirs_made.remove(&q) {
                self.dirs_made_by_seq.remove(&(seq, q));
            }
        }
    }

    /// The peer made a directory at `theirs` (its name; `ours`: ours for it, as translated:
    /// its mkdir, or its rename of a directory), journaled after it had considered our records
    /// through `seen`, where we have a directory: did we give it the name concurrently (our
    /// mkdir, or our rename of a directory onto it, the peer had not seen), and whose stays?
    /// A mkdir that is the peer making our renamed directory again
    /// ([`Reconciler::translate_new`]) is no clash.
    pub fn peer_dir_clash(&mut self, theirs: &[u8], ours: &[u8], seen: u64) -> DirClash {
        self.advance(seen);
        if self
            .ghosts
            .get(theirs)
            .is_some_and(|(o, removal)| o == ours && seen > *removal)
        {
            return DirClash::Apart;
        }
        let mkdir = self.dirs_made.get(ours).copied().filter(|&s| s > seen);
        let renamed = self
            .entries
            .get(&(self.hash)(ours))
            .filter(|e| e.seq > seen && e.path.as_deref() == Some(ours))
            .map(|e| e.seq);
        match mkdir.max(renamed) {
            None => DirClash::Apart,
            Some(made) if self.cfg.wins() => DirClash::Ours { made },
            Some(_) => DirClash::Theirs,
        }
    }

    /// The peer's rename `theirs_from` → `theirs_to` (its names) applied here as `from` →
    /// `to` (ours): [`Reconciler::moved`], and our unseen renames of names at or beneath it
    /// follow it: a source (the peer's name for the file we renamed) takes the peer's new
    /// name, and a new name of ours still current takes ours. So a peer record naming a file
    /// we renamed out of (or into) a directory the peer renamed is translated to where the
    /// file is now (renames at both sites of a directory and of a name in it).
    pub fn peer_renamed(
        &mut self,
        theirs_from: &[u8],
        theirs_to: &[u8],
        from: &[u8],
        to: &[u8],
        exchange: bool,
    ) {
        self.moved(from, to, exchange);
        self.held_renamed((theirs_from, theirs_to), (from, to), exchange);
        if exchange || from == to || self.renames.is_empty() {
            return;
        }
        let keys: Vec<(u64, u32)> = self.renames.keys().copied().collect();
        // Our renames so far came before this peer rename: a new name of ours it moves is
        // current after all of them (our `mkdir e`, then `d/x` → `d/y`, then `e` aside for the
        // peer's `d` → `e`: `d/y` becomes `e/y`, not moved again by the aside).
        let last = keys.last().map_or(0, |k| k.0);
        // The peer's source as named where each rename of ours comes: through our renames
        // before it only (one reached through this one is the other end's here), as they were
        // before this peer rename (the loop below moves their ends).
        let sources_at: Vec<Vec<u8>> = keys
            .iter()
            .scan(theirs_from.to_vec(), |cur, k| {
                let at = cur.clone();
                if let Some(next) = self.renames.get(k).and_then(|m| m.apply(cur)) {
                    *cur = next;
                }
                Some(at)
            })
            .collect();
        for (i, k) in keys.iter().enumerate() {
            // A name of ours no later rename of ours moves: where the entry is now.
            let current_name = |name: &[u8]| {
                !keys[i + 1..].iter().any(|k2| {
                    self.renames.get(k2).is_some_and(|m2| {
                        renamed_path(name, &m2.from, &m2.to, m2.exchange).is_some()
                    })
                })
            };
            let Some(m) = self.renames.get(k) else {
                continue;
            };
            let source_at = &sources_at[i];
            let current = current_name(&m.to);
            // An exchange's ends as named here.
            let ends_current = match &m.here {
                Some((f, t)) => [current_name(f), current_name(t)],
                None => [current_name(&m.from), current],
            };
            let Some(m) = self.renames.get_mut(k) else {
                continue;
            };
            if m.exchange {
                // Both names of our exchange are a source (the peer's name for the entry it
                // had there) and a new name (ours for the other entry): each follows the
                // peer's rename of a directory above it, the source to the peer's new name and
                // the new name, while current, to ours. They differ where the peer's directory
                // is held here under another name (its `d` → `e` applied as `d` →
                // `e.conflict` for our `e`): its write of `e/x` is of our `e.conflict/y`.
                let (mut from_here, mut to_here) = m
                    .here
                    .take()
                    .unwrap_or_else(|| (m.from.clone(), m.to.clone()));
                let mut ours_moved = false;
                let all_current = ends_current[0] && ends_current[1];
                // Our name for the peer's source counts only where it is the source's name at
                // this rename: `from` reached through this exchange is the other end's entry
                // here (seed 123,526: our `d/x` ⇄ `a`, the peer's `a` → `b` applied as `d/x` →
                // `b`; the end `d/x` is still the peer's `d/x`).
                // The peer's own name only where our renames before this one left it in place:
                // else that name, here, is another entry's (seed 388,136: our `d/x` ⇄ `a`
                // twice, the peer's `d/x` → hidden; the second exchange's end `d/x` is the
                // entry our first put there, `a`'s, which the peer did not move).
                let unmoved = source_at.as_slice() == theirs_from;
                let sources = [&m.from, &m.to].map(|end| {
                    moved_path(end, theirs_from, theirs_to)
                        .filter(|_| unmoved)
                        .or_else(|| {
                            moved_path(end, source_at, to)
                                .filter(|_| current && source_at.as_slice() == from)
                        })
                });
                let ends = [(&mut m.from, &mut from_here), (&mut m.to, &mut to_here)];
                for (i, ((end, here), end_current)) in
                    ends.into_iter().zip(ends_current).enumerate()
                {
                    let source = sources[i].clone();
                    let ours = moved_path(here, from, to).filter(|_| end_current);
                    ours_moved |= ours.is_some();
                    // An end's name here holds the other end's entry. Current: where it is
                    // here, moved or not by this rename. Not current (a later rename of ours
                    // moves it): the name the next one's source is known by, moved as a source
                    // is, when the peer's rename moved that entry (a directory above both);
                    // else it stays (seed 655,646: the peer's `d/x` ⇄ `a` carried out as
                    // renames against our `d/x` ⇄ `a`, `d` ⇄ `a`).
                    let new_here = if end_current {
                        ours
                    } else {
                        sources[1 - i]
                            .as_ref()
                            .and_then(|_| moved_path(here, theirs_from, theirs_to))
                    };
                    if let Some(e) = source {
                        self.followed.insert(e.clone());
                        *end = e;
                        self.renames_followed.insert(*k);
                        self.notes_dirty = true;
                    }
                    if let Some(h) = new_here {
                        *here = h;
                        self.renames_followed.insert(*k);
                        self.notes_dirty = true;
                    }
                }
                if ours_moved && all_current {
                    // Our renames before this peer rename do not move the entries again.
                    m.current_after = last;
                }
                m.here = (from_here != m.from || to_here != m.to).then_some((from_here, to_here));
                continue;
            }
            if let Some(f) = moved_path(&m.from, theirs_from, theirs_to) {
                m.from = f.clone();
                self.followed.insert(f);
                self.renames_followed.insert(*k);
                self.notes_dirty = true;
            }
            if current {
                if let Some(t) = moved_path(&m.to, from, to) {
                    m.to = t;
                    self.renames_followed.insert(*k);
                    self.notes_dirty = true;
                    m.current_after = last;
                }
            } else if let Some(t) = moved_path(&m.to, theirs_from, theirs_to) {
                // A later rename of ours moves it on (`d/a` → `d/b`, `d/b` → `d/c`): the name
                // that one's source now has, so that a peer name goes through both.
                m.to = t;
                self.renames_followed.insert(*k);
                self.notes_dirty = true;
            }
        }
        self.bound_followed();
    }

    /// The peer moved the entry it names `from` (its names) to `to`, where our rename `k` had
    /// moved it too ([`Reconciler::peer_rename`], the same new name at both sites): if `k` is
    /// an exchange, its end that was the peer's name for that entry is now `to`, the peer's
    /// new name for it, and still ends where the entry is here. Otherwise the peer's old name,
    /// which after its rename names another entry (its exchange carried out as renames: `a` →
    /// hidden, `d/x` → `a`, hidden → `d/x`, against our own exchange of `a` and `d/x`), would
    /// still be taken for this one (seed 122,239: its write of `d/x` went to our `a`).
    fn exchange_end_renamed(&mut self, k: (u64, u32), from: &[u8], to: &[u8]) {
        let cur = self
            .renames
            .range(..k)
            .fold(from.to_vec(), |cur, (_, m)| m.apply(&cur).unwrap_or(cur));
        let Some(m) = self.renames.get_mut(&k) else {
            return;
        };
        if !m.exchange {
            return;
        }
        let (from_here, to_here) = m
            .here
            .take()
            .unwrap_or_else(|| (m.from.clone(), m.to.clone()));
        if m.from == cur {
            m.from = to.to_vec();
        } else if m.to == cur {
            m.to = to.to_vec();
        }
        m.here = (from_here != m.from || to_here != m.to).then_some((from_here, to_here));
        self.renames_followed.insert(k);
        self.notes_dirty = true;
    }

    /// `followed` bounded by `entries_max` (the first names dropped: past it a peer record
    /// beneath a dropped one is not translated, as before this index).
    fn bound_followed(&mut self) {
        while self.followed.len() > self.cfg.entries_max {
            self.followed.pop_first();
        }
    }

    /// Our first unseen rename of the entry the peer names `from` (its name followed through
    /// our renames before it: the file, or its directory, renamed by us first): both sites
    /// renamed it.
    fn our_rename_of(&self, from: &[u8]) -> Option<(u64, u32)> {
        let mut cur = from.to_vec();
        for (&k, m) in &self.renames {
            if m.from == cur || (m.exchange && m.to == cur) {
                return Some(k);
            }
            if let Some(next) = m.apply(&cur) {
                cur = next;
            }
        }
        None
    }

    /// `path` is at or beneath a source of ours a peer rename moved ([`Reconciler::followed`]).
    fn follows(&self, path: &[u8]) -> bool {
        self.followed
            .iter()
            .any(|f| moved_path(path, f, f).is_some())
    }

    /// [`DirClash::Ours`]: the peer's directory `theirs` (its name) is held here under `ours`
    /// until the peer moves it aside.
    pub fn hold(&mut self, theirs: &[u8], ours: &[u8], made: u64) {
        self.held.insert(theirs.to_vec(), (ours.to_vec(), made));
        self.notes_dirty = true;
        while self.held.len() > self.cfg.entries_max {
            self.held.pop_first();
        }
    }

    /// The name the peer's directory `theirs` (its name) is held under here, while it is
    /// ([`Reconciler::hold`]): the source here of the peer's rename that ends the hold.
    pub fn held_as(&self, theirs: &[u8]) -> Option<&[u8]> {
        self.held.get(theirs).map(|(ours, _)| ours.as_slice())
    }

    /// [`DirClash::Theirs`]: we moved our directory `name` aside; the peer's later records
    /// for the name are for its directory, never translated through that rename.
    pub fn yielded(&mut self, name: &[u8]) {
        self.notes_dirty |= self.fresh.insert(name.to_vec());
        while self.fresh.len() > self.cfg.entries_max {
            self.fresh.pop_first();
        }
    }

    /// The peer's `path` at or beneath a held name, journaled before it considered our
    /// making of the name: beneath the holding name.
    fn held_path(&self, path: &[u8], seen: u64) -> Option<Vec<u8>> {
        if self.held.is_empty() {
            return None;
        }
        let ends = path
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'/')
            .map(|(i, _)| i)
            .chain([path.len()]);
        for i in ends {
            if let Some((ours, made)) = self.held.get(&path[..i]) {
                if seen < *made {
                    return moved_path(path, &path[..i], ours);
                }
            }
        }
        None
    }

    /// The peer's rmdir of a held name (journaled before it considered our making): the
    /// holding name. The hold stays ([`Reconciler::peer_rmdir_done`] ends it).
    fn held_removal(&self, path: &[u8], seen: u64) -> Option<Vec<u8>> {
        let (ours, made) = self.held.get(path)?;
        (seen < *made).then(|| ours.clone())
    }

    /// The peer's rmdir of `path` (its name), journaled after it had considered our records
    /// through `seen`, is done here (applied, or failed and journaled with its abort): a hold
    /// of the name ([`Reconciler::hold`]) ends, since the peer's directory is gone there and
    /// its later records of the name are for a new entry. Not in [`Reconciler::translate_removal`]:
    /// ended there, a second translation of the same record (the shell's reuse window, then
    /// `apply`, then again under the order lock) named the peer's name, so its rmdir removed
    /// our directory of the name (or failed on it) and left the holding name at this site only
    /// (`names::a_peer_rmdir_of_a_held_directory_removes_the_holding_name`).
    pub fn peer_rmdir_done(&mut self, path: &[u8], seen: u64) {
        if self.held_removal(path, seen).is_some() {
            self.held.remove(path);
            self.notes_dirty = true;
        }
    }

    /// The peer's rename `theirs_from` → `theirs_to` applied here as `from` → `to`: the held
    /// names beneath it (the peer's, and the holding names here) follow it, so that the peer's
    /// later unlink or rename of its held file under its new name finds the hold (seed
    /// 785,741: its `d/x` → `d/y` onto our `mkdir d/y`, held as `d/y.held`, then its `d` → `e`
    /// and its unlink of `e/y` moving the file aside, which left `e/y.held` here).
    fn held_renamed(
        &mut self,
        (theirs_from, theirs_to): (&[u8], &[u8]),
        (from, to): (&[u8], &[u8]),
        exchange: bool,
    ) {
        if self.held.is_empty() || theirs_from == theirs_to {
            return;
        }
        let held = std::mem::take(&mut self.held);
        for (theirs, (ours, made)) in held {
            let theirs = renamed_path(&theirs, theirs_from, theirs_to, exchange).unwrap_or(theirs);
            let ours = renamed_path(&ours, from, to, exchange).unwrap_or(ours);
            self.held.insert(theirs, (ours, made));
        }
        self.notes_dirty = true;
    }

    /// The peer's rename of a held name: its directory moved aside (or away): the holding
    /// name is the source here, and the hold ends.
    fn end_hold_by_rename(&mut self, from: &[u8]) -> Option<Vec<u8>> {
        let (ours, _) = self.held.remove(from)?;
        self.notes_dirty = true;
        Some(ours)
    }
}

const NOTES_MAGIC: [u8; 8] = *b"MFRNOTE1";

fn put_name(b: &mut Vec<u8>, p: &[u8]) {
    b.extend_from_slice(&(p.len() as u32).to_le_bytes());
    b.extend_from_slice(p);
}

/// A ghost as the notes hold it: the peer's name, (ours, the removal's `seen`).
type Ghost = (Vec<u8>, (Vec<u8>, u64));

/// The decoded notes of [`Reconciler::take_notes`].
struct Notes {
    sets: [Vec<Vec<u8>>; 4],
    ghosts: Vec<Ghost>,
    /// The restored names (absent from notes written before the name-reuse rule).
    restored: Vec<Vec<u8>>,
    /// [`Reconciler::hold`]s, laid out as the ghosts.
    held: Vec<Ghost>,
    /// `peer_remade` (absent from notes written before it was kept).
    peer_remade: Vec<Vec<u8>>,
    /// The `reused` entries already listed (an entry clash's skip): object, our making's seq.
    listed: Vec<(Object, u64)>,
    /// [`Reconciler::exchange_done`]'s progress (absent from notes written before it was kept).
    exchange: Option<(u64, u8)>,
    /// `followed`, and the renames a peer rename moved (absent from notes written before they
    /// were kept).
    followed: Vec<Vec<u8>>,
    renames_followed: Vec<((u64, u32), Moved)>,
    /// `unlinked`: object, the unlink's seq, the file (absent from notes written before it was
    /// kept).
    unlinked: Vec<(Object, (u64, FileId))>,
    /// The names here of the ends of those renames that are exchanges, where they differ from
    /// the peer's ([`Moved::here`]; absent from notes written before they were kept).
    here: Vec<((u64, u32), EndsHere)>,
}

impl Notes {
    fn decode(bytes: &[u8]) -> Option<Notes> {
        let body_len = bytes.len().checked_sub(4)?;
        let (body, crc) = bytes.split_at(body_len);
        if crc32c::crc32c(body).to_le_bytes() != crc || !body.starts_with(&NOTES_MAGIC) {
            return None;
        }
        let mut c = Cursor {
            b: body,
            at: NOTES_MAGIC.len(),
        };
        let mut sets: [Vec<Vec<u8>>; 4] = Default::default();
        for set in &mut sets {
            *set = c.list(Cursor::name)?;
        }
        let ghosts = c.list(|c| Some((c.name()?, (c.name()?, c.u64()?))))?;
        // The sections after the ghosts were added one at a time: notes written before a
        // section was kept end before it.
        let restored = c.optional_list(Cursor::name)?;
        let held = c.optional_list(|c| Some((c.name()?, (c.name()?, c.u64()?))))?;
        let peer_remade = c.optional_list(Cursor::name)?;
        let listed = c.optional_list(|c| Some((c.u64()?, c.u64()?)))?;
        let mut exchange = None;
        if c.at != body.len() {
            match c.u32()? {
                0 => {}
                1 => {
                    let seq = c.u64()?;
                    let done = *c.take(1)?.first()?;
                    if !(1..=3).contains(&done) {
                        return None;
                    }
                    exchange = Some((seq, done));
                }
                _ => return None,
            }
        }
        let followed = c.optional_list(Cursor::name)?;
        let mut renames_followed = Vec::new();
        if c.at != body.len() {
            for _ in 0..c.u32()? {
                let seq = c.u64()?;
                let n = c.u32()?;
                let exchange = match *c.take(1)?.first()? {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                let from = c.name()?;
                let to = c.name()?;
                let current_after = c.u64()?;
                renames_followed.push((
                    (seq, n),
                    Moved {
                        from,
                        to,
                        exchange,
                        current_after,
                        here: None,
                    },
                ));
            }
        }
        let unlinked = c.optional_list(|c| Some((c.u64()?, (c.u64()?, c.u64()?))))?;
        let here = c.optional_list(|c| Some(((c.u64()?, c.u32()?), (c.name()?, c.name()?))))?;
        if c.at != body.len() {
            return None;
        }
        Some(Notes {
            sets,
            ghosts,
            restored,
            held,
            peer_remade,
            listed,
            exchange,
            followed,
            renames_followed,
            unlinked,
            here,
        })
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    /// A list: a `u32` count, then each `item` (a count the bytes cannot hold fails at the first
    /// missing item, so memory stays bounded by the file).
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let n = self.u32()?;
        (0..n).map(|_| item(self)).collect()
    }

    /// A [`Cursor::list`], or an empty one when the body ends here.
    fn optional_list<T>(&mut self, item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        if self.at == self.b.len() {
            return Some(Vec::new());
        }
        self.list(item)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn name(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        Some(self.take(n)?.to_vec())
    }
}

/// `path` after a rename of `from` to `to` (`exchange`: both names swap): itself or beneath
/// either name, or `None` when the rename does not touch it.
pub fn renamed_path(path: &[u8], from: &[u8], to: &[u8], exchange: bool) -> Option<Vec<u8>> {
    moved_path(path, from, to).or_else(|| exchange.then(|| moved_path(path, to, from)).flatten())
}

/// `path` moved by a rename of `from` to `to` (itself or beneath it), or `None`.
fn moved_path(path: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    if path == from {
        return Some(to.to_vec());
    }
    let rest = path.strip_prefix(from)?;
    if from.is_empty() || rest.first() != Some(&b'/') {
        return None;
    }
    let mut v = to.to_vec();
    if to.is_empty() {
        v.extend_from_slice(&rest[1..]);
    } else {
        v.extend_from_slice(rest);
    }
    Some(v)
}

/// The default object of a path (FNV-1a; the shell uses its token hash instead).
fn fnv(path: &[u8]) -> Object {
    path.iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        })
        .max(1)
}

/// What a peer's mkdir, create, mknod or symlink of a name does when this site has the name
/// already as another type (both sites created it during the split): the directory stays at
/// the name at both sites; at the site whose entry is not a directory, its entry goes aside
/// to a conflict name first (`true`), then the peer's directory is made. Two non-directories
/// are left to the rules of data changes (`false`).
pub fn clash_moves_ours_aside(ours_is_dir: bool, peers_is_dir: bool) -> bool {
    !ours_is_dir && peers_is_dir
}

/// Hard links: one file with several names is one object to the rule. Objects are names
/// (what both sites agree on); the file behind a name is known only locally, so the shell tells
/// the machine the file of each name it notes a data change of ([`Reconciler::note_file`],
/// under the order lock, once per entry) and of each name a peer data record changes
/// ([`Reconciler::peer_linked_data`]): a peer data record for one name of a file with no entry
/// of its own is concurrent with our unseen data change of the file through another name.
/// Metadata changes likewise, per attribute, at the winner (the only site whose decision
/// compares them: [`Reconciler::note_meta_file`], [`Reconciler::peer_linked_meta`]).
impl Reconciler {
    /// Our entry for `path` (a data change just noted) has not been told its file yet: the
    /// shell looks it up ([`Reconciler::note_file`]).
    pub fn wants_file(&self, path: &[u8]) -> bool {
        self.entries
            .get(&(self.hash)(path))
            .is_some_and(|e| e.file.is_none())
    }

    /// The file our entry for `path` names: `file` when it has more than one name here (its
    /// inode number), 0 when it has one. Nothing without an entry.
    pub fn note_file(&mut self, path: &[u8], file: FileId) {
        let o = (self.hash)(path);
        if let Some(mut e) = self.take_entry(o) {
            e.file = Some(file);
            if file != 0 {
                if let Some(old) = self.files.get(&file).copied().filter(|&x| x != o) {
                    // Two entries of one file (written through two names): the index names the
                    // newer; the older is still found by its own name.
                    if let Some(x) = self.entries.get_mut(&old) {
                        x.file = Some(0);
                    }
                }
            }
            self.put_entry(o, e);
        }
    }

    /// The names of the entries not yet told their file (at most `entries_max`): after the
    /// journal's replay at a restart, the shell looks each up ([`Reconciler::note_file`]).
    pub fn unfiled(&self) -> Vec<Vec<u8>> {
        self.entries
            .values()
            .filter(|e| e.file.is_none())
            .filter_map(|e| e.path.clone())
            .collect()
    }

    /// The peer's data change of `path` (our name for it, `translated` as in
    /// [`Reconciler::peer_data_record`]), a file that has other names here (`file`, its inode;
    /// 0: one name). With no entry of its own, an entry of the same file under another name
    /// decides it, as if the peer had named that one: the decision and that name (the loser
    /// copies its version aside under it, the name it wrote through; the winner rewrites
    /// `path`, the file under all its names). Otherwise as [`Reconciler::peer_data_record`].
    pub fn peer_linked_data(
        &mut self,
        path: &[u8],
        file: FileId,
        seen: u64,
        translated: bool,
    ) -> (Decision, Option<Vec<u8>>) {
        self.advance(seen);
        let object = (self.hash)(path);
        let other = self
            .files
            .get(&file)
            .copied()
            .filter(|&o| file != 0 && o != object)
            .filter(|_| !self.entries.contains_key(&object))
            .filter(|_| translated || !self.reused_since(object, seen));
        if let Some(o) = other {
            if let Some(name) = self.entries.get(&o).map(|e| e.path.clone()) {
                // Only our data changes of the file count (as for a name we renamed it from).
                return (self.peer_data_record(Some(o), seen, true), name);
            }
        }
        (self.peer_data_record(Some(object), seen, translated), None)
    }

    /// Drops `o` from the file index (its entry goes).
    fn unfile(&mut self, o: Object, file: Option<FileId>) {
        if let Some(f) = file.filter(|&f| f != 0) {
            if self.files.get(&f) == Some(&o) {
                self.files.remove(&f);
            }
        }
    }

    /// Files with more than one name remembered now (one per entry at most).
    pub fn files_len(&self) -> usize {
        self.files.len()
    }

    /// Our unseen change of attribute `key` of `path` has not been told its file yet: the
    /// shell looks it up ([`Reconciler::note_meta_file`]). Only at the winner: the loser
    /// applies the winner's metadata changes whatever the name.
    pub fn wants_meta_file(&self, path: &[u8], key: u64) -> bool {
        self.cfg.wins()
            && self
                .meta
                .get(&((self.hash)(path), key))
                .is_some_and(|m| m.file.is_none())
    }

    /// The file behind our unseen change of attribute `key` of `path`: `file` when it has more
    /// than one name here (its inode number), 0 when it has one. Nothing without that change.
    pub fn note_meta_file(&mut self, path: &[u8], key: u64, file: FileId) {
        let o = (self.hash)(path);
        let Some(mut m) = self.meta_remove(o, key) else {
            return;
        };
        m.file = Some(file);
        if file != 0 {
            if let Some(old) = self.meta_files.get(&(file, key)).copied() {
                // The attribute changed through two names of one file: the index names the
                // newer; the older is still found by its own name.
                if let Some(x) = self.meta.get_mut(&(old, key)) {
                    x.file = Some(0);
                }
            }
        }
        self.meta_put((o, key), m);
    }

    /// The names and attributes of our unseen metadata changes not yet told their file (at
    /// most the bound of metadata changes; none at the loser): after the journal's replay at
    /// a restart, the shell looks each up ([`Reconciler::note_meta_file`]).
    pub fn meta_unfiled(&self) -> Vec<(Vec<u8>, u64)> {
        if !self.cfg.wins() {
            return Vec::new();
        }
        self.meta
            .iter()
            .filter(|(_, m)| m.file.is_none())
            .map(|(&(_, key), m)| (m.path.clone(), key))
            .collect()
    }

    /// The peer's metadata change of attribute `key` of `path` (our name for it), a file with
    /// other names here (`file`, its inode; 0: one name), journaled after it had considered
    /// our records through `seen`: `false` when we changed the same attribute of the same file
    /// concurrently and win (ours stays at both sites: the loser applies ours). With no change
    /// of ours through `path`, one through another name of the file decides (hard links are
    /// one object to the rule, as for data: [`Reconciler::peer_linked_data`]).
    pub fn peer_linked_meta(&mut self, path: &[u8], key: u64, file: FileId, seen: u64) -> bool {
        self.advance(seen);
        let object = (self.hash)(path);
        if self.reused_since(object, seen) {
            // The old entry's attribute: not of our new entry of the name.
            return false;
        }
        if !self.cfg.wins() {
            return true;
        }
        if let Some(m) = self.meta.get(&(object, key)) {
            return m.seq <= seen;
        }
        let other = self
            .meta_files
            .get(&(file, key))
            .filter(|_| file != 0)
            .and_then(|o| self.meta.get(&(*o, key)));
        match other {
            Some(m) => m.seq <= seen,
            None => seen >= self.meta_floor,
        }
    }

    /// Metadata changes of files with more than one name remembered now (one per change at
    /// most).
    pub fn meta_files_len(&self) -> usize {
        self.meta_files.len()
    }

    fn meta_put(&mut self, k: (Object, u64), m: MetaEntry) {
        self.meta_by_seq.insert((m.seq, k.0, k.1));
        if let Some(f) = m.file.filter(|&f| f != 0) {
            self.meta_files.insert((f, k.1), k.0);
        }
        self.meta.insert(k, m);
    }

    fn meta_remove(&mut self, o: Object, key: u64) -> Option<MetaEntry> {
        let m = self.meta.remove(&(o, key))?;
        self.meta_by_seq.remove(&(m.seq, o, key));
        self.meta_unfile(o, key, m.file);
        Some(m)
    }

    /// Drops `(o, key)` from the file index (its change goes).
    fn meta_unfile(&mut self, o: Object, key: u64, file: Option<FileId>) {
        if let Some(f) = file.filter(|&f| f != 0) {
            if self.meta_files.get(&(f, key)) == Some(&o) {
                self.meta_files.remove(&(f, key));
            }
        }
    }
}

/// Two different entries given one name during the split, one of them (at least) not a
/// regular file — a symlink, a device node, FIFO or socket — and neither a directory (two
/// regular files are the rules of data changes; a directory against another entry,
/// [`clash_moves_ours_aside`]): the peer makes the name (a create, symlink, mknod or link, or a
/// rename onto it) where we have an entry we gave it concurrently
/// ([`Reconciler::peer_entry_clash`]). The lower id's entry stays at the name at both sites;
/// the higher id's goes to a conflict copy (a symlink with the same target, a node with its
/// type, mode and device number, a file with its content), listed at both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryClash {
    /// Ours was not made during the split, or the peer had seen its making: no clash (the
    /// making fails as existing, or a rename replaces it, as before).
    Apart,
    /// We are the lower id: ours stays. The peer's making is not applied (a rename of it: its
    /// source goes here too, [`Reconciler::peer_rename_onto_dir`] says whether we keep it);
    /// its later records for the name journaled before it considered our making are of its
    /// own entry (its conflict copy brings it) and are skipped
    /// ([`Reconciler::reused_since`]). `first`: a new conflict, listed when the peer's copy
    /// arrives.
    Ours { first: bool },
    /// We are the higher id: our entry goes to a conflict copy (journaled, streamed, listed),
    /// is removed as the peer's record (not streamed back: the peer keeps its own entry at
    /// the name), then [`Reconciler::entry_set_aside`], then the peer's making applies.
    Theirs,
}

/// Entries (not directories) given one name at both sites (the helpers of [`EntryClash`]).
impl Reconciler {
    /// Our making `seq` of the name `p` (not a mkdir).
    fn note_name_made(&mut self, seq: u64, p: &[u8]) {
        if let Some(old) = self.names_made.insert(p.to_vec(), seq) {
            self.names_made_by_seq.remove(&(old, p.to_vec()));
        }
        self.names_made_by_seq.insert((seq, p.to_vec()));
        while self.names_made.len() > self.cfg.entries_max {
            let Some((_, q)) = self.names_made_by_seq.pop_first() else {
                break;
            };
            self.names_made.remove(&q);
        }
    }

    /// Our names made at or beneath `p` are gone (removed, or renamed away).
    fn unmake_name(&mut self, p: &[u8]) {
        let gone: Vec<Vec<u8>> = self
            .names_made
            .range(p.to_vec()..)
            .take_while(|(q, _)| q.starts_with(p))
            .filter(|(q, _)| moved_path(q, p, p).is_some())
            .map(|(q, _)| q.clone())
            .collect();
        for q in gone {
            if let Some(seq) = self.names_made.remove(&q) {
                self.names_made_by_seq.remove(&(seq, q));
            }
        }
    }

    /// Our rename `seq` of `from` onto `to`: `to` is a name we gave an entry (and `from` too
    /// for an exchange); names made beneath a renamed directory keep their seq under its new
    /// name.
    fn name_moved(&mut self, seq: u64, from: &[u8], to: &[u8], exchange: bool) {
        let beneath = |m: &BTreeMap<Vec<u8>, u64>, base: &[u8]| -> Vec<(Vec<u8>, u64)> {
            let mut prefix = base.to_vec();
            prefix.push(b'/');
            m.range(prefix.clone()..)
                .take_while(|(q, _)| q.starts_with(&prefix))
                .map(|(q, s)| (q[base.len()..].to_vec(), *s))
                .collect()
        };
        let src = beneath(&self.names_made, from);
        let dst = if exchange {
            beneath(&self.names_made, to)
        } else {
            Vec::new()
        };
        self.unmake_name(from);
        self.unmake_name(to);
        for (rest, s) in src {
            self.note_name_made(s, &[to, rest.as_slice()].concat());
        }
        for (rest, s) in dst {
            self.note_name_made(s, &[from, rest.as_slice()].concat());
        }
        self.note_name_made(seq, to);
        if exchange {
            self.note_name_made(seq, from);
        }
    }

    /// The peer considered ours through `seen`: the names it saw us make are forgotten.
    fn forget_names_made(&mut self, seen: u64) {
        let keep = self
            .names_made_by_seq
            .split_off(&(seen.saturating_add(1), Vec::new()));
        for (_, p) in std::mem::replace(&mut self.names_made_by_seq, keep) {
            self.names_made.remove(&p);
        }
    }

    /// The peer makes `ours` (our name for its new entry: a create, symlink, mknod or link,
    /// or a rename onto it), journaled after it had considered our records through `seen`,
    /// where we have another entry, neither a directory and not two regular files (the shell
    /// looks; two links to one target are one entry): did we give the name our entry
    /// concurrently, and whose stays? See [`EntryClash`].
    pub fn peer_entry_clash(&mut self, ours: &[u8], seen: u64) -> EntryClash {
        self.advance(seen);
        let Some(&made) = self.names_made.get(ours) else {
            return EntryClash::Apart;
        };
        if made <= seen {
            return EntryClash::Apart;
        }
        let o = (self.hash)(ours);
        if self.cfg.wins() {
            // The peer's records of its own entry under the name, journaled before it saw
            // ours, are not applied to ours (listed once, here).
            let first = self.reused.get(&o).is_none_or(|&(c, _)| c != made);
            self.reused.insert(o, (made, true));
            self.notes_dirty |= first;
            self.bound_reused();
            return EntryClash::Ours { first };
        }
        EntryClash::Theirs
    }

    /// Our entry at `path` went to its conflict copy for the peer's ([`EntryClash::Theirs`]):
    /// what we changed of it went with the copy (the peer's records for the name are not
    /// concurrent with it), and the name is the peer's now.
    pub fn entry_set_aside(&mut self, path: &[u8]) {
        self.take_entry((self.hash)(path));
        if let Some(seq) = self.names_made.remove(path) {
            self.names_made_by_seq.remove(&(seq, path.to_vec()));
        }
    }
}

/// The change points of a site's stream to its peer: "our records from `from` on were journaled
/// after considering the peer's records through `through`" (sent as `Msg::PeerSeen` before the
/// records they cover). Bounded: points before the peer's acknowledged position are dropped
/// except the last of them.
#[derive(Debug, Clone, Default)]
pub struct ChangePoints {
    points: BTreeMap<u64, u64>,
}

/// At most this many points are kept; past it the oldest two merge into the older's (`through`
/// of the older: conservative, it can only make a record look concurrent, never hide one).
pub const POINTS_MAX: usize = 65_536;

impl ChangePoints {
    /// Records from `from` on considered the peer's through `through`.
    pub fn note(&mut self, from: u64, through: u64) {
        if self.seen_at(from) >= through {
            return;
        }
        self.points.insert(from, through);
        while self.points.len() > POINTS_MAX {
            let Some(&second) = self.points.keys().nth(1) else {
                break;
            };
            self.points.remove(&second);
        }
    }

    /// What our record `seq` had considered of the peer's records.
    pub fn seen_at(&self, seq: u64) -> u64 {
        self.points.range(..=seq).next_back().map_or(0, |(_, &t)| t)
    }

    /// The points a batch of records `first..=last` needs: the one in force at `first`, then
    /// each that starts within it.
    pub fn for_batch(&self, first: u64, last: u64) -> Vec<(u64, u64)> {
        let mut v = vec![(first, self.seen_at(first))];
        if last > first {
            v.extend(self.points.range(first + 1..=last).map(|(&f, &t)| (f, t)));
        }
        v
    }

    /// The peer has our records through `seq`: points before it are not needed (the one in
    /// force at `seq + 1` stays).
    pub fn forget_through(&mut self, seq: u64) {
        let at = seq.saturating_add(1);
        let keep_from = self.points.range(..=at).next_back().map(|(&f, _)| f);
        if let Some(k) = keep_from {
            self.points = self.points.split_off(&k);
        }
    }

    /// Where the last point starts (0: none).
    pub fn last_from(&self) -> u64 {
        self.points.keys().next_back().copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// The receiving side's copy of the peer's change points, from its `PeerSeen` messages, asked
/// in stream order.
#[derive(Debug, Clone, Default)]
pub struct PeerPoints {
    points: BTreeMap<u64, u64>,
}

impl PeerPoints {
    /// The peer's records from `from` on considered ours through `through`.
    pub fn note(&mut self, from: u64, through: u64) {
        self.points.insert(from, through);
        if self.points.len() > POINTS_MAX {
            self.points.pop_first();
        }
    }

    /// seen(R) for the peer's record `seq`; the points before it are forgotten (records are
    /// asked in order).
    pub fn seen_at(&mut self, seq: u64) -> u64 {
        let Some((&f, &t)) = self.points.range(..=seq).next_back() else {
            return 0;
        };
        self.points = self.points.split_off(&f);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(me: u64, peer: u64) -> Reconciler {
        Reconciler::new(Config::new(me, peer), 0)
    }

    #[test]
    fn a_peer_record_that_saw_our_write_is_applied() {
        let mut r = site(1, 2);
        r.local(10, 7, false);
        assert_eq!(r.peer_record(Some(7), 10), Decision::Apply);
        assert!(r.is_empty(), "seen: forgotten");
        assert_eq!(r.seen_by_peer(), 10);
        // Later writes of ours are unseen again only when they are newer than the watermark.
        r.local(9, 7, false);
        assert!(r.is_empty());
    }

    #[test]
    fn different_objects_merge() {
        for (me, peer) in [(1, 2), (2, 1)] {
            let mut r = site(me, peer);
            r.local(10, 7, false);
            assert_eq!(r.peer_record(Some(8), 3), Decision::Apply, "site {me}");
            assert_eq!(r.peer_record(None, 4), Decision::Apply);
            assert_eq!(r.len(), 1, "still unseen");
        }
    }

    #[test]
    fn the_winner_skips_concurrent_records_and_rewrites_once() {
        let mut w = site(1, 2);
        w.local(10, 7, false);
        assert_eq!(
            w.peer_record(Some(7), 3),
            Decision::Skip {
                rewrite: true,
                first: true
            }
        );
        // Another concurrent record before the rewrite is journaled: no second rewrite.
        assert_eq!(
            w.peer_record(Some(7), 3),
            Decision::Skip {
                rewrite: false,
                first: false
            }
        );
        // The shell rewrites: records 11, 12 of the rewrite.
        w.local(11, 7, true);
        w.local(12, 7, true);
        // More of the loser's split writes: skipped, no second rewrite, same conflict.
        assert_eq!(
            w.peer_record(Some(7), 3),
            Decision::Skip {
                rewrite: false,
                first: false
            }
        );
        // A loser write made after it applied the rewrite: applied.
        assert_eq!(w.peer_record(Some(7), 12), Decision::Apply);
        // A later local write, then a concurrent one again: a new conflict, a new rewrite.
        w.local(20, 7, false);
        assert_eq!(
            w.peer_record(Some(7), 13),
            Decision::Skip {
                rewrite: true,
                first: true
            }
        );
    }

    #[test]
    fn the_loser_copies_once_then_applies() {
        let mut l = site(2, 1);
        l.local(10, 7, false);
        assert_eq!(l.peer_record(Some(7), 3), Decision::CopyThenApply);
        assert_eq!(l.peer_record(Some(7), 3), Decision::Apply);
        // The winner's rewrite, journaled after it considered our 10: not concurrent.
        assert_eq!(l.peer_record(Some(7), 10), Decision::Apply);
        assert!(l.is_empty());
        // We wrote again before the rewrite came: the rewrite is concurrent, copy again.
        l.local(30, 7, false);
        assert_eq!(l.peer_record(Some(7), 29), Decision::CopyThenApply);
    }

    /// Both orders of arrival end the same way: the winner's version at the path, the loser's
    /// in its copy (simulated with contents as strings).
    #[test]
    fn both_orders_converge_to_the_winners_version_and_the_losers_copy() {
        for winner_first in [true, false] {
            // Site 1 wrote "A" (its seq 5), site 2 wrote "B" (its seq 8); neither saw the other.
            let (mut w, mut l) = (site(1, 2), site(2, 1));
            w.local(5, 7, false);
            l.local(8, 7, false);
            let (at_w, mut at_l) = ("A".to_string(), "B".to_string());
            let mut copy_at_l = None;
            let deliver_to_l = |l: &mut Reconciler,
                                at_l: &mut String,
                                copy: &mut Option<String>,
                                content: &str,
                                seen: u64| {
                match l.peer_record(Some(7), seen) {
                    Decision::CopyThenApply => {
                        *copy = Some(at_l.clone());
                        *at_l = content.to_string();
                    }
                    Decision::Apply => *at_l = content.to_string(),
                    d => panic!("the loser never skips: {d:?}"),
                }
            };
            if winner_first {
                // The winner's diff "A" reaches the loser first.
                deliver_to_l(&mut l, &mut at_l, &mut copy_at_l, "A", 0);
            }
            // The loser's "B" reaches the winner: skipped, rewrite (seq 6, seen 8).
            let rewrite = match w.peer_record(Some(7), 0) {
                Decision::Skip { rewrite: true, .. } => {
                    w.local(6, 7, true);
                    (at_w.clone(), 8)
                }
                d => panic!("{d:?}"),
            };
            // The copy the loser made travels to the winner as a new file.
            if !winner_first {
                deliver_to_l(&mut l, &mut at_l, &mut copy_at_l, "A", 0);
            }
            let (content, seen) = rewrite;
            deliver_to_l(&mut l, &mut at_l, &mut copy_at_l, &content, seen);
            assert_eq!(at_w, "A");
            assert_eq!(at_l, "A", "winner_first={winner_first}");
            assert_eq!(copy_at_l.as_deref(), Some("B"));
        }
    }

    #[test]
    fn a_concurrent_removal_is_undone_at_either_site_and_a_seen_one_applies() {
        for (me, peer) in [(1, 2), (2, 1)] {
            let mut r = site(me, peer);
            r.local(10, 7, false);
            assert_eq!(r.peer_remove(7, 4), Decision::Restore { first: true });
            // The rewrite's records, then a second concurrent removal: the same conflict.
            r.local(11, 7, true);
            assert_eq!(r.peer_remove(7, 4), Decision::Restore { first: false });
            // A removal that saw our writes wins as usual; one of another object too.
            assert_eq!(r.peer_remove(8, 4), Decision::Apply);
            assert_eq!(r.peer_remove(7, 11), Decision::Apply);
        }
    }

    #[test]
    fn a_copy_or_rewrite_that_failed_is_asked_again() {
        let mut l = site(2, 1);
        l.local(10, 7, false);
        assert_eq!(l.peer_record(Some(7), 3), Decision::CopyThenApply);
        l.retry(7);
        assert_eq!(l.peer_record(Some(7), 3), Decision::CopyThenApply);
        let mut w = site(1, 2);
        w.local(10, 7, false);
        assert_eq!(
            w.peer_record(Some(7), 3),
            Decision::Skip {
                rewrite: true,
                first: true
            }
        );
        w.retry(7);
        assert!(matches!(
            w.peer_record(Some(7), 3),
            Decision::Skip { rewrite: true, .. }
        ));
    }

    #[test]
    fn the_index_is_bounded_and_a_dropped_entry_still_counts_as_concurrent() {
        let mut r = Reconciler::new(
            Config {
                entries_max: 2,
                ..Config::new(2, 1)
            },
            0,
        );
        r.local(1, 100, false);
        r.local(2, 200, false);
        r.local(3, 300, false);
        assert_eq!(r.len(), 2);
        // 100 was dropped for room: a peer record that had not seen 1 is taken as concurrent.
        assert_eq!(r.peer_record(Some(100), 0), Decision::CopyThenApply);
        // One that had seen it is not.
        let mut r2 = r.clone();
        assert_eq!(r2.peer_record(Some(200), 1), Decision::CopyThenApply);
        let mut r3 = r.clone();
        assert_eq!(r3.peer_record(Some(400), 1), Decision::Apply);
        // Two objects taken as concurrent through the floor are both forgotten once seen.
        assert_eq!(r.peer_record(Some(500), 0), Decision::CopyThenApply);
        assert_eq!(r.peer_record(None, 3), Decision::Apply);
        assert!(r.is_empty(), "everything seen");
    }

    #[test]
    fn a_restart_rebuilds_the_same_decisions_from_the_journal() {
        // Before the crash: the peer saw through 4; our data records 3 (obj 7), 6 (obj 7), 8 (obj 9).
        let journal = [(3u64, 7u64), (6, 7), (8, 9)];
        let mut before = site(2, 1);
        for (s, o) in journal {
            before.local(s, o, false);
        }
        assert_eq!(before.peer_record(None, 4), Decision::Apply);
        let watermark = before.seen_by_peer();
        // After: the watermark from STATE/peer-applied, the journal's records replayed.
        let mut after = Reconciler::new(Config::new(2, 1), watermark);
        for (s, o) in journal {
            after.local(s, o, false);
        }
        for (obj, seen) in [(7, 5), (9, 5), (7, 6), (9, 9)] {
            assert_eq!(
                before.clone().peer_record(Some(obj), seen),
                after.clone().peer_record(Some(obj), seen),
                "object {obj} seen {seen}"
            );
        }
        assert_eq!(
            after.clone().peer_record(Some(7), 5),
            Decision::CopyThenApply
        );
        assert_eq!(after.peer_record(Some(7), 6), Decision::Apply);
    }

    /// A machine after a restart: the watermark, the notes last taken, our journal replayed.
    fn restarted(before: &mut Reconciler, journal: &[(u64, Local)], notes: bool) -> Reconciler {
        let mut after = Reconciler::new(before.config(), before.seen_by_peer());
        if notes {
            let bytes = before.take_notes().expect("the notes changed");
            assert!(after.restore_notes(&bytes));
        }
        for (seq, c) in journal {
            after.local_change(*seq, c);
        }
        after
    }

    #[test]
    fn a_restart_rebuilds_the_names_the_peers_records_noted() {
        let b = |s: &str| s.as_bytes().to_vec();
        // The removing site: we removed `d` (seq 5); the peer renamed it to `e` having seen
        // through 2. The rename is skipped and `e` noted: a later peer record beneath `e`
        // makes it again.
        let journal = [(5, Local::Removed(b("d")))];
        let mut before = Reconciler::new(Config::new(2, 1), 2);
        before.local_change(5, &journal[0].1);
        assert_eq!(before.peer_rename(b"d", b"e", 2), RenameDecision::Removed);
        for notes in [false, true] {
            let mut after = restarted(&mut before.clone(), &journal, notes);
            let (want, got) = (before.clone().refill(b"e/x", 2), after.refill(b"e/x", 2));
            assert_eq!(want, vec![b("e")]);
            assert_eq!(got == want, notes, "refill of e/x, notes restored: {notes}");
        }

        // The removing site made `d` again for a peer record beneath it: a later rename of it
        // by the peer applies (it is the peer's directory now).
        let mut before = Reconciler::new(Config::new(2, 1), 2);
        before.local_change(5, &journal[0].1);
        assert_eq!(before.refill(b"d/x", 2), vec![b("d")]);
        for notes in [false, true] {
            let mut after = restarted(&mut before.clone(), &journal, notes);
            let want = before.clone().peer_rename(b"d", b"e", 2);
            assert!(matches!(want, RenameDecision::Apply { .. }), "{want:?}");
            assert_eq!(after.peer_rename(b"d", b"e", 2) == want, notes);
        }

        // The renaming site: we renamed `d` to `e` (seq 5); the peer's `rmdir d` (seen 2) is
        // translated and noted; its `Mkdir d` journaled having seen 3 names our `e`.
        let journal = [(
            5,
            Local::Rename {
                from: b("d"),
                to: b("e"),
                exchange: false,
            },
        )];
        let mut before = Reconciler::new(Config::new(1, 2), 2);
        before.local_change(5, &journal[0].1);
        assert_eq!(before.translate_removal(b"d", 2), Some(b("e")));
        for notes in [false, true] {
            let mut after = restarted(&mut before.clone(), &journal, notes);
            let want = before.clone().translate_new(b"d", 3);
            assert_eq!(want, Some(b("e")));
            assert_eq!(after.translate_new(b"d", 3) == want, notes);
        }
    }

    /// Names we removed concurrently that the peer made again (`peer_remade`): after a
    /// restart between the peer's making of the name and its later removal of it, that
    /// removal still applies (the entry there is the peer's), so the name goes at both sites.
    #[test]
    fn a_restart_keeps_the_names_the_peer_made_again_after_our_removal() {
        let b = |s: &str| s.as_bytes().to_vec();
        // We removed `n` (seq 5); the peer, having seen through 2, makes `n` again, then
        // removes it.
        let journal = [(5, Local::Removed(b("n")))];
        let mut before = Reconciler::new(Config::new(2, 1), 2);
        before.local_change(5, &journal[0].1);
        assert_eq!(before.translate_new(b"n", 2), None);
        let want = before.clone().peer_unlink(b"n", 2);
        assert!(
            !matches!(want.1, Decision::Skip { .. }),
            "the peer's entry is removed: {want:?}"
        );
        for notes in [false, true] {
            let mut after = restarted(&mut before.clone(), &journal, notes);
            let got = after.peer_unlink(b"n", 2);
            assert_eq!(got == want, notes, "{got:?}, notes restored: {notes}");
        }
        // The peer saw our removal: the name is forgotten, and with it the note.
        assert!(before.take_notes().is_some());
        before.peer_unlink(b"x", 5);
        let bytes = before.take_notes().expect("the note dropped");
        let mut fresh = Reconciler::new(before.config(), 5);
        assert!(fresh.restore_notes(&bytes));
        assert!(fresh.peer_remade.is_empty());
    }

    /// The lower id's skip of the peer's records of its own entry after an entry clash
    /// (`peer_entry_clash` → `Ours`): after a restart between the clash and the peer's write
    /// of its entry, the write is still skipped (not applied to our entry), and not listed
    /// again.
    #[test]
    fn a_restart_keeps_the_skip_of_the_peers_entry_after_a_clash() {
        let b = |s: &str| s.as_bytes().to_vec();
        // We made `n` (a symlink, seq 5); the peer made its `n` having seen through 2.
        let journal = [(5, Local::Made(b("n")))];
        let mut before = Reconciler::new(Config::new(1, 2), 2);
        before.local_change(5, &journal[0].1);
        assert_eq!(
            before.peer_entry_clash(b"n", 2),
            EntryClash::Ours { first: true }
        );
        let want = before.clone().peer_data(b"n", 2);
        assert_eq!(
            want.1,
            Decision::Skip {
                rewrite: false,
                first: false
            }
        );
        for notes in [false, true] {
            let mut after = restarted(&mut before.clone(), &journal, notes);
            let got = after.peer_data(b"n", 2);
            assert_eq!(got == want, notes, "{got:?}, notes restored: {notes}");
            assert_eq!(
                after.peer_entry_clash(b"n", 2) == EntryClash::Ours { first: false },
                notes
            );
        }
        // The peer saw our making: the skip is forgotten, and with it the note.
        assert!(before.take_notes().is_some());
        before.peer_data(b"x", 5);
        let bytes = before.take_notes().expect("the note dropped");
        let mut fresh = Reconciler::new(before.config(), 5);
        assert!(fresh.restore_notes(&bytes));
        assert!(fresh.reused.is_empty());
    }

    /// Our unseen renames that followed a peer's rename of a directory above their names
    /// (`Reconciler::peer_renamed`: `followed`, and the renames' ends): after a restart between
    /// the peer's rename and its later records, those records still follow our renames. The
    /// replay rebuilds our renames with their names as journaled, and no peer rename.
    #[test]
    fn a_restart_keeps_our_renames_that_followed_a_peer_rename() {
        let b = |s: &str| s.as_bytes().to_vec();
        let rename = |f: &str, t: &str| Local::Rename {
            from: b(f),
            to: b(t),
            exchange: false,
        };
        // We renamed `d/x` → `y` (out of `d`) and `z` → `d/w` (into it); the peer, having
        // seen through 2, renamed `d` → `e`, then writes `e/x` (its name for our `y`) and `z`
        // (ours now at `e/w`).
        let journal = [(5, rename("d/x", "y")), (6, rename("z", "d/w"))];
        let mut before = Reconciler::new(Config::new(2, 1), 2);
        for (seq, c) in &journal {
            before.local_change(*seq, c);
        }
        assert!(matches!(
            before.peer_rename(b"d", b"e", 2),
            RenameDecision::Apply { .. }
        ));
        before.peer_renamed(b"d", b"e", b"d", b"e", false);
        let want = |r: &mut Reconciler| (r.translate(b"e/x", 2), r.translate(b"z", 2));
        assert_eq!(want(&mut before.clone()), (Some(b("y")), Some(b("e/w"))));
        let moved_in = before
            .renames
            .get(&(6, 0))
            .cloned()
            .expect("our rename into d");
        assert_ne!(
            moved_in.current_after, 0,
            "the peer's rename moved its name: {moved_in:?}"
        );
        for notes in [false, true] {
            let mut after = restarted(&mut before.clone(), &journal, notes);
            if notes {
                // Its name and `current_after` as they were (`Moved::current_after` is kept).
                assert_eq!(after.renames.get(&(6, 0)), Some(&moved_in));
            }
            let got = want(&mut after);
            assert_eq!(
                got == want(&mut before.clone()),
                notes,
                "{got:?}, notes restored: {notes}"
            );
        }
        // The peer saw our renames: they are forgotten, and with them the note.
        assert!(before.take_notes().is_some());
        before.peer_unlink(b"q", 6);
        let bytes = before.take_notes().expect("the renames dropped");
        let mut fresh = Reconciler::new(before.config(), 6);
        assert!(fresh.restore_notes(&bytes));
        assert!(fresh.followed.is_empty() && fresh.renames.is_empty());
    }

    /// Our unseen exchange in a directory the peer renamed onto a name we made (`mkdir e`,
    /// `d/x` ⇄ `d/y` here; `d` → `e` there, held here as `e.conflict`): its ends keep the
    /// peer's names (`e/x`, `e/y`, the sources of its records) and ours (`e.conflict/x`,
    /// `e.conflict/y`, where the entries are), `Moved::here`. After a restart the notes bring
    /// both back; notes without ours (as written before they were kept) send the peer's write
    /// of `e/x` to `e/y`, which is not here, and it is lost.
    #[test]
    fn a_restart_keeps_the_names_here_of_our_exchange_that_followed_a_held_peer_rename() {
        let b = |s: &str| s.as_bytes().to_vec();
        let journal = [
            (1, Local::MadeDir(b("e"))),
            (
                2,
                Local::Rename {
                    from: b("d/x"),
                    to: b("d/y"),
                    exchange: true,
                },
            ),
        ];
        let mut before = Reconciler::new(Config::new(1, 2), 0);
        for (seq, c) in &journal {
            before.local_change(*seq, c);
        }
        assert_eq!(
            before.peer_rename(b"d", b"e", 0),
            RenameDecision::Apply {
                from: b("d"),
                to: b("e"),
                clash: false,
                aside: false
            }
        );
        assert_eq!(
            before.peer_dir_clash(b"e", b"e", 0),
            DirClash::Ours { made: 1 }
        );
        before.peer_renamed(b"d", b"e", b"d", b"e.conflict", false);
        before.hold(b"e", b"e.conflict", 1);
        let want = |r: &mut Reconciler| (r.translate(b"e/x", 0), r.translate(b"e/y", 0));
        let here = (Some(b("e.conflict/y")), Some(b("e.conflict/x")));
        assert_eq!(want(&mut before.clone()), here);
        let exchange = before.renames.get(&(2, 0)).cloned().expect("our exchange");
        assert_eq!(
            (exchange.from.as_slice(), exchange.to.as_slice()),
            (&b"e/x"[..], &b"e/y"[..]),
            "the peer's names"
        );
        assert_eq!(
            exchange.here,
            Some((b("e.conflict/x"), b("e.conflict/y"))),
            "ours"
        );
        for notes in [false, true] {
            let mut after = restarted(&mut before.clone(), &journal, notes);
            if notes {
                assert_eq!(after.renames.get(&(2, 0)), Some(&exchange));
            }
            let got = want(&mut after);
            assert_eq!(got == here, notes, "{got:?}, notes restored: {notes}");
        }
        // Notes without the names here (a file written before they were kept) load, with the
        // peer's names for both: the write goes to `e/y`, not here (the loss this fixes).
        let mut old = before.clone();
        for m in old.renames.values_mut() {
            m.here = None;
        }
        old.notes_dirty = true;
        let mut after = restarted(&mut old, &journal, true);
        assert_eq!(after.translate(b"e/x", 0), Some(b("e/y")));
    }

    #[test]
    fn the_notes_are_taken_once_per_change_and_damaged_ones_are_refused() {
        let mut r = Reconciler::new(Config::new(2, 1), 2);
        assert_eq!(r.take_notes(), None, "nothing noted yet");
        r.local_change(5, &Local::Removed(b"d".to_vec()));
        assert_eq!(r.peer_rename(b"d", b"e", 2), RenameDecision::Removed);
        let bytes = r.take_notes().expect("noted");
        assert_eq!(r.take_notes(), None, "unchanged since");
        assert_eq!(r.peer_rename(b"d", b"e", 2), RenameDecision::Removed);
        assert_eq!(r.take_notes(), None, "the same names noted again");
        for cut in 0..bytes.len() {
            let mut fresh = Reconciler::new(Config::new(2, 1), 2);
            assert!(!fresh.restore_notes(&bytes[..cut]), "cut at {cut}");
            let mut bad = bytes.clone();
            bad[cut] ^= 1;
            assert!(!fresh.restore_notes(&bad), "bit flipped at {cut}");
            assert_eq!(fresh.refill(b"e/x", 2), Vec::<Vec<u8>>::new());
        }
        let mut back = Reconciler::new(Config::new(2, 1), 2);
        assert!(back.restore_notes(&bytes));
        assert_eq!(back.refill(b"e/x", 2), vec![b"e".to_vec()]);
    }

    /// Notes written before `peer_remade` and the listed reuses were kept (they end after the
    /// held names, or after `peer_remade`) still load, with none of them.
    #[test]
    fn notes_written_before_the_restart_rules_still_load() {
        let mut r = Reconciler::new(Config::new(2, 1), 2);
        r.local_change(5, &Local::Removed(b"d".to_vec()));
        assert_eq!(r.peer_rename(b"d", b"e", 2), RenameDecision::Removed);
        let bytes = r.take_notes().expect("noted");
        let body = &bytes[..bytes.len() - 4];
        // The lists since the restart rules empty: seven zero counts before the checksum
        // (`peer_remade`, the listed reuses, the exchange's progress, `followed`, the renames
        // it moved, `unlinked`, the exchanges' names here); a file of each earlier format ends
        // before some of them.
        assert_eq!(&body[body.len() - 28..], &[0u8; 28]);
        for cut in [28, 24, 20, 16, 12, 8, 4] {
            let mut old = body[..body.len() - cut].to_vec();
            let crc = crc32c::crc32c(&old);
            old.extend_from_slice(&crc.to_le_bytes());
            let mut back = Reconciler::new(Config::new(2, 1), 2);
            assert!(back.restore_notes(&old), "{cut} bytes shorter");
            assert_eq!(back.refill(b"e/x", 2), vec![b"e".to_vec()]);
            assert!(back.peer_remade.is_empty() && back.reused.is_empty());
            assert_eq!(back.exchange, None);
        }
        // The exchange's progress goes with the notes, and only a valid one.
        r.exchange_step_done(9, 2);
        let bytes = r.take_notes().expect("the progress changed");
        let mut back = Reconciler::new(Config::new(2, 1), 2);
        assert!(back.restore_notes(&bytes));
        assert_eq!((back.exchange_done(9), back.exchange_done(8)), (2, 0));
        // The steps done: the byte before the four counts after it (`followed`, the renames it
        // moved, `unlinked`, the names here) and the checksum.
        let mut bad = bytes[..bytes.len() - 4].to_vec();
        let done = bad.len() - 17;
        assert_eq!(bad[done], 2);
        bad[done] = 4;
        let crc = crc32c::crc32c(&bad);
        bad.extend_from_slice(&crc.to_le_bytes());
        assert!(!back.restore_notes(&bad), "4 steps of 3");
    }

    #[test]
    fn change_points_cover_a_batch_and_stay_bounded() {
        let mut c = ChangePoints::default();
        assert_eq!(c.seen_at(5), 0);
        c.note(10, 3);
        c.note(20, 7);
        c.note(25, 7); // no news: not a point
        assert_eq!(c.len(), 2);
        assert_eq!(c.seen_at(9), 0);
        assert_eq!(c.seen_at(10), 3);
        assert_eq!(c.seen_at(30), 7);
        assert_eq!(c.for_batch(12, 22), vec![(12, 3), (20, 7)]);
        // A batch of one record, and a range given backwards, need no range of points.
        assert_eq!(c.for_batch(20, 20), vec![(20, 7)]);
        assert_eq!(c.for_batch(21, 3), vec![(21, 7)]);
        c.forget_through(21);
        assert_eq!(c.seen_at(22), 7);
        assert_eq!(c.len(), 1);
        let mut p = PeerPoints::default();
        for (f, t) in c.for_batch(22, 40) {
            p.note(f, t);
        }
        assert_eq!(p.seen_at(22), 7);
        assert_eq!(p.seen_at(40), 7);
    }
}

#[cfg(test)]
mod names {
    //! Namespace changes during a split, on a model of both trees: each site applies the
    //! other's records as `site::reconcile` does (translate, decide, refill, restore).
    use super::*;

    fn site(me: u64, peer: u64) -> Reconciler {
        Reconciler::new(Config::new(me, peer), 0)
    }

    #[derive(Debug, Clone)]
    enum R {
        Write(&'static str, &'static str),
        Rename(&'static str, &'static str),
        Unlink(&'static str),
        Rmdir(&'static str),
        Mkdir(&'static str),
        Create(&'static str),
        /// A restore of a whole file (the rewrite after `Restore`): create + content.
        Whole(Vec<u8>, String),
        /// `ln -s TARGET NAME`: in the tree, content `@TARGET` (a write of it fails; a copy of
        /// it, `Whole`, is a symlink with the same target, as `SiteReconcile::special_aside`).
        Symlink(&'static str, &'static str),
        /// `renameat2(a, b, RENAME_EXCHANGE)`: both names exist and swap their entries.
        Exchange(&'static str, &'static str),
    }

    /// One site: its tree (a directory is `None`), its machine, its journal (record, seen).
    struct Site {
        tree: BTreeMap<Vec<u8>, Option<String>>,
        r: Reconciler,
        journal: Vec<(R, u64)>,
        /// The peer's records considered (its seq, 1-based).
        considered: u64,
        conflicts: usize,
        /// The notes as last made durable ([`Site::save_notes`]), for a restart.
        notes: Option<Vec<u8>>,
        /// A crash comes right after this many steps of a peer's exchange carried out as
        /// renames ([`Site::peer_exchange`]; `None`: no crash).
        crash_after: Option<u8>,
    }

    impl Site {
        fn new(me: u64, peer: u64, tree: &[(&str, Option<&str>)]) -> Site {
            Site {
                tree: tree
                    .iter()
                    .map(|(p, c)| (p.as_bytes().to_vec(), c.map(str::to_string)))
                    .collect(),
                r: site(me, peer),
                journal: Vec::new(),
                considered: 0,
                conflicts: 0,
                notes: None,
                crash_after: None,
            }
        }

        /// The notes made durable (`SiteReconcile::save_notes`).
        fn save_notes(&mut self) {
            if let Some(n) = self.r.take_notes() {
                self.notes = Some(n);
            }
        }

        /// A restart: the machine rebuilt as `SiteReconcile::rebuild` does (the notes last made
        /// durable, then our journal replayed), nothing of the peer's acknowledged since
        /// `seen` (its watermark as persisted) and its records after `considered` to come
        /// again. The tree is as the crash left it.
        fn restart(&mut self, seen: u64, considered: u64) {
            let mut r = Reconciler::new(self.r.config(), seen);
            if let Some(n) = &self.notes {
                assert!(r.restore_notes(n));
            }
            let b = |s: &str| s.as_bytes().to_vec();
            for (i, (rec, _)) in self.journal.iter().enumerate() {
                let seq = i as u64 + 1;
                let change = match rec {
                    R::Write(p, _) => Local::Data(b(p)),
                    R::Rename(f, t) | R::Exchange(f, t) => Local::Rename {
                        from: b(f),
                        to: b(t),
                        exchange: matches!(rec, R::Exchange(..)),
                    },
                    R::Unlink(p) | R::Rmdir(p) => Local::Removed(b(p)),
                    R::Create(p) | R::Symlink(p, _) => Local::Made(b(p)),
                    R::Mkdir(p) => Local::MadeDir(b(p)),
                    R::Whole(p, _) => {
                        r.local_path(seq, p, true);
                        continue;
                    }
                };
                r.local_change(seq, &change);
            }
            self.r = r;
            self.considered = considered;
            self.crash_after = None;
        }

        /// A local change (journaled with what it considered of the peer's).
        fn local(&mut self, rec: R) {
            assert!(self.apply(&rec), "local {rec:?}");
            self.journal.push((rec.clone(), self.considered));
            let seq = self.journal.len() as u64;
            let b = |s: &str| s.as_bytes().to_vec();
            let change = match &rec {
                R::Write(p, _) => Some(Local::Data(b(p))),
                R::Rename(f, t) => Some(Local::Rename {
                    from: b(f),
                    to: b(t),
                    exchange: false,
                }),
                R::Exchange(f, t) => Some(Local::Rename {
                    from: b(f),
                    to: b(t),
                    exchange: true,
                }),
                R::Unlink(p) | R::Rmdir(p) => Some(Local::Removed(b(p))),
                R::Create(p) | R::Symlink(p, _) => Some(Local::Made(b(p))),
                R::Mkdir(p) => Some(Local::MadeDir(b(p))),
                R::Whole(p, _) => {
                    self.r.local_path(seq, p, true);
                    None
                }
            };
            if let Some(c) = change {
                self.r.local_change(seq, &c);
            }
        }

        /// A free conflict name for `p` here (the shell's names carry the site and time).
        fn copy_name(&self, p: &[u8]) -> Vec<u8> {
            let mut copy = p.to_vec();
            copy.extend_from_slice(b".conflict");
            let mut n = 0;
            let mut name = copy.clone();
            while self.tree.contains_key(&name) {
                n += 1;
                name = copy.clone();
                name.extend_from_slice(format!("-{n}").as_bytes());
            }
            name
        }

        /// A free name to hold the peer's directory of `p` under ([`Reconciler::hold`]): not
        /// the conflict name the peer's rename aside gives it, as the shell's
        /// (`SiteReconcile::holding_name`, `.held-`, against the peer's `.conflict-`).
        fn holding_name(&self, p: &[u8]) -> Vec<u8> {
            let mut held = p.to_vec();
            held.extend_from_slice(b".held");
            let mut n = 0;
            let mut name = held.clone();
            while self.tree.contains_key(&name) {
                n += 1;
                name = held.clone();
                name.extend_from_slice(format!("-{n}").as_bytes());
            }
            name
        }

        fn parent_ok(&self, p: &[u8]) -> bool {
            match p.iter().rposition(|b| *b == b'/') {
                None => true,
                Some(i) => matches!(self.tree.get(&p[..i]), Some(None)),
            }
        }

        fn apply(&mut self, rec: &R) -> bool {
            let b = |s: &str| s.as_bytes().to_vec();
            match rec {
                R::Write(p, c) => match self.tree.get_mut(p.as_bytes()) {
                    Some(Some(x)) if !x.starts_with('@') => {
                        *x = c.to_string();
                        true
                    }
                    _ => false,
                },
                R::Whole(p, c) => {
                    if !self.parent_ok(p) || matches!(self.tree.get(p), Some(None)) {
                        return false;
                    }
                    self.tree.insert(p.clone(), Some(c.clone()));
                    true
                }
                R::Create(p) | R::Mkdir(p) | R::Symlink(p, _) => {
                    if !self.parent_ok(p.as_bytes()) || self.tree.contains_key(p.as_bytes()) {
                        return false;
                    }
                    let v = match rec {
                        R::Create(_) => Some(String::new()),
                        R::Symlink(_, t) => Some(format!("@{t}")),
                        _ => None,
                    };
                    self.tree.insert(b(p), v);
                    true
                }
                R::Unlink(p) => {
                    matches!(self.tree.get(p.as_bytes()), Some(Some(_)))
                        && self.tree.remove(p.as_bytes()).is_some()
                }
                R::Rmdir(p) => {
                    let mut pre = b(p);
                    pre.push(b'/');
                    matches!(self.tree.get(p.as_bytes()), Some(None))
                        && !self.tree.keys().any(|k| k.starts_with(&pre))
                        && self.tree.remove(p.as_bytes()).is_some()
                }
                R::Exchange(f, t) => {
                    let (f, t) = (f.as_bytes(), t.as_bytes());
                    if f == t
                        || !self.tree.contains_key(f)
                        || !self.tree.contains_key(t)
                        || moved_path(t, f, f).is_some()
                        || moved_path(f, t, t).is_some()
                    {
                        return false;
                    }
                    let moved: Vec<_> = self
                        .tree
                        .keys()
                        .filter_map(|k| renamed_path(k, f, t, true).map(|n| (k.clone(), n)))
                        .collect();
                    let vals: Vec<_> = moved
                        .iter()
                        .map(|(k, n)| (n.clone(), self.tree.remove(k).flatten()))
                        .collect();
                    self.tree.extend(vals);
                    true
                }
                R::Rename(f, t) => {
                    if !self.tree.contains_key(f.as_bytes())
                        || !self.parent_ok(t.as_bytes())
                        || moved_path(t.as_bytes(), f.as_bytes(), f.as_bytes()).is_some()
                    {
                        // (Nor a directory into itself: `EINVAL`.)
                        return false;
                    }
                    let is_dir = |p: &str| matches!(self.tree.get(p.as_bytes()), Some(None));
                    if self.tree.contains_key(t.as_bytes()) && (is_dir(f) || is_dir(t)) {
                        return false;
                    }
                    let moved: Vec<_> = self
                        .tree
                        .keys()
                        .filter_map(|k| {
                            moved_path(k, f.as_bytes(), t.as_bytes()).map(|n| (k.clone(), n))
                        })
                        .collect();
                    let vals: Vec<_> = moved
                        .iter()
                        .map(|(k, n)| (n.clone(), self.tree.remove(k).flatten()))
                        .collect();
                    self.tree.extend(vals);
                    true
                }
            }
        }

        /// The peer's record `rec`, journaled there having considered ours through `seen`.
        fn peer(&mut self, rec: &R, seen: u64) {
            self.considered += 1;
            self.peer_op(rec, seen);
        }

        /// One peer record (or one of the renames a peer's exchange is carried out as).
        fn peer_op(&mut self, rec: &R, seen: u64) {
            let s = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
            let mut restores = Vec::new();
            match rec {
                R::Write(p, c) => match self.r.peer_data(p.as_bytes(), seen) {
                    (q, Decision::Apply) => {
                        self.apply(&R::Write(Box::leak(s(&q).into_boxed_str()), c));
                    }
                    (q, Decision::Skip { rewrite, first }) => {
                        self.conflicts += usize::from(first);
                        if rewrite {
                            restores.push((q, false));
                        }
                    }
                    (q, Decision::CopyThenApply) => {
                        // Only a regular file is copied (`SiteReconcile::copy_aside`): a
                        // directory of ours at the name stays, the write fails.
                        if let Some(Some(mine)) = self.tree.get(&q).cloned() {
                            self.conflicts += 1;
                            let copy = self.copy_name(&q);
                            self.local(R::Whole(copy, mine));
                        }
                        self.apply(&R::Write(Box::leak(s(&q).into_boxed_str()), c));
                    }
                    d => panic!("{d:?}"),
                },
                R::Unlink(p) => match self.r.peer_unlink(p.as_bytes(), seen) {
                    (_, Decision::Skip { .. }) => {}
                    (q, Decision::Apply) => {
                        self.apply(&R::Unlink(Box::leak(s(&q).into_boxed_str())));
                    }
                    (q, Decision::Restore { first }) => {
                        self.conflicts += usize::from(first);
                        restores.push((q, true));
                    }
                    d => panic!("{d:?}"),
                },
                R::Exchange(f, t) => self.peer_exchange((f, t), seen),
                R::Rename(f, t) if self.entry_onto((f, t), seen, &mut restores) => {}
                R::Rename(f, t) => match self.r.peer_rename(f.as_bytes(), t.as_bytes(), seen) {
                    RenameDecision::Apply {
                        from,
                        to,
                        clash,
                        aside,
                    } => {
                        self.conflicts += usize::from(clash);
                        let fs: &'static str = Box::leak(s(&from).into_boxed_str());
                        let ts: &'static str = Box::leak(s(&to).into_boxed_str());
                        if self.dir_onto((f.as_bytes(), t.as_bytes()), &from, &to, seen) {
                            return self.flush(restores);
                        }
                        if let (true, Some(Some(mine))) = (aside, self.tree.get(&to).cloned()) {
                            // Another file of ours under the name: aside first (as the shell).
                            self.conflicts += 1;
                            let copy = self.copy_name(&to);
                            self.local(R::Whole(copy, mine));
                        }
                        let mut done = self.apply(&R::Rename(fs, ts));
                        if !done && !self.parent_ok(&to) {
                            // A directory on the way we removed: made again (as the shell does).
                            for d in self.r.refill(&to, seen) {
                                self.remake(&d);
                            }
                            done = self.apply(&R::Rename(fs, ts));
                        }
                        if done {
                            self.r
                                .peer_renamed(f.as_bytes(), t.as_bytes(), &from, &to, false);
                        } else if matches!(self.tree.get(&to), Some(None))
                            && matches!(self.tree.get(&from), Some(Some(_)))
                        {
                            match self.r.peer_rename_onto_dir(&from, seen) {
                                Decision::Apply => self.hold_source((f, t), (&from, &to), seen),
                                Decision::Restore { first } => {
                                    self.conflicts += usize::from(first);
                                    restores.push((from.clone(), true));
                                }
                                d => panic!("{d:?}"),
                            }
                        }
                    }
                    RenameDecision::Keep { clash, .. } => self.conflicts += usize::from(clash),
                    RenameDecision::Removed => {}
                    RenameDecision::Displaced { from, to, .. }
                        if self.dir_onto((f.as_bytes(), t.as_bytes()), &from, &to, seen) => {}
                    RenameDecision::Displaced {
                        from,
                        to,
                        rewrite,
                        first,
                        source,
                    } => {
                        self.conflicts += usize::from(first);
                        if rewrite {
                            restores.push((to, false));
                        }
                        match source {
                            Decision::Apply => {
                                self.source_gone(&from);
                            }
                            Decision::Restore { first } => {
                                self.conflicts += usize::from(first);
                                restores.push((from, true));
                            }
                            d => panic!("{d:?}"),
                        }
                    }
                },
                R::Create(p) | R::Mkdir(p) | R::Rmdir(p) | R::Symlink(p, _) => {
                    // Translated twice, as the shell does (`net::peer::PeerReceiver::applied_as`
                    // for the reuse window, then `apply`, and again under the order lock): the
                    // answer must not change.
                    let mut q = None;
                    for _ in 0..2 {
                        q = if matches!(rec, R::Rmdir(_)) {
                            self.r.translate_removal(p.as_bytes(), seen)
                        } else {
                            self.r.translate_new(p.as_bytes(), seen)
                        };
                    }
                    let q = q.unwrap_or(b(p));
                    let q: &'static str = Box::leak(s(&q).into_boxed_str());
                    let rec = match rec {
                        R::Create(_) => R::Create(q),
                        R::Mkdir(_) => R::Mkdir(q),
                        R::Symlink(_, t) => R::Symlink(q, t),
                        _ => R::Rmdir(q),
                    };
                    if !matches!(rec, R::Rmdir(_))
                        && matches!(self.tree.get(q.as_bytes()), Some(Some(_)))
                        && self.r.peer_reused(q.as_bytes(), seen)
                    {
                        self.r.reused_aside(q.as_bytes());
                        // The peer removed the name and made it again: its new entry takes it,
                        // ours (kept against the removal) goes aside; removed as the peer's
                        // (not journaled: the peer has no such file).
                        self.conflicts += 1;
                        let mine = self.tree.remove(q.as_bytes()).flatten();
                        let copy = self.copy_name(q.as_bytes());
                        self.local(R::Whole(copy, mine.unwrap_or_default()));
                    }
                    if let (R::Create(_) | R::Symlink(..), Some(Some(mine))) =
                        (&rec, self.tree.get(q.as_bytes()).cloned())
                    {
                        let theirs = match &rec {
                            R::Symlink(_, t) => format!("@{t}"),
                            _ => String::new(),
                        };
                        self.entry_made(q, &mine, &theirs, seen);
                    }
                    let ours_is_dir = matches!(self.tree.get(q.as_bytes()), Some(None));
                    if matches!(rec, R::Mkdir(_)) && ours_is_dir && self.dir_made(p, q, seen) {
                        return self.flush(restores);
                    }
                    let clash = matches!(rec, R::Mkdir(_)) && self.tree.contains_key(q.as_bytes());
                    if clash && clash_moves_ours_aside(ours_is_dir, true) {
                        // Both made the name: our file goes aside, the directory is made.
                        self.conflicts += 1;
                        let mine = self.tree.get(q.as_bytes()).cloned().flatten();
                        let copy = self.copy_name(q.as_bytes());
                        self.local(R::Whole(copy, mine.unwrap_or_default()));
                        self.local(R::Unlink(q));
                        self.r.moved_aside_for_peer(q.as_bytes());
                    }
                    let applied = self.apply(&rec);
                    if let R::Rmdir(_) = rec {
                        self.r.peer_rmdir_done(p.as_bytes(), seen);
                    }
                    if !applied {
                        if let R::Rmdir(_) = rec {
                            // Kept here (filled): the shell journals its mode and owner only.
                        } else if !self.parent_ok(q.as_bytes()) {
                            let dirs = self.r.refill(q.as_bytes(), seen);
                            for d in &dirs {
                                self.remake(d);
                            }
                            self.apply(&rec);
                        }
                    }
                }
                R::Whole(p, c) => {
                    let (q, d) = self.r.peer_data(p, seen);
                    match d {
                        Decision::Apply => {}
                        // A rewrite of the winner's, concurrent with a later change of ours.
                        Decision::CopyThenApply => {
                            self.conflicts += 1;
                            if let Some(Some(mine)) = self.tree.get(&q).cloned() {
                                let copy = self.copy_name(&q);
                                self.local(R::Whole(copy, mine));
                            }
                        }
                        // The loser's restore of a name the winner gave its own file.
                        Decision::Skip { rewrite, first } => {
                            self.conflicts += usize::from(first);
                            if rewrite {
                                restores.push((q, false));
                            }
                            return self.flush(restores);
                        }
                        d => panic!("{d:?}"),
                    }
                    if !self.apply(&R::Whole(q.clone(), c.clone())) && !self.parent_ok(&q) {
                        for d in self.r.refill(&q, seen) {
                            self.remake(&d);
                        }
                        self.apply(&R::Whole(q, c.clone()));
                    }
                }
            }
            self.flush(restores);
        }

        /// The peer's rename of a directory (`from`, our name) onto `to` (our name; `theirs`:
        /// the peer's), where we have an entry: handled here (`true`) as `site::reconcile`
        /// does. Our file goes aside (the directory stays); our directory made concurrently
        /// stays (then the peer's is held aside) or goes aside (then the rename applies), as
        /// [`Reconciler::peer_dir_clash`] says.
        fn dir_onto(
            &mut self,
            (from_theirs, theirs): (&[u8], &[u8]),
            from: &[u8],
            to: &[u8],
            seen: u64,
        ) -> bool {
            let from_theirs = from_theirs.to_vec();
            let s = |v: &[u8]| -> &'static str {
                Box::leak(String::from_utf8_lossy(v).into_owned().into_boxed_str())
            };
            if !matches!(self.tree.get(from), Some(None)) || !self.tree.contains_key(to) {
                return false;
            }
            if let Some(Some(mine)) = self.tree.get(to).cloned() {
                // A file of ours: aside, as for a peer's mkdir of its name.
                self.conflicts += 1;
                let copy = self.copy_name(to);
                self.local(R::Whole(copy, mine));
                self.local(R::Unlink(s(to)));
                self.r.moved_aside_for_peer(to);
            } else {
                match self.r.peer_dir_clash(theirs, to, seen) {
                    DirClash::Apart => return false,
                    DirClash::Ours { made } => {
                        let hold = self.holding_name(to);
                        if self.apply(&R::Rename(s(from), s(&hold))) {
                            self.r
                                .peer_renamed(&from_theirs, theirs, from, &hold, false);
                            self.r.hold(theirs, &hold, made);
                        }
                        return true;
                    }
                    DirClash::Theirs => {
                        self.conflicts += 1;
                        let aside = self.copy_name(to);
                        self.local(R::Rename(s(to), s(&aside)));
                        self.r.yielded(to);
                    }
                }
            }
            if self.apply(&R::Rename(s(from), s(to))) {
                self.r.peer_renamed(&from_theirs, theirs, from, to, false);
            }
            true
        }

        /// The peer's mkdir of `theirs` (`ours`: our name for it), where we have a directory:
        /// handled here (`true`) when we made ours concurrently ([`Site::dir_onto`]).
        fn dir_made(&mut self, theirs: &str, ours: &'static str, seen: u64) -> bool {
            match self
                .r
                .peer_dir_clash(theirs.as_bytes(), ours.as_bytes(), seen)
            {
                DirClash::Apart => false,
                DirClash::Ours { made } => {
                    let hold = self.holding_name(ours.as_bytes());
                    let h: &'static str = Box::leak(String::from_utf8_lossy(&hold).into());
                    if self.apply(&R::Mkdir(h)) {
                        self.r.hold(theirs.as_bytes(), &hold, made);
                    }
                    true
                }
                DirClash::Theirs => {
                    self.conflicts += 1;
                    let aside = self.copy_name(ours.as_bytes());
                    let a: &'static str = Box::leak(String::from_utf8_lossy(&aside).into());
                    self.local(R::Rename(ours, a));
                    self.r.yielded(ours.as_bytes());
                    self.apply(&R::Mkdir(ours));
                    true
                }
            }
        }

        /// A directory `d` the peer's change needs made again ([`Reconciler::refill`]). A file
        /// of ours under its name (made after our removal of the directory) goes aside first,
        /// as for a peer's directory of its name ([`clash_moves_ours_aside`]; the shell:
        /// `net::peer::PeerReceiver::refill` on the record's `ENOTDIR`,
        /// `SiteReconcile::move_aside`).
        fn remake(&mut self, d: &[u8]) {
            let s = |v: &[u8]| -> &'static str {
                Box::leak(String::from_utf8_lossy(v).into_owned().into_boxed_str())
            };
            if let Some(Some(mine)) = self.tree.get(d).cloned() {
                if clash_moves_ours_aside(false, true) && self.parent_ok(d) {
                    self.conflicts += 1;
                    let copy = self.copy_name(d);
                    self.local(R::Whole(copy, mine));
                    self.local(R::Unlink(s(d)));
                    self.r.moved_aside_for_peer(d);
                }
            }
            if !self.tree.contains_key(d) && self.parent_ok(d) {
                self.local(R::Mkdir(s(d)));
            }
        }

        /// Two entries, not both regular files nor directories, one of them a symlink: the
        /// rule of [`EntryClash`] (`mine`, `theirs`: the contents, `@TARGET` for a symlink).
        fn entries_clash(mine: &str, theirs: &str) -> bool {
            (mine.starts_with('@') || theirs.starts_with('@')) && mine != theirs
        }

        /// The peer makes `q` (our name) where we have an entry `mine` (a file or symlink),
        /// its entry `theirs`: as `net::peer::entry_clash` does. Ours stays (the making then
        /// fails as existing), or goes to a copy and is removed as the peer's record (not
        /// journaled), so that the making applies.
        fn entry_made(&mut self, q: &str, mine: &str, theirs: &str, seen: u64) {
            if !Self::entries_clash(mine, theirs) {
                return;
            }
            match self.r.peer_entry_clash(q.as_bytes(), seen) {
                EntryClash::Apart => {}
                EntryClash::Ours { first } => self.conflicts += usize::from(first),
                EntryClash::Theirs => {
                    self.conflicts += 1;
                    let copy = self.copy_name(q.as_bytes());
                    self.local(R::Whole(copy, mine.to_string()));
                    self.tree.remove(q.as_bytes());
                    self.r.entry_set_aside(q.as_bytes());
                }
            }
        }

        /// The peer's rename of `f` onto `t` (its names), an entry onto another of ours given
        /// the name concurrently, one of them a symlink: handled here (`true`) when ours stays
        /// (the rename is not applied, its source goes, or is kept and given back if we changed
        /// it); when ours goes aside, the rename then applies as any (`false`).
        fn entry_onto(
            &mut self,
            (f, t): (&str, &str),
            seen: u64,
            restores: &mut Vec<(Vec<u8>, bool)>,
        ) -> bool {
            let from = self.r.translate(f.as_bytes(), seen).unwrap_or(b(f));
            let to = self.r.translate_new(t.as_bytes(), seen).unwrap_or(b(t));
            let (Some(Some(theirs)), Some(Some(mine))) =
                (self.tree.get(&from).cloned(), self.tree.get(&to).cloned())
            else {
                return false;
            };
            if from == to || !Self::entries_clash(&mine, &theirs) {
                return false;
            }
            match self.r.peer_entry_clash(&to, seen) {
                EntryClash::Apart => false,
                EntryClash::Theirs => {
                    self.conflicts += 1;
                    let copy = self.copy_name(&to);
                    self.local(R::Whole(copy, mine));
                    self.tree.remove(&to);
                    self.r.entry_set_aside(&to);
                    false
                }
                EntryClash::Ours { first } => {
                    self.conflicts += usize::from(first);
                    match self.r.peer_rename_onto_dir(&from, seen) {
                        Decision::Restore { first } => {
                            self.conflicts += usize::from(first);
                            restores.push((from, true));
                        }
                        _ => self.source_gone(&from),
                    }
                    true
                }
            }
        }

        /// The peer's exchange of `f` and `t` (its names), as `net::peer` applies it: decided
        /// as a rename, applied with our names (a directory on the way we removed made again).
        fn peer_exchange(&mut self, (f, t): (&'static str, &'static str), seen: u64) {
            let s = |v: &[u8]| -> &'static str {
                Box::leak(String::from_utf8_lossy(v).into_owned().into_boxed_str())
            };
            // The record's seq at the peer: a crash after some steps brings it again.
            let seq = self.considered;
            let done = self.r.exchange_done(seq);
            if done == 3 {
                return;
            }
            let decision = match done {
                0 => self.r.peer_exchange(f.as_bytes(), t.as_bytes(), seen),
                // Begun as renames: it goes on as such.
                _ => ExchangeDecision::Renames {
                    via: exchange_via(f.as_bytes(), t.as_bytes()),
                },
            };
            if let ExchangeDecision::Renames { via } = decision {
                // The hidden name taken (and not by our own first step): applied as sent.
                if done > 0 || !self.tree.contains_key(&via) {
                    let via = s(&via);
                    let steps = [(f, via), (t, f), (via, t)];
                    for (k, (from, to)) in steps.into_iter().enumerate().skip(done.into()) {
                        self.peer_op(&R::Rename(from, to), seen);
                        let k = k as u8 + 1;
                        self.r.exchange_step_done(seq, k);
                        self.save_notes();
                        if self.crash_after == Some(k) {
                            return;
                        }
                    }
                    return;
                }
            }
            // Applied as sent, with our names (as any record's).
            let from = self.r.translate(f.as_bytes(), seen).unwrap_or(b(f));
            let to = self.r.translate(t.as_bytes(), seen).unwrap_or(b(t));
            let mut done = self.apply(&R::Exchange(s(&from), s(&to)));
            if !done {
                let mut made = false;
                for n in [&from, &to] {
                    for d in self.r.refill(n, seen) {
                        self.remake(&d);
                        made = true;
                    }
                }
                if made {
                    done = self.apply(&R::Exchange(s(&from), s(&to)));
                }
            }
            if done {
                self.r
                    .peer_renamed(f.as_bytes(), t.as_bytes(), &from, &to, true);
                self.r.exchange_step_done(seq, 3);
                self.save_notes();
            }
        }

        /// The source `from` (our name) of a peer rename not applied here, the name it goes to
        /// staying ours (a directory, or our entry in a conflict): our file goes, removed as
        /// the peer's record, not journaled (`net::peer::PeerReceiver::remove_source`). The
        /// peer moved its file away from the name: there the name holds nothing now, or
        /// another entry — an exchange's other end, a later one — that a removal streamed to
        /// it would take (seed 4,958: our `a/x` removed as the source of the peer's `d/x` →
        /// `a`, its exchange with `a` carried out as renames, named the peer's written file).
        fn source_gone(&mut self, from: &[u8]) {
            if let Some(Some(_)) = self.tree.get(from) {
                self.tree.remove(from);
            }
        }

        /// The source `from` (our name) of the peer's rename `f` → `t` (its names) onto our
        /// directory `to`: held under a holding name until the peer moves it aside or away
        /// ([`Reconciler::hold_source`]; the shell: `net::peer::PeerReceiver::hold_source`),
        /// not journaled (the peer's record).
        fn hold_source(&mut self, (f, t): (&str, &str), (from, to): (&[u8], &[u8]), seen: u64) {
            let s = |v: &[u8]| -> &'static str {
                Box::leak(String::from_utf8_lossy(v).into_owned().into_boxed_str())
            };
            let hold = self.holding_name(to);
            if self.apply(&R::Rename(s(from), s(&hold))) {
                self.r
                    .hold_source((f.as_bytes(), t.as_bytes()), (from, to), &hold, seen);
            }
        }

        /// End of the "batch": the restores, journaled whole.
        fn flush(&mut self, restores: Vec<(Vec<u8>, bool)>) {
            for (q, _) in restores {
                if let Some(Some(c)) = self.tree.get(&q).cloned() {
                    self.local(R::Whole(q, c));
                }
            }
        }

        fn b(p: &str) -> Vec<u8> {
            p.as_bytes().to_vec()
        }
    }

    fn b(p: &str) -> Vec<u8> {
        p.as_bytes().to_vec()
    }

    /// Runs a split: both sites make their changes, then the heal delivers each site's records
    /// to the other, interleaved as `order` says (true: a record of site 1 next), until both
    /// streams are drained (records made during the heal included). Returns both trees.
    fn heal(mut s1: Site, mut s2: Site, order: &[bool]) -> (Site, Site) {
        let (mut d1, mut d2) = (0usize, 0usize); // records of s1 delivered to s2, and back
        for k in 0..1000 {
            let pick1 = order.get(k).copied().unwrap_or(k % 2 == 0);
            let more1 = d1 < s1.journal.len();
            let more2 = d2 < s2.journal.len();
            if !more1 && !more2 {
                return (s1, s2);
            }
            if (pick1 && more1) || !more2 {
                let (rec, seen) = s1.journal[d1].clone();
                d1 += 1;
                s2.peer(&rec, seen);
            } else {
                let (rec, seen) = s2.journal[d2].clone();
                d2 += 1;
                s1.peer(&rec, seen);
            }
        }
        panic!("the heal did not settle");
    }

    fn orders() -> Vec<Vec<bool>> {
        vec![
            vec![true; 20],
            vec![false; 20],
            vec![true, false, true, false, true, false],
            vec![false, true, false, true, false, true],
        ]
    }

    /// [`check`] twice: `one`'s ops at site 1 and `other`'s at site 2, then the other way round
    /// (the outcome must not depend on which site id does which part).
    fn check_either_way(
        base: &[(&str, Option<&str>)],
        one: &[R],
        other: &[R],
        expect: &[(&str, Option<&str>)],
        conflicts: bool,
    ) {
        check(base, one, other, expect, conflicts);
        check(base, other, one, expect, conflicts);
    }

    fn check(
        base: &[(&str, Option<&str>)],
        at1: &[R],
        at2: &[R],
        expect: &[(&str, Option<&str>)],
        conflicts: bool,
    ) {
        for order in orders() {
            let (mut s1, mut s2) = (Site::new(1, 2, base), Site::new(2, 1, base));
            for r in at1 {
                s1.local(r.clone());
            }
            for r in at2 {
                s2.local(r.clone());
            }
            let (s1, s2) = heal(s1, s2, &order);
            let want: BTreeMap<Vec<u8>, Option<String>> = expect
                .iter()
                .map(|(p, c)| (b(p), c.map(str::to_string)))
                .collect();
            assert_eq!(s1.tree, s2.tree, "both sites equal, order {order:?}");
            assert_eq!(s1.tree, want, "order {order:?}");
            assert_eq!(
                s1.conflicts + s2.conflicts > 0,
                conflicts,
                "listed: {} {}",
                s1.conflicts,
                s2.conflicts
            );
            let _ = Site::b;
        }
    }

    #[test]
    fn a_write_follows_a_rename_made_at_the_other_site() {
        // Site 1 renames a → b, site 2 writes a: b holds the write at both; nothing listed.
        for (r, w) in [(1, 2), (2, 1)] {
            let (renames, writes) = (vec![R::Rename("a", "b")], vec![R::Write("a", "new")]);
            let (at1, at2) = if r == 1 {
                (renames, writes)
            } else {
                (writes, renames)
            };
            let _ = w;
            check(
                &[("a", Some("old"))],
                &at1,
                &at2,
                &[("b", Some("new"))],
                false,
            );
        }
    }

    #[test]
    fn a_write_follows_a_directory_renamed_at_the_other_site() {
        check(
            &[("d", None), ("d/x", Some("old"))],
            &[R::Rename("d", "e")],
            &[R::Write("d/x", "new"), R::Create("d/y")],
            &[("e", None), ("e/x", Some("new")), ("e/y", Some(""))],
            false,
        );
    }

    #[test]
    fn a_file_written_at_both_sites_in_a_directory_one_renamed_is_a_conflict() {
        // The renaming site wrote after its rename, or before it; either site renames.
        let base = [("d", None), ("d/x", Some("old"))];
        for renamer in [1, 2] {
            for before in [false, true] {
                let theirs = "w-renamer";
                let renames = if before {
                    vec![R::Write("d/x", theirs), R::Rename("d", "e")]
                } else {
                    vec![R::Rename("d", "e"), R::Write("e/x", theirs)]
                };
                let writes = vec![R::Write("d/x", "w-other")];
                let (at1, at2, v1, v2) = if renamer == 1 {
                    (renames, writes, theirs, "w-other")
                } else {
                    (writes, renames, "w-other", theirs)
                };
                check(
                    &base,
                    &at1,
                    &at2,
                    &[("e", None), ("e/x", Some(v1)), ("e/x.conflict", Some(v2))],
                    true,
                );
            }
        }
    }

    #[test]
    fn two_files_given_one_new_name_keep_the_lower_ids_and_copy_the_other() {
        let base = [("a", Some("A")), ("c", Some("C"))];
        // Renames at both sites of different files onto one new name (the loser's written after).
        check(
            &base,
            &[R::Rename("a", "n")],
            &[R::Rename("c", "n")],
            &[("n", Some("A")), ("n.conflict", Some("C"))],
            true,
        );
        check(
            &base,
            &[R::Rename("a", "n")],
            &[R::Rename("c", "n"), R::Write("n", "C2")],
            &[("n", Some("A")), ("n.conflict", Some("C2"))],
            true,
        );
        check(
            &base,
            &[R::Rename("a", "n"), R::Write("n", "A2")],
            &[R::Rename("c", "n")],
            &[("n", Some("A2")), ("n.conflict", Some("C"))],
            true,
        );
        // A rename at one site, a create and write at the other, each way round.
        check(
            &base,
            &[R::Rename("a", "n")],
            &[R::Create("n"), R::Write("n", "new")],
            &[
                ("c", Some("C")),
                ("n", Some("A")),
                ("n.conflict", Some("new")),
            ],
            true,
        );
        check(
            &base,
            &[R::Create("n"), R::Write("n", "new")],
            &[R::Rename("a", "n")],
            &[
                ("c", Some("C")),
                ("n", Some("new")),
                ("n.conflict", Some("A")),
            ],
            true,
        );
        // An empty file made under the name is one with the renamed file (as two empty creates).
        check(
            &base,
            &[R::Create("n")],
            &[R::Rename("a", "n")],
            &[("c", Some("C")), ("n", Some("A"))],
            false,
        );
        // The winner changed the source the loser renamed onto its name: the source comes back.
        check(
            &base,
            &[R::Rename("a", "n"), R::Write("c", "C1")],
            &[R::Rename("c", "n")],
            &[
                ("c", Some("C1")),
                ("n", Some("A")),
                ("n.conflict", Some("C")),
            ],
            true,
        );
    }

    #[test]
    fn a_write_through_the_old_name_is_not_against_the_rename_onto_the_new_one() {
        // Site 2 renamed a → n (a new name): site 1's write of a follows it (no conflict),
        // while a write of site 1's own n (another file) would be.
        let mut r = site(2, 1);
        r.local_change(
            5,
            &Local::Rename {
                from: b("a"),
                to: b("n"),
                exchange: false,
            },
        );
        assert_eq!(r.peer_data(b"a", 3), (b("n"), Decision::Apply));
        assert_eq!(r.peer_data(b"n", 3), (b("n"), Decision::CopyThenApply));
    }

    #[test]
    fn an_entry_follows_a_rename_of_its_directory() {
        let mut r = site(2, 1);
        r.local_change(5, &Local::Data(b("d/x")));
        r.local_change(6, &Local::Data(b("d/y/z")));
        r.local_change(7, &Local::Data(b("dd")));
        r.moved(b"d", b"e", false);
        assert_eq!(r.peer_data(b"e/x", 3), (b("e/x"), Decision::CopyThenApply));
        assert_eq!(
            r.peer_data(b"e/y/z", 3),
            (b("e/y/z"), Decision::CopyThenApply)
        );
        assert_eq!(r.peer_data(b"d/x", 3), (b("d/x"), Decision::Apply));
        assert_eq!(r.peer_data(b"dd", 3), (b("dd"), Decision::CopyThenApply));
        // An exchange swaps what is beneath both names.
        let mut r = site(2, 1);
        r.local_change(5, &Local::Data(b("d/x")));
        r.local_change(6, &Local::Data(b("e/y")));
        r.moved(b"d", b"e", true);
        assert_eq!(r.peer_data(b"e/x", 3).1, Decision::CopyThenApply);
        assert_eq!(r.peer_data(b"d/y", 3).1, Decision::CopyThenApply);
        assert_eq!(r.len(), 2);
        // Seen: forgotten, the name index too.
        r.peer_record(None, 6);
        assert!(r.is_empty());
        r.moved(b"e", b"f", false);
        assert!(r.is_empty());
    }

    #[test]
    fn a_rename_against_a_removal_keeps_the_file_under_its_new_name() {
        for renamer_first in [true, false] {
            let (r, u) = (vec![R::Rename("a", "b")], vec![R::Unlink("a")]);
            let (at1, at2) = if renamer_first { (r, u) } else { (u, r) };
            check(
                &[("a", Some("old"))],
                &at1,
                &at2,
                &[("b", Some("old"))],
                true,
            );
        }
    }

    #[test]
    fn a_rename_against_a_rename_keeps_the_winners_name() {
        check(
            &[("a", Some("old"))],
            &[R::Rename("a", "b")],
            &[R::Rename("a", "c"), R::Write("c", "new")],
            &[("b", Some("new"))],
            true,
        );
        // The same new name at both sites: nothing to list.
        check(
            &[("a", Some("old"))],
            &[R::Rename("a", "b")],
            &[R::Rename("a", "b")],
            &[("b", Some("old"))],
            false,
        );
    }

    #[test]
    fn a_directory_removed_at_one_site_and_filled_at_the_other_comes_back_filled() {
        for filler in [1, 2] {
            let (rm, fill) = (vec![R::Rmdir("d")], vec![R::Create("d/x")]);
            let (at1, at2) = if filler == 2 { (rm, fill) } else { (fill, rm) };
            check(
                &[("d", None)],
                &at1,
                &at2,
                &[("d", None), ("d/x", Some(""))],
                false,
            );
        }
        // The removing site emptied it first (rm -r) while the other changed a file in it.
        check(
            &[("d", None), ("d/y", Some("old"))],
            &[R::Unlink("d/y"), R::Rmdir("d")],
            &[R::Write("d/y", "new")],
            &[("d", None), ("d/y", Some("new"))],
            true,
        );
    }

    #[test]
    fn a_directory_renamed_at_one_site_and_removed_at_the_other_keeps_the_new_name_filled() {
        for renamer in [1, 2] {
            let split = |rm: Vec<R>, mv: Vec<R>| if renamer == 1 { (mv, rm) } else { (rm, mv) };
            // Filled after the rename: the removing site makes `e` again for the fill, the
            // renaming site's `rmdir` (translated to `e`) fails.
            let (at1, at2) = split(
                vec![R::Rmdir("d")],
                vec![R::Rename("d", "e"), R::Create("e/x")],
            );
            check(
                &[("d", None)],
                &at1,
                &at2,
                &[("e", None), ("e/x", Some(""))],
                false,
            );
            // Left empty: the removal follows the rename, both end without either name.
            let (at1, at2) = split(vec![R::Rmdir("d")], vec![R::Rename("d", "e")]);
            check(&[("d", None)], &at1, &at2, &[], false);
            // Emptied first (rm -r) at the removing site: a file of `d` the renaming site
            // renamed with it comes back as for a renamed file (listed), and the fill stays.
            let (at1, at2) = split(
                vec![R::Unlink("d/y"), R::Rmdir("d")],
                vec![R::Rename("d", "e"), R::Mkdir("e/z"), R::Create("e/z/w")],
            );
            check(
                &[("d", None), ("d/y", Some("old"))],
                &at1,
                &at2,
                &[
                    ("e", None),
                    ("e/y", Some("old")),
                    ("e/z", None),
                    ("e/z/w", Some("")),
                ],
                true,
            );
        }
        // Changed beneath *before* the rename at the renaming site, emptied and removed at
        // the other: the removing site makes `d` again for that change before the rename
        // arrives, then applies the rename to the directory it made (the peer's); its `Mkdir d`
        // names the renamed directory at the renaming site (it fails there as existing).
        for (renamer, (pre, x)) in [1, 2].into_iter().flat_map(|r| {
            [
                (vec![R::Create("d/y")], "old"),
                (vec![R::Write("d/x", "new"), R::Create("d/y")], "new"),
                (vec![R::Mkdir("d/z"), R::Create("d/y")], "old"),
            ]
            .map(|c| (r, c))
        }) {
            let split = |rm: Vec<R>, mv: Vec<R>| if renamer == 1 { (mv, rm) } else { (rm, mv) };
            let mut mv = pre.clone();
            mv.push(R::Rename("d", "e"));
            let (at1, at2) = split(vec![R::Unlink("d/x"), R::Rmdir("d")], mv);
            let mut want = vec![("e", None), ("e/x", Some(x)), ("e/y", Some(""))];
            if matches!(pre[0], R::Mkdir(_)) {
                want.push(("e/z", None));
            }
            check(
                &[("d", None), ("d/x", Some("old"))],
                &at1,
                &at2,
                &want,
                true,
            );
            // Nothing in it to remove first: nothing listed.
            let mut mv = pre.clone();
            mv.push(R::Rename("d", "e"));
            let (at1, at2) = split(vec![R::Rmdir("d")], mv);
            if matches!(pre[0], R::Write(..)) {
                continue;
            }
            want.retain(|(p, _)| *p != "e/x");
            check(&[("d", None)], &at1, &at2, &want, false);
        }
        // The machine: the skipped rename's new name is made again for a record beneath it.
        let mut r = site(2, 1);
        r.local_change(5, &Local::Removed(b("d")));
        assert_eq!(r.refill(b"e/x", 3), Vec::<Vec<u8>>::new());
        assert_eq!(r.peer_rename(b"d", b"e", 3), RenameDecision::Removed);
        assert_eq!(r.refill(b"e/x", 3), vec![b("e")]);
        assert_eq!(r.refill(b"e/x", 9), vec![b("e")]);
        // A directory made again for the peer's change beneath it is the peer's: its rename
        // applies.
        let mut r = site(2, 1);
        r.local_change(5, &Local::Removed(b("d")));
        assert_eq!(r.refill(b"d/y", 3), vec![b("d")]);
        assert!(matches!(
            r.peer_rename(b"d", b"e", 3),
            RenameDecision::Apply {
                clash: false,
                aside: false,
                ..
            }
        ));
        // The renaming site: the peer's `Mkdir d` after its removal of `d`, having considered
        // more of ours, names our renamed `e`; one journaled with the removal's view is new.
        let rename = Local::Rename {
            from: b("d"),
            to: b("e"),
            exchange: false,
        };
        let rmdir = Op::Rmdir {
            path: RelPath::new(b("d")).expect("path"),
        };
        let mut r = site(1, 2);
        r.local_change(4, &rename);
        assert_eq!(r.translate_new(b"d", 2), None, "no removal of it seen");
        let mut r = site(1, 2);
        r.local_change(4, &rename);
        let t = r.translate_op(&rmdir, 1).expect("translate");
        assert_eq!(
            t.and_then(|o| o.path().map(|p| p.as_bytes().to_vec())),
            Some(b("e"))
        );
        assert_eq!(r.translate_new(b"d", 1), None, "made again by the user");
        assert_eq!(
            r.translate_new(b"d", 2),
            Some(b("e")),
            "made again for our change"
        );
    }

    #[test]
    fn a_file_moved_into_a_directory_the_other_removed_brings_the_directory_back() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        for mover in [1, 2] {
            let split = |rm: Vec<R>, mv: Vec<R>| if mover == 1 { (mv, rm) } else { (rm, mv) };
            // The removing site makes `d` again for the move (a record beneath it, concurrent
            // with its removal).
            let (at1, at2) = split(
                vec![R::Unlink("d/x"), R::Rmdir("d")],
                vec![R::Rename("a", "d/y")],
            );
            check(
                &base,
                &at1,
                &at2,
                &[("d", None), ("d/y", Some("a0"))],
                false,
            );
            // It removed the file too: the move wins (the file comes back whole, listed), and
            // that restore is journaled after the moving site saw the `rmdir`, which failed
            // there: the removing site makes `d` again for it all the same.
            let (at1, at2) = split(
                vec![R::Unlink("d/x"), R::Rmdir("d"), R::Unlink("a")],
                vec![R::Rename("a", "d/y")],
            );
            check(&base, &at1, &at2, &[("d", None), ("d/y", Some("a0"))], true);
        }
        // The machine: a record beneath a directory we removed, after the peer saw the
        // removal, makes it again (the peer kept it).
        let mut r = site(1, 2);
        r.local_change(3, &Local::Removed(b("d")));
        assert_eq!(r.refill(b"d/y", 3), vec![b("d")]);
        assert_eq!(r.refill(b"e/y", 3), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn a_peer_rename_of_a_name_we_removed_is_not_applied() {
        let mut r = site(2, 1);
        r.local_change(5, &Local::Removed(b("a")));
        assert_eq!(r.peer_rename(b"a", b"b", 3), RenameDecision::Removed);
        assert!(matches!(
            r.peer_rename(b"a", b"b", 5),
            RenameDecision::Apply { clash: false, .. }
        ));
    }

    #[test]
    fn concurrent_metadata_ends_with_the_winners_value() {
        let key = 1;
        let mut w = site(1, 2);
        let mut l = site(2, 1);
        w.local_change(5, &Local::Meta(b("f"), key));
        l.local_change(7, &Local::Meta(b("f"), key));
        assert!(!w.peer_meta(b"f", key, 3), "the winner keeps its own");
        assert!(l.peer_meta(b"f", key, 3), "the loser takes the winner's");
        // Another attribute, or one the peer saw: applied.
        assert!(w.peer_meta(b"f", 2, 3));
        assert!(w.peer_meta(b"f", key, 5));
        assert!(w.names_len() == 0);
    }

    #[test]
    fn the_name_indexes_are_bounded_and_forgotten_once_seen() {
        let mut r = Reconciler::new(
            Config {
                entries_max: 2,
                ..Config::new(2, 1)
            },
            0,
        );
        for (i, p) in ["a", "b", "c"].iter().enumerate() {
            r.local_change(i as u64 + 1, &Local::Removed(b(p)));
            r.local_change(i as u64 + 10, &Local::Meta(b(p), 1));
            r.local_change(
                i as u64 + 20,
                &Local::Rename {
                    from: b(p),
                    to: b("z"),
                    exchange: false,
                },
            );
        }
        assert_eq!(r.names_len(), 6);
        // "a" was dropped for room: its removal still counts below the floor.
        assert!(r.removed_concurrently(b"a", 0));
        assert!(!r.removed_concurrently(b"a", 1));
        r.translate(b"q", 30);
        assert_eq!(r.names_len(), 0);
    }

    /// Seeded: random renames, removals, creations and writes of a few names at both sites
    /// during a split, delivered in a random interleaving: both trees end equal.
    #[test]
    fn random_splits_of_names_end_with_equal_trees() {
        let seeds: u64 = std::env::var("MIRRORFS_RECONCILE_NAMES_SEEDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        let names = ["a", "b", "c", "d", "e", "d/x", "d/y", "e/x"];
        let mut failed = Vec::new();
        let mut skipped = 0u64;
        let mut reused_checked = 0u64;
        let mut why_skipped: BTreeMap<&str, u64> = BTreeMap::new();
        let mut excluded_differ: BTreeMap<&str, u64> = BTreeMap::new();
        // Excluded splits still checked for the first invariant: a write held at the end of
        // the split is in at least one tree after the heal (asserted), and counted when it
        // is in only one of them (the trees differ: a listed non-convergence, no loss).
        let mut excluded_one_site = 0u64;
        // The cases the table in `docs/protocol.md` lists as not reconciled.
        let excluded = |ops: &[(usize, R)], dir_renames: &[(usize, &str, &str)]| {
            let made_at = |site: usize, n: &str| {
                ops.iter().any(|(s, r)| {
                    *s == site
                        && matches!(r, R::Create(t) | R::Mkdir(t) | R::Rename(_, t)
                            | R::Symlink(t, _) if *t == n)
                })
            };
            // Two files given one name, one of them renamed at both sites too, or its name made
            // again at the site that renamed it away.
            let entangled = |site: usize, f: &str| {
                made_at(site, f)
                    || ops
                        .iter()
                        .any(|(s, r)| *s != site && matches!(r, R::Rename(g, _) if *g == f))
            };
            let undone_at = |site: usize, n: &str| {
                ops.iter().any(|(s, r)| {
                    *s == site
                        && matches!(r, R::Unlink(t) | R::Rmdir(t) | R::Rename(t, _) if *t == n)
                })
            };
            let touched_at = |site: usize, n: &str| {
                ops.iter().any(|(s, r)| {
                    *s == site
                        && match r {
                            R::Write(p, _)
                            | R::Unlink(p)
                            | R::Rmdir(p)
                            | R::Create(p)
                            | R::Mkdir(p)
                            | R::Symlink(p, _) => *p == n,
                            R::Rename(f, t) | R::Exchange(f, t) => *f == n || *t == n,
                            R::Whole(..) => false,
                        }
                })
            };
            // At or beneath `n`, or beneath a name renamed to it at the same site.
            let touched_near = |site: usize, n: &str| {
                let mut names = vec![n];
                names.extend(ops.iter().filter_map(|(s, r)| match r {
                    R::Rename(f, t) if *s == 1 - site && *t == n => Some(*f),
                    _ => None,
                }));
                ops.iter().any(|(s, r)| {
                    *s == site
                        && names.iter().any(|m| {
                            let near = |p: &str| p == *m || p.starts_with(&format!("{m}/"));
                            match r {
                                R::Write(p, _)
                                | R::Unlink(p)
                                | R::Rmdir(p)
                                | R::Create(p)
                                | R::Mkdir(p)
                                | R::Symlink(p, _) => near(p),
                                R::Rename(f, t) | R::Exchange(f, t) => near(f) || near(t),
                                R::Whole(..) => false,
                            }
                        })
                })
            };
            let _ = touched_at;
            // (Directories given one new name at both sites are reconciled since.)
            let _ = dir_renames;
            let reused = ops.iter().any(|(s, r)| match r {
                // Two entries given one name at both sites, one of them by a rename; a name
                // removed or renamed away at one site and made again there (a new entry under
                // the old name) while the other site changes it; or renamed at both sites and
                // then removed at one.
                R::Unlink(n) | R::Rmdir(n) | R::Rename(n, _) => {
                    matches!(r, R::Rename(f, t) if made_at(1 - s, t)
                        && (entangled(*s, f)
                            // ... and the name given away again at either site
                            || undone_at(*s, t)
                            || undone_at(1 - s, t)
                            || ops.iter().any(|(s2, r2)| *s2 != *s
                                && matches!(r2, R::Rename(g, t2) if t2 == t && entangled(*s2, g)))))
                        || ops.iter().any(|(s2, r2)| {
                            matches!(r2, R::Rename(f2, t2) if f2 == n && undone_at(*s2, t2))
                                && ops.iter().any(|(s3, r3)| {
                                    *s3 != *s2 && matches!(r3, R::Rename(f3, _) if f3 == n)
                                })
                        })
                }
                // A name made at both sites and removed or renamed again at one of them.
                R::Create(t) | R::Mkdir(t) | R::Symlink(t, _) => {
                    made_at(1 - s, t) && (undone_at(*s, t) || undone_at(1 - s, t))
                }
                _ => false,
            });
            // A name removed or renamed away at one site and made again there while the other
            // site changes it: reconciled since (`Reconciler::peer_reused`), only counted.
            let reused_name = ops.iter().any(|(s, r)| match r {
                R::Unlink(n) | R::Rmdir(n) | R::Rename(n, _) => {
                    made_at(*s, n) && touched_near(1 - s, n)
                }
                _ => false,
            });
            let why = [(reused, "a name given to two entries")]
                .into_iter()
                .find_map(|(hit, why)| hit.then_some(why));
            (why, reused_name)
        };
        // Seeds that found bugs: always run (a peer write of a file we then renamed onto a name
        // we had removed was taken for the removed file's, `peer_data_record`'s `translated`).
        // The compound splits reconciled since (listed in `KNOWN_TO_DIFFER` before) too.
        const SEEDS_THAT_FOUND_BUGS: [u64; 9] = [
            48_887, 93_539, 235_452, 244_816, 352_912, 394_957, 464_963, 500_367, 575_881,
        ];
        // Seeds that still end with different trees: compound splits (a name removed or renamed
        // away and made again, or given to two entries, combined with a rename of its directory
        // or a second making), found by a run of 1,000,000 seeds; `docs/protocol.md` lists them
        // as not reconciled. Counted as excluded, not checked.
        // (Reconciled since: 394,957 and 464,963, a write of a file renamed then removed,
        // `Reconciler::removed_since_moved`; 235,452, a name renamed away, made and removed
        // again, `Reconciler::renamed_away_before_removal`; 500,367, a file removed and its
        // name made a directory, `Local::MadeDir` after `Local::Removed` a reuse; 575,881, a
        // file made under the name of a removed directory a change brings back, `Site::remake`.)
        const KNOWN_TO_DIFFER: [u64; 4] = [690_377, 795_747, 795_751, 899_787];
        // The same for the runs with symlinks (their streams differ): compound splits that
        // involve no symlink — the outcome is the same with the symlink ops left out (seed
        // 14,713: `d/x` renamed away, made again as a directory and removed again at one
        // site, removed at the other). Counted as excluded, not checked.
        //
        // Found by the first 1,000,000-seed run after the symlink and compound-split branches
        // were merged (16 of the 1,000,000 runs with symlinks; neither branch's own run
        // reached them), not reconciled yet:
        // - an entry removed at one site and renamed at the other (the rename wins, the entry
        //   comes back under its new name), where the remover gives that new name another
        //   entry, a symlink or a file, one of the two a symlink: 57,756, 356,415, 416,661,
        //   421,066, 505,861, 583,284, 835,344, 865,300 (the give-back of a symlink is not a
        //   data rewrite; the renamed entry against the remover's new one is not an
        //   `EntryClash` once its source is gone here);
        // - the directory classes of `KNOWN_TO_DIFFER` met again in these other streams: a
        //   directory made at both sites beneath a directory one renamed (799,566, 992,996, as
        //   690,377); a directory renamed onto a name the other gave a file it moved out of it
        //   (57,809, as 795,747); a rename of a directory against a removal and a rename onto
        //   a name in it (264,803, 880,873);
        // - a symlink or file made again under a removed name, written or renamed at the other
        //   site, and renamed on (74,471, 540,264, 630,373).
        const KNOWN_TO_DIFFER_WITH_LINKS: [u64; 17] = [
            14_713, 57_756, 57_809, 74_471, 264_803, 356_415, 416_661, 421_066, 505_861, 540_264,
            583_284, 630_373, 799_566, 835_344, 865_300, 880_873, 992_996,
        ];
        // The same for the runs with exchanges (branch `exchange`; found by a run of 1,000,000
        // seeds after the exchange row, with an exchange counted as its two renames by the
        // exclusions above): not reconciled yet, counted as excluded, not checked:
        // - a directory made at both sites beneath a directory one of them exchanged (as
        //   690,377 for a rename): 10 seeds;
        // - a name removed and made again at one site, with an exchange of it or of its
        //   directory at either site (168,643, 172,819);
        // (Reconciled since: a directory exchanged with another entry at one site while the
        // other site removes it, emptied first or after a write in it — 20 seeds, 3 of them
        // losing that write (235,067 and 832,708 still after the two fixes below): the peer's
        // rename of a name that holds its
        // directory we removed (`regained`) carries that name on, so its give-back beneath the
        // new name makes the directory again.)
        // (Reconciled since, two compound splits met there without an exchange, each losing a
        // write: 213,715, a name removed and made again at one site, written at both and
        // removed at the other — the remover's entry of the old file goes with its removal,
        // `Reconciler::drop_removed_entry`; 508,052, a directory made at one site and given by
        // a rename at the other, with a rename in the old directory — the peer's names beneath
        // its held directory go through our renames that followed its rename, and a name a
        // peer rename moved is not moved again by our renames before it, `Moved::current_after`.)
        // 619,859 (no exchange in its ops): found when the model began to hold the peer's
        // directory under its own name (`e.held`, as the shell does) and set it aside later:
        // a directory renamed (`d` → `e`) at one site onto a name the other made, then a name
        // in it removed (`e/x`) — the removal does not reach the holder's set-aside copy
        // (`e.conflict/x` stays there; nothing lost).
        const KNOWN_TO_DIFFER_WITH_EXCHANGES: [u64; 13] = [
            29_354, 48_512, 168_643, 172_819, 197_154, 285_870, 589_420, 619_859, 751_941, 756_688,
            792_870, 838_638, 867_436,
        ];
        // `MIRRORFS_RECONCILE_NAMES_SHOW=SEED,SEED`: only these seeds, none excluded, each
        // printed with its ops and both trees (to study a case).
        let show_only: Option<Vec<u64>> = std::env::var("MIRRORFS_RECONCILE_NAMES_SHOW")
            .ok()
            .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect());
        // `MIRRORFS_RECONCILE_NAMES_ONE_SITE=1`: each excluded split that keeps a write at one
        // site only printed with its ops and both trees after the heal (to group them).
        let show_one_site = std::env::var_os("MIRRORFS_RECONCILE_NAMES_ONE_SITE").is_some();
        let show_tree = |t: &BTreeMap<Vec<u8>, Option<String>>| {
            t.iter()
                .map(|(k, v)| format!("{}={v:?}", String::from_utf8_lossy(k)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let extra = SEEDS_THAT_FOUND_BUGS.into_iter().filter(|&s| s >= seeds);
        let all: Vec<u64> = match &show_only {
            Some(list) => list.clone(),
            None => (0..seeds).chain(extra).collect(),
        };
        // Each seed twice: as before (its ops unchanged, so the seeds listed above stay what
        // they were), and with symlinks (`links`: `c` a symlink at the start, and `ln -s`
        // among the makings; renames of them come with the renames).
        // And a third time with exchanges (`xchg`: half the renames are
        // `renameat2(RENAME_EXCHANGE)` of two existing names, files or directories).
        let mut runs = 0u64;
        let mut links_checked = 0u64;
        let mut xchg_checked = 0u64;
        // Checked runs in which a write present at its site at the end of the split is in
        // neither or only one tree after the heal: (runs, of them with an exchange).
        let mut lost = (0u64, 0u64);
        for (seed, links, xchg) in all
            .into_iter()
            .flat_map(|s| [(s, false, false), (s, true, false), (s, false, true)])
        {
            runs += 1;
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ if links { 0x5EED_0F11_4C5E_7A11 } else { 0 }
                ^ if xchg { 0x0E8C_4A26_E5EE_D000 } else { 0 };
            let mut pick = |n: usize| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) % n as u64) as usize
            };
            let mut base: Vec<(&str, Option<&str>)> =
                vec![("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
            if links {
                base.push(("c", Some("@x")));
            }
            let (mut s1, mut s2) = (Site::new(1, 2, &base), Site::new(2, 1, &base));
            let mut ops = Vec::new();
            // The renames of a directory: (site, from, to).
            let mut dir_renames: Vec<(usize, &str, &str)> = Vec::new();
            for k in 0..(2 + pick(5)) {
                let site = pick(2);
                let n = names[pick(names.len())];
                let m = names[pick(names.len())];
                let text: &'static str = Box::leak(format!("w{seed}-{k}").into_boxed_str());
                let rec = match pick(6) {
                    0 | 1 => R::Write(n, text),
                    2 if xchg && pick(2) == 0 => {
                        // Two names the site has (else the exchange would fail there).
                        let t = if site == 0 { &s1.tree } else { &s2.tree };
                        let have: Vec<&'static str> = names
                            .iter()
                            .copied()
                            .filter(|p| t.contains_key(p.as_bytes()))
                            .collect();
                        match have.len() {
                            0 | 1 => R::Exchange(n, m),
                            k => R::Exchange(have[pick(k)], have[pick(k)]),
                        }
                    }
                    2 => R::Rename(n, m),
                    3 => R::Unlink(n),
                    4 => R::Rmdir(n),
                    _ if links => match pick(3) {
                        0 => R::Create(n),
                        1 => R::Mkdir(n),
                        _ => R::Symlink(n, ["x", "y"][pick(2)]),
                    },
                    _ => {
                        if pick(2) == 0 {
                            R::Create(n)
                        } else {
                            R::Mkdir(n)
                        }
                    }
                };
                let s = if site == 0 { &mut s1 } else { &mut s2 };
                // Only what the local tree allows (a rename never onto an existing name nor into
                // itself).
                let valid = match &rec {
                    // (An exchange needs both names; `apply` refuses it otherwise.)
                    R::Exchange(f, t) => f != t,
                    R::Rename(f, t) => {
                        f != t
                            && !t.starts_with(&format!("{f}/"))
                            && !s.tree.contains_key(t.as_bytes())
                    }
                    _ => true,
                };
                let dir_source = matches!(&rec, R::Rename(f, _)
                    if matches!(s.tree.get(f.as_bytes()), Some(None)));
                if valid && s.apply(&rec.clone()) {
                    // Undo the trial and journal it properly.
                    if let (true, R::Rename(f, t)) = (dir_source, &rec) {
                        dir_renames.push((site, *f, *t));
                    }
                    ops.push((site, rec));
                }
                let _ = &mut s.tree;
            }
            // Replay from scratch through `local` (the trial above changed the trees).
            let (mut t1, mut t2) = (Site::new(1, 2, &base), Site::new(2, 1, &base));
            for (site, rec) in &ops {
                let s = if *site == 0 { &mut t1 } else { &mut t2 };
                s.local(rec.clone());
            }
            // To the exclusions an exchange is what the rule takes it for: two renames.
            let as_renames: Vec<(usize, R)> = ops
                .iter()
                .flat_map(|(site, r)| match r {
                    R::Exchange(f, t) => vec![(*site, R::Rename(f, t)), (*site, R::Rename(t, f))],
                    r => vec![(*site, r.clone())],
                })
                .collect();
            let (why, reused_name) = excluded(&as_renames, &dir_renames);
            // The writes each site still holds at the end of the split: none may be lost.
            let written = |t: &BTreeMap<Vec<u8>, Option<String>>| -> BTreeSet<String> {
                t.values()
                    .flatten()
                    .filter(|c| c.starts_with('w'))
                    .cloned()
                    .collect()
            };
            let held: BTreeSet<String> = written(&t1.tree)
                .union(&written(&t2.tree))
                .cloned()
                .collect();
            let exchanged = ops.iter().any(|(_, r)| matches!(r, R::Exchange(..)));
            let why = why.or_else(|| {
                (!links && !xchg && KNOWN_TO_DIFFER.contains(&seed)
                    || links && KNOWN_TO_DIFFER_WITH_LINKS.contains(&seed)
                    || xchg && KNOWN_TO_DIFFER_WITH_EXCHANGES.contains(&seed))
                .then_some("compound splits known to differ")
            });
            if show_only.is_some() {
                eprintln!("seed {seed} (excluded: {why:?}): {ops:?}");
            } else if let Some(why) = why {
                skipped += 1;
                *why_skipped.entry(why).or_default() += 1;
                // Counted, not asserted: how many of the excluded still end with different
                // trees (the exclusion is wider than what differs).
                let order: Vec<bool> = (0..40).map(|_| pick(2) == 0).collect();
                let (t1, t2) = heal(t1, t2, &order);
                *excluded_differ.entry(why).or_default() += u64::from(t1.tree != t2.tree);
                let somewhere: BTreeSet<String> = written(&t1.tree)
                    .union(&written(&t2.tree))
                    .cloned()
                    .collect();
                let nowhere: Vec<&String> = held.difference(&somewhere).collect();
                if !nowhere.is_empty() {
                    failed.push(format!(
                        "seed {seed} (excluded: {why}; links {links}, exchanges {xchg}): writes lost at both sites: {nowhere:?}: {ops:?}"
                    ));
                }
                let both: BTreeSet<String> = written(&t1.tree)
                    .intersection(&written(&t2.tree))
                    .cloned()
                    .collect();
                let one_site: Vec<&String> = held.difference(&both).collect();
                if !one_site.is_empty() {
                    excluded_one_site += 1;
                    if show_one_site {
                        eprintln!(
                            "one site only: seed {seed} (excluded: {why}; links {links}, exchanges {xchg}): {one_site:?}: {ops:?}\n  site 1: {}\n  site 2: {}",
                            show_tree(&t1.tree),
                            show_tree(&t2.tree)
                        );
                    }
                }
                continue;
            }
            reused_checked += u64::from(reused_name);
            links_checked += u64::from(
                links
                    && ops
                        .iter()
                        .any(|(_, r)| matches!(r, R::Symlink(..) | R::Rename("c", _))),
            );
            let order: Vec<bool> = (0..40).map(|_| pick(2) == 0).collect();
            let (t1, t2) = heal(t1, t2, &order);
            xchg_checked += u64::from(exchanged);
            let kept = written(&t1.tree)
                .intersection(&written(&t2.tree))
                .cloned()
                .collect::<BTreeSet<_>>();
            let gone: Vec<&String> = held.difference(&kept).collect();
            if !gone.is_empty() {
                lost.0 += 1;
                lost.1 += u64::from(exchanged);
            }
            if show_only.is_some() {
                eprintln!(
                    "  order {order:?}\n  equal: {}, writes lost: {gone:?}",
                    t1.tree == t2.tree
                );
            }
            if t1.tree != t2.tree || !gone.is_empty() {
                let show = show_tree;
                failed.push(format!(
                    "seed {seed}{}{}{}: {ops:?}\n  site 1: {}\n  site 2: {}",
                    if links { " (links)" } else { "" },
                    if xchg { " (exchanges)" } else { "" },
                    if t1.tree == t2.tree {
                        format!(" (equal trees, writes lost: {gone:?})")
                    } else {
                        format!(" (trees differ, writes lost: {gone:?})")
                    },
                    show(&t1.tree),
                    show(&t2.tree)
                ));
            }
        }
        eprintln!(
            "{seeds} seeds, {runs} splits (each seed plain, with symlinks, with exchanges): {} checked, {skipped} excluded (cases not reconciled)",
            runs - skipped
        );
        eprintln!("  checked with a symlink made or renamed: {links_checked}");
        eprintln!("  checked with an exchange: {xchg_checked}");
        eprintln!(
            "  checked runs that lost a write: {} ({} with an exchange)",
            lost.0, lost.1
        );
        for (why, n) in &why_skipped {
            let differ = excluded_differ.get(why).copied().unwrap_or(0);
            eprintln!("  excluded (the first that applies), {why}: {n} ({differ} of them differ)");
        }
        eprintln!(
            "  excluded runs with a write kept at one site only (none may be lost at both): {excluded_one_site}"
        );
        eprintln!("  checked with a name reused at one site (excluded before): {reused_checked}");
        assert!(
            show_only.is_some() || skipped < runs / 4,
            "{skipped} of {runs} splits excluded"
        );
        assert!(
            failed.is_empty(),
            "{} of {seeds} seeds differ:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }

    /// A file and a directory exchanged twice at the lower id (back where they were) and once
    /// at the higher, which then writes the file under its new name (seed 671,076 and 7 like
    /// it in the runs with exchanges, which kept the write at one site only, the lower id's
    /// losing the file): both sites renamed both entries, the lower id's names stay, and the
    /// write follows the file there. The peer's names after its renames (aliases of ours) are
    /// matched before our renames, which do not move them again.
    #[test]
    fn a_write_follows_a_file_exchanged_away_and_back_at_the_other_site() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        let twice = [R::Exchange("a", "d"), R::Exchange("a", "d")];
        let once = [R::Exchange("a", "d"), R::Write("d", "w")];
        check(
            &base,
            &twice,
            &once,
            &[("a", Some("w")), ("d", None), ("d/x", Some("x0"))],
            true,
        );
    }

    /// A file exchanged with a file in a directory and back at the lower id, then written,
    /// while the higher id exchanged the file with that directory (seed 252,772, which kept the
    /// write at one site only and left the hidden exchange name at the higher id): there the
    /// first exchange, carried out as renames, moves the file onto our directory, which stays;
    /// the file is held under a holding name, not removed, so the second exchange moves it back
    /// into the directory, and the write follows it. The lower id's file under the directory's
    /// name goes aside (listed).
    #[test]
    fn a_file_exchanged_onto_a_directory_and_back_at_the_other_site_keeps_its_write() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        let away_and_back = [
            R::Exchange("d/x", "a"),
            R::Exchange("a", "d/x"),
            R::Write("d/x", "w"),
        ];
        check(
            &base,
            &away_and_back,
            &[R::Exchange("a", "d")],
            &[("a", None), ("a/x", Some("w")), ("a.conflict", Some("a0"))],
            true,
        );
    }

    /// A file renamed onto a name the other site made a directory, then its directory renamed
    /// (seed 785,741, with the hold: the peer's unlink of the file under the directory's new
    /// name, moving it aside, ends the hold there): the directory stays, the file is its
    /// conflict copy.
    #[test]
    fn a_file_renamed_onto_a_directory_then_moved_with_its_directory_goes_aside() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        check(
            &base,
            &[R::Mkdir("d/y")],
            &[R::Rename("d/x", "d/y"), R::Rename("d", "e")],
            &[
                ("a", Some("a0")),
                ("e", None),
                ("e/y", None),
                ("e/y.conflict", Some("x0")),
            ],
            true,
        );
    }

    /// A file and a file in a directory exchanged twice at one site (back where they were),
    /// written and exchanged once at the other (seed 388,136, which kept the write at one
    /// site only, the twice-exchanging site losing both files): both sites renamed both
    /// entries, the lower id's names stay, and the write follows its file there.
    #[test]
    fn a_write_follows_a_file_the_other_site_exchanged_away_and_back_with_a_file_in_a_directory() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        let twice = [R::Exchange("d/x", "a"), R::Exchange("a", "d/x")];
        let once = [R::Write("a", "w"), R::Exchange("d/x", "a")];
        check(
            &base,
            &once,
            &twice,
            &[("a", Some("x0")), ("d", None), ("d/x", Some("w"))],
            true,
        );
        check(
            &base,
            &twice,
            &once,
            &[("a", Some("w")), ("d", None), ("d/x", Some("x0"))],
            true,
        );
    }

    /// A file and a file in a directory exchanged at one site, the other exchanging the file
    /// and the directory twice (back where they were) and writing the file in the directory
    /// (seed 590,374, brought by the fix for 388,136): the lower id keeps its names; the
    /// directory, moved onto its file midway (the file aside, its name removed), goes back
    /// as the peer's rename of a name our exchange moved before that removal, and the write
    /// follows its file.
    #[test]
    fn a_directory_exchanged_away_and_back_over_an_exchanged_file_goes_back() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        let once = [R::Exchange("d/x", "a")];
        let twice = [
            R::Exchange("a", "d"),
            R::Exchange("d", "a"),
            R::Write("d/x", "w"),
        ];
        check(
            &base,
            &once,
            &twice,
            &[
                ("a", Some("w")),
                ("a.conflict", Some("x0")),
                ("d", None),
                ("d/x", Some("a0")),
            ],
            true,
        );
    }

    /// A directory made at one site and exchanged with a file, the file then written, while
    /// the other site creates a file of the directory's name (seed 290,319 and 4 like it in
    /// the runs with exchanges, which kept the write at one site only): the file goes aside
    /// for the directory, and the exchange, carried out as renames for that removal, moves the
    /// peer's directory, not taken for a name removed here.
    #[test]
    fn an_exchange_of_a_directory_a_file_of_its_name_went_aside_for_applies() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        let dir = [R::Mkdir("b"), R::Exchange("a", "b"), R::Write("b", "w")];
        let file = [R::Create("b")];
        check(
            &base,
            &dir,
            &file,
            &[
                ("a", None),
                ("b", Some("w")),
                ("b.conflict", Some("")),
                ("d", None),
                ("d/x", Some("x0")),
            ],
            true,
        );
    }

    /// A file renamed at one site and exchanged with another at the other, the other file
    /// written by the renamer (seed 123,526 and 17 like it in the runs with exchanges, which
    /// kept the write at one site only): the lower id's name of the renamed file stays, and
    /// the write follows its file to the name the exchange gave it. The exchanging site
    /// applies the rename (it loses, or keeps its own) without taking the exchange's other
    /// end for the renamed file.
    #[test]
    fn a_write_follows_an_exchange_whose_other_file_the_writer_renamed() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        let renames = [R::Rename("a", "b"), R::Write("d/x", "w")];
        let exchange = [R::Exchange("d/x", "a")];
        // Site 1's names: `b` (its rename), or `d/x` (its exchange).
        check(
            &base,
            &renames,
            &exchange,
            &[("a", Some("w")), ("b", Some("a0")), ("d", None)],
            true,
        );
        check(
            &base,
            &exchange,
            &renames,
            &[("a", Some("w")), ("d", None), ("d/x", Some("a0"))],
            true,
        );
    }

    /// `a` ⇄ `d/x` at one site, `a` ⇄ `d` at the other, the file `a` written at either (seed
    /// 4,958 and about 50 like it in the runs with exchanges, which kept the write at one site
    /// only). The file `a` keeps the lower id's name (`d/x`, under the directory now `a`; or
    /// `d`), and `x0` given the directory's name goes aside. The site whose rename of `x0`
    /// onto its directory is not applied removes its source as the peer's record: streamed,
    /// that removal named `a/x` at the other site, which holds the written file there.
    #[test]
    fn a_file_exchanged_into_a_directory_the_other_site_exchanged_keeps_its_write() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        for (into, dir) in [
            (
                vec![R::Exchange("a", "d/x")],
                vec![R::Exchange("d", "a"), R::Write("d", "w")],
            ),
            (
                vec![R::Write("a", "w"), R::Exchange("a", "d/x")],
                vec![R::Exchange("a", "d")],
            ),
        ] {
            check(
                &base,
                &into,
                &dir,
                &[("a", None), ("a.conflict", Some("x0")), ("a/x", Some("w"))],
                true,
            );
            check(
                &base,
                &dir,
                &into,
                &[("a", None), ("a.conflict", Some("x0")), ("d", Some("w"))],
                true,
            );
        }
    }

    /// Both sites exchange the same two files and write one of them (seed 122,239): one move
    /// at both, no conflict of names; the writes conflict (the lower id's stays, the other's
    /// goes aside). The peer's exchange, carried out as renames against ours, leaves its old
    /// names untranslated: its write of `d/x` is of the file both moved there, not of the one
    /// our exchange moved away from it (it was lost at both sites).
    #[test]
    fn a_write_after_the_same_exchange_at_both_sites_is_of_the_same_file() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        check(
            &base,
            &[R::Exchange("a", "d/x"), R::Write("d/x", "w1")],
            &[R::Exchange("d/x", "a"), R::Write("d/x", "w2")],
            &[
                ("a", Some("x0")),
                ("d", None),
                ("d/x", Some("w1")),
                ("d/x.conflict", Some("w2")),
            ],
            true,
        );
    }

    /// An exchange of `a` and `b` at one site while the other writes, removes or renames one
    /// of them (`docs/protocol.md`, the row "an exchange"): to the rule it is two renames. A
    /// write follows its file (nothing listed); a removal loses to the move (the file comes
    /// back under its new name, listed); a rename at both sites keeps the lower id's name
    /// (listed); away and back at one site, a write at the other lands in the file.
    #[test]
    fn an_exchange_is_two_renames_to_the_rule() {
        let base = [("a", Some("a0")), ("b", Some("b0"))];
        let x = || R::Exchange("a", "b");
        check(
            &base,
            &[x()],
            &[R::Write("a", "w")],
            &[("a", Some("b0")), ("b", Some("w"))],
            false,
        );
        check(
            &base,
            &[R::Write("b", "w")],
            &[x()],
            &[("a", Some("w")), ("b", Some("a0"))],
            false,
        );
        for (at1, at2) in [
            (vec![x()], vec![R::Unlink("a")]),
            (vec![R::Unlink("a")], vec![x()]),
        ] {
            check(
                &base,
                &at1,
                &at2,
                &[("a", Some("b0")), ("b", Some("a0"))],
                true,
            );
        }
        // Site 1's name stays: `c` (its rename), or `b` (its exchange).
        check(
            &base,
            &[R::Rename("a", "c")],
            &[x()],
            &[("a", Some("b0")), ("c", Some("a0"))],
            true,
        );
        check(
            &base,
            &[x()],
            &[R::Rename("a", "c")],
            &[("a", Some("b0")), ("b", Some("a0"))],
            true,
        );
        check(
            &base,
            &[x(), R::Exchange("b", "a")],
            &[R::Write("a", "w")],
            &[("a", Some("w")), ("b", Some("b0"))],
            false,
        );
        // The decision itself: as sent while nothing of ours is unseen, else as renames
        // through the hidden name beside `a`.
        let mut r = site(2, 1);
        assert_eq!(r.peer_exchange(b"d/a", b"b", 0), ExchangeDecision::Apply);
        r.local_change(1, &Local::Removed(b("c")));
        let via = exchange_via(b"d/a", b"b");
        assert!(via.starts_with(b"d/.mirrorfs-exchange-"), "{via:?}");
        assert_eq!(
            r.peer_exchange(b"d/a", b"b", 0),
            ExchangeDecision::Renames { via }
        );
        assert_eq!(r.peer_exchange(b"d/a", b"b", 1), ExchangeDecision::Apply);
    }

    /// A crash of the site that carries a peer's exchange out as three renames, after 1, 2 or
    /// all 3 of them and before the record is acknowledged: the record comes again, to a
    /// machine rebuilt from the notes and our journal, and the exchange is done once: both
    /// entries swapped, the hidden name gone (as without the crash). Before the progress was
    /// kept, the record was decided again: the hidden name taken (1 or 2 done) had it applied
    /// as sent, which failed for want of an entry; all 3 done, the renames swapped them back.
    #[test]
    fn a_crash_between_the_renames_of_an_exchange_does_it_once() {
        let base = [("a", Some("a0")), ("b", Some("b0")), ("c", Some("c0"))];
        // What of ours site 1 (the exchanger) has not seen: a removal of another name, a
        // rename of one of the exchanged entries.
        for ours in [R::Unlink("c"), R::Rename("a", "d")] {
            let mut whole = Site::new(2, 1, &base);
            whole.local(ours.clone());
            whole.peer(&R::Exchange("a", "b"), 0);
            let via = exchange_via(b"a", b"b");
            assert!(!whole.tree.contains_key(&via), "{:?}", whole.tree);
            for crash in 1..=3u8 {
                let mut s = Site::new(2, 1, &base);
                s.local(ours.clone());
                s.save_notes();
                s.crash_after = Some(crash);
                s.peer(&R::Exchange("a", "b"), 0);
                // Nothing acknowledged: the watermark and the peer's position as before it.
                s.restart(0, 0);
                s.peer(&R::Exchange("a", "b"), 0);
                assert_eq!(
                    s.tree, whole.tree,
                    "{ours:?}, a crash after {crash} step(s)"
                );
                // And once acknowledged, the progress is forgotten.
                s.r.peer_acknowledged(1);
                assert_eq!(s.r.exchange_done(1), 0);
            }
        }
    }

    /// Two entries given one new name `n` at both sites, one of them a symlink (made with
    /// `ln -s`, or renamed onto `n`), the other a file (created, written or not, or renamed
    /// there) or a symlink with another target: the lower id's entry stays at `n` at both
    /// sites, the higher id's goes to the conflict copy (a symlink with its target), listed;
    /// two symlinks to one target are one.
    #[test]
    fn a_symlink_and_another_entry_given_one_name_keep_the_lower_ids() {
        let base = [("a", Some("a0")), ("s", Some("@x"))];
        let cases: Vec<(Vec<R>, Vec<R>, Tree)> = vec![
            (
                vec![R::Symlink("n", "x")],
                vec![R::Create("n"), R::Write("n", "new")],
                vec![
                    ("a", Some("a0")),
                    ("n", Some("@x")),
                    ("n.conflict", Some("new")),
                    ("s", Some("@x")),
                ],
            ),
            (
                vec![R::Create("n"), R::Write("n", "new")],
                vec![R::Symlink("n", "y")],
                vec![
                    ("a", Some("a0")),
                    ("n", Some("new")),
                    ("n.conflict", Some("@y")),
                    ("s", Some("@x")),
                ],
            ),
            (
                vec![R::Symlink("n", "x")],
                vec![R::Create("n")],
                vec![
                    ("a", Some("a0")),
                    ("n", Some("@x")),
                    ("n.conflict", Some("")),
                    ("s", Some("@x")),
                ],
            ),
            (
                vec![R::Symlink("n", "x")],
                vec![R::Symlink("n", "y")],
                vec![
                    ("a", Some("a0")),
                    ("n", Some("@x")),
                    ("n.conflict", Some("@y")),
                    ("s", Some("@x")),
                ],
            ),
            (
                vec![R::Rename("s", "n")],
                vec![R::Create("n"), R::Write("n", "new")],
                vec![
                    ("a", Some("a0")),
                    ("n", Some("@x")),
                    ("n.conflict", Some("new")),
                ],
            ),
            (
                vec![R::Create("n"), R::Write("n", "new")],
                vec![R::Rename("s", "n")],
                vec![
                    ("a", Some("a0")),
                    ("n", Some("new")),
                    ("n.conflict", Some("@x")),
                ],
            ),
            (
                vec![R::Rename("a", "n")],
                vec![R::Symlink("n", "y")],
                vec![
                    ("n", Some("a0")),
                    ("n.conflict", Some("@y")),
                    ("s", Some("@x")),
                ],
            ),
            (
                vec![R::Symlink("n", "y")],
                vec![R::Rename("a", "n")],
                vec![
                    ("n", Some("@y")),
                    ("n.conflict", Some("a0")),
                    ("s", Some("@x")),
                ],
            ),
            (
                vec![R::Rename("s", "n")],
                vec![R::Rename("a", "n")],
                vec![("n", Some("@x")), ("n.conflict", Some("a0"))],
            ),
            (
                vec![R::Rename("a", "n")],
                vec![R::Rename("s", "n")],
                vec![("n", Some("a0")), ("n.conflict", Some("@x"))],
            ),
        ];
        for (at1, at2, want) in cases {
            check(&base, &at1, &at2, &want, true);
        }
        // One target: one entry, nothing listed.
        let one = [("a", Some("a0")), ("n", Some("@x")), ("s", Some("@x"))];
        check(
            &base,
            &[R::Symlink("n", "x")],
            &[R::Symlink("n", "x")],
            &one,
            false,
        );
    }

    /// [`Reconciler::peer_entry_clash`]'s bookkeeping: a name we gave an entry during the
    /// split clashes with the peer's making of it until the peer has seen ours; the lower id
    /// lists it once and skips the peer's records of its own entry; the higher id, once its
    /// entry went aside, has no claim on the name; a rename moves the claim, a removal drops
    /// it; the journal's replay after a restart rebuilds it.
    #[test]
    fn an_entry_given_a_name_clashes_until_the_peer_has_seen_it() {
        let journal = [
            (5, Local::Made(b("n"))),
            (
                6,
                Local::Rename {
                    from: b("s"),
                    to: b("m"),
                    exchange: false,
                },
            ),
            (7, Local::Made(b("k"))),
            (8, Local::Removed(b("k"))),
        ];
        let mut low = site(1, 2);
        for (seq, c) in &journal {
            low.local_change(*seq, c);
        }
        assert_eq!(
            low.peer_entry_clash(b"n", 4),
            EntryClash::Ours { first: true }
        );
        assert_eq!(
            low.peer_entry_clash(b"n", 4),
            EntryClash::Ours { first: false }
        );
        // The peer's records of its own `n`, journaled before it saw ours, are skipped.
        assert!(matches!(
            low.peer_data(b"n", 4),
            (_, Decision::Skip { rewrite: false, .. })
        ));
        assert_eq!(
            low.peer_entry_clash(b"m", 4),
            EntryClash::Ours { first: true }
        );
        assert_eq!(low.peer_entry_clash(b"s", 4), EntryClash::Apart);
        assert_eq!(low.peer_entry_clash(b"k", 4), EntryClash::Apart);
        assert_eq!(low.peer_entry_clash(b"n", 5), EntryClash::Apart, "seen");
        assert_eq!(
            low.peer_entry_clash(b"m", 5),
            EntryClash::Ours { first: false }
        );
        assert_eq!(low.peer_entry_clash(b"m", 6), EntryClash::Apart, "seen");
        let mut high = site(2, 1);
        for (seq, c) in &journal {
            high.local_change(*seq, c);
        }
        assert_eq!(high.peer_entry_clash(b"n", 4), EntryClash::Theirs);
        high.entry_set_aside(b"n");
        assert_eq!(high.peer_entry_clash(b"n", 4), EntryClash::Apart);
        assert_eq!(high.peer_entry_clash(b"m", 4), EntryClash::Theirs);
        // A restart: the replay of the journal after the watermark gives the same decisions.
        let mut again = Reconciler::new(Config::new(2, 1), 0);
        for (seq, c) in &journal {
            again.local_change(*seq, c);
        }
        assert_eq!(again.peer_entry_clash(b"n", 4), EntryClash::Theirs);
        assert_eq!(again.peer_entry_clash(b"k", 4), EntryClash::Apart);
    }

    /// A tree as `check` expects it.
    type Tree = Vec<(&'static str, Option<&'static str>)>;

    /// Renames at both sites of a directory and of a name in it (or into or out of it): the
    /// other site's names are translated through each site's own unseen renames, so both end
    /// with both renames applied; nothing listed.
    #[test]
    fn renames_of_a_directory_and_of_a_name_in_it_both_apply() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        let cases: [(Vec<R>, Vec<R>, Tree); 5] = [
            // d → e at one site, d/x → d/y at the other.
            (
                vec![R::Rename("d", "e")],
                vec![R::Rename("d/x", "d/y")],
                vec![("a", Some("a0")), ("e", None), ("e/y", Some("x0"))],
            ),
            // d/x moved out of d (→ z).
            (
                vec![R::Rename("d", "e")],
                vec![R::Rename("d/x", "z")],
                vec![("a", Some("a0")), ("e", None), ("z", Some("x0"))],
            ),
            // a moved into d (→ d/z).
            (
                vec![R::Rename("d", "e")],
                vec![R::Rename("a", "d/z")],
                vec![("e", None), ("e/x", Some("x0")), ("e/z", Some("a0"))],
            ),
            // The file renamed, then written under its new name; the directory renamed twice.
            (
                vec![R::Rename("d", "e"), R::Rename("e", "f")],
                vec![R::Rename("d/x", "d/y"), R::Write("d/y", "w")],
                vec![("a", Some("a0")), ("f", None), ("f/y", Some("w"))],
            ),
            // A directory made in d, then the file moved into it.
            (
                vec![R::Rename("d", "e")],
                vec![R::Mkdir("d/s"), R::Rename("d/x", "d/s/x")],
                vec![
                    ("a", Some("a0")),
                    ("e", None),
                    ("e/s", None),
                    ("e/s/x", Some("x0")),
                ],
            ),
        ];
        for (dir_site, name_site, expect) in &cases {
            check(&base, dir_site, name_site, expect, false);
            check(&base, name_site, dir_site, expect, false);
        }
        // The file renamed at both sites, at one under the directory's new name: one file
        // renamed at both sites (the lower id's name stays, listed), in the renamed directory.
        let (via_dir, direct) = (
            vec![R::Rename("d", "e"), R::Rename("e/x", "e/y")],
            vec![R::Rename("d/x", "d/z")],
        );
        let want = |n| [("a", Some("a0")), ("e", None), (n, Some("x0"))];
        check(&base, &via_dir, &direct, &want("e/y"), true);
        check(&base, &direct, &via_dir, &want("e/z"), true);
    }

    /// A directory given one new name at both sites (a rename of a directory at one, a rename
    /// of another directory or a mkdir at the other): the lower id's stays at the name, the
    /// higher id's goes aside to a conflict name with its contents (listed); at the lower id
    /// the peer's directory is held under a name of its own until that rename arrives.
    #[test]
    fn a_directory_given_one_new_name_at_both_sites_keeps_the_lower_ids() {
        let base = [
            ("a", Some("a0")),
            ("d", None),
            ("d/x", Some("x0")),
            ("g", None),
            ("g/z", Some("z0")),
        ];
        let rest = |mut v: Vec<(&'static str, Option<&'static str>)>, keep_d: bool| {
            v.push(("a", Some("a0")));
            if keep_d {
                v.extend([("d", None), ("d/x", Some("x0"))]);
            }
            v
        };
        // Site 1 renames d → n; site 2 makes n and fills it.
        let (mv, mk) = (
            vec![R::Rename("d", "n")],
            vec![R::Mkdir("n"), R::Create("n/q"), R::Write("n/q", "q1")],
        );
        let base_g = [("g", None), ("g/z", Some("z0"))];
        let want = rest(
            vec![
                ("n", None),
                ("n/x", Some("x0")),
                ("n.conflict", None),
                ("n.conflict/q", Some("q1")),
            ],
            false,
        );
        let with_g = |mut v: Vec<(&'static str, Option<&'static str>)>| {
            v.extend(base_g);
            v
        };
        check(&base, &mv, &mk, &with_g(want), true);
        // The other way round: site 1's new directory stays, site 2's renamed one goes aside.
        let want = rest(
            vec![
                ("n", None),
                ("n/q", Some("q1")),
                ("n.conflict", None),
                ("n.conflict/x", Some("x0")),
            ],
            false,
        );
        check(&base, &mk, &mv, &with_g(want), true);
        // Two directories renamed to n; site 2 also writes d/x, which follows site 1's rename,
        // and writes into its own n after its rename.
        let want = rest(
            vec![
                ("n", None),
                ("n/x", Some("x2")),
                ("n.conflict", None),
                ("n.conflict/z", Some("z2")),
            ],
            false,
        );
        check(
            &base,
            &[R::Rename("d", "n")],
            &[
                R::Write("d/x", "x2"),
                R::Rename("g", "n"),
                R::Write("n/z", "z2"),
            ],
            &want,
            true,
        );
        let want = rest(
            vec![
                ("n", None),
                ("n/z", Some("z1")),
                ("n.conflict", None),
                ("n.conflict/x", Some("x0")),
            ],
            false,
        );
        check(
            &base,
            &[R::Rename("g", "n"), R::Write("n/z", "z1")],
            &[R::Rename("d", "n")],
            &want,
            true,
        );
        // The loser renames its directory away before the winner's arrives: no clash left
        // there, the held directory follows the rename at the winner; nothing listed.
        let want = rest(
            vec![
                ("n", None),
                ("n/x", Some("x0")),
                ("m", None),
                ("m/q", Some("")),
            ],
            false,
        );
        check(
            &base,
            &[R::Rename("d", "n")],
            &[R::Mkdir("n"), R::Create("n/q"), R::Rename("n", "m")],
            &with_g(want),
            false,
        );
        let _ = rest(Vec::new(), true);
    }

    /// A directory renamed onto a name the other site gave a file (created, or renamed
    /// there): the directory stays at both sites, whatever the ids; the file goes to a
    /// conflict copy (listed).
    #[test]
    fn a_directory_renamed_onto_a_name_given_a_file_keeps_the_directory() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        let cases: [(Vec<R>, Tree); 3] = [
            (
                vec![R::Create("n"), R::Write("n", "w")],
                vec![
                    ("a", Some("a0")),
                    ("n", None),
                    ("n/x", Some("x0")),
                    ("n.conflict", Some("w")),
                ],
            ),
            (
                vec![R::Rename("a", "n")],
                vec![("n", None), ("n/x", Some("x0")), ("n.conflict", Some("a0"))],
            ),
            // The file renamed out of the very directory.
            (
                vec![R::Rename("d/x", "n")],
                vec![("a", Some("a0")), ("n", None), ("n.conflict", Some("x0"))],
            ),
        ];
        for (file_site, want) in &cases {
            let dir_site = vec![R::Rename("d", "n")];
            check(&base, &dir_site, file_site, want, true);
            check(&base, file_site, &dir_site, want, true);
        }
    }

    /// A directory made at both sites, the higher id's removed again there (empty): the
    /// lower id holds the peer's under a holding name until its rmdir arrives, which removes
    /// the holding name, not ours; at the higher id ours went aside for the lower id's, then
    /// the rmdir removed its own. One directory at both sites, whatever was in ours.
    #[test]
    fn a_peer_rmdir_of_a_held_directory_removes_the_holding_name() {
        let base = [("a", Some("a0"))];
        for filled in [false, true] {
            let mut mk = vec![R::Mkdir("n")];
            if filled {
                mk.extend([R::Create("n/f"), R::Write("n/f", "f1")]);
            }
            let rm = [R::Mkdir("n"), R::Rmdir("n")];
            let mut want = vec![("a", Some("a0")), ("n", None)];
            if filled {
                want.push(("n/f", Some("f1")));
            }
            // Site 1 (lower) keeps its n and holds the peer's until its rmdir: nothing listed.
            check(&base, &mk, &rm, &want, false);
            // Site 2 (higher) moves its n aside for site 1's, whose rmdir then applies.
            let mut want = vec![("a", Some("a0")), ("n.conflict", None)];
            if filled {
                want.push(("n.conflict/f", Some("f1")));
            }
            check(&base, &rm, &mk, &want, true);
        }
        // The machine: the peer's rmdir of the held name names the holding name however often
        // it is translated.
        let mut w = site(1, 2);
        w.local_change(5, &Local::MadeDir(b("n")));
        w.hold(b"n", b"n.c", 5);
        let rmdir = |p: &str| Op::Rmdir {
            path: RelPath::new(b(p)).expect("a valid name"),
        };
        for _ in 0..3 {
            assert_eq!(w.translate_op(&rmdir("n"), 4), Ok(Some(rmdir("n.c"))));
        }
        assert_eq!(w.held_as(b"n"), Some(&b"n.c"[..]));
        // Done: the hold ends; the peer's later records of the name are for a new entry.
        w.peer_rmdir_done(b"n", 4);
        assert_eq!(w.held_as(b"n"), None);
        assert_eq!(w.translate_op(&rmdir("n"), 4), Ok(None));
        assert_eq!(w.translate(b"n/q", 4), None);
        // One journaled after it considered our making is of ours: no hold ends.
        w.hold(b"n", b"n.c", 5);
        w.peer_rmdir_done(b"n", 5);
        assert_eq!(w.held_as(b"n"), Some(&b"n.c"[..]));
    }

    /// The machine: our mkdir and our rename of a directory give a name concurrently; the
    /// peer's records for its directory of the name are held (translated) until it renames it
    /// aside; the hold survives a restart through the notes.
    #[test]
    fn a_held_directory_follows_the_peers_records_and_survives_a_restart() {
        let mut w = site(1, 2);
        w.local_change(5, &Local::MadeDir(b("n")));
        assert_eq!(w.peer_dir_clash(b"n", b"n", 4), DirClash::Ours { made: 5 });
        assert_eq!(
            w.peer_dir_clash(b"n", b"n", 5),
            DirClash::Apart,
            "seen: none"
        );
        let mut l = site(2, 1);
        l.local_change(
            7,
            &Local::Rename {
                from: b("d"),
                to: b("n"),
                exchange: false,
            },
        );
        assert_eq!(l.peer_dir_clash(b"n", b"n", 3), DirClash::Theirs);
        // A mkdir renamed away or removed since gives the name to nobody.
        let mut gone = site(1, 2);
        gone.local_change(5, &Local::MadeDir(b("n")));
        gone.local_change(6, &Local::Removed(b("n")));
        assert_eq!(gone.peer_dir_clash(b"n", b"n", 1), DirClash::Apart);
        // The hold: the peer's records journaled before it considered our mkdir.
        w.hold(b"n", b"n.c", 5);
        assert_eq!(w.translate(b"n/q", 4), Some(b("n.c/q")));
        assert_eq!(w.translate(b"n", 4), Some(b("n.c")));
        assert_eq!(w.translate(b"nq", 4), None);
        assert_eq!(
            w.translate(b"n/q", 5),
            None,
            "ours after it considered ours"
        );
        let mut after = Reconciler::new(w.config(), w.seen_by_peer());
        assert!(after.restore_notes(&w.take_notes().expect("the hold is noted")));
        assert_eq!(after.translate(b"n/q", 4), Some(b("n.c/q")));
        // Its rename of the name (aside) moves the held directory, and the hold ends.
        assert_eq!(
            after.peer_rename(b"n", b"n.conflict-site2-1", 6),
            RenameDecision::Apply {
                from: b("n.c"),
                to: b("n.conflict-site2-1"),
                clash: false,
                aside: false,
            }
        );
        assert_eq!(after.translate(b"n/q", 4), None);
        // Notes written before holds existed still decode (the holds are a trailer).
        let mut old = site(1, 2);
        old.local_change(1, &Local::Removed(b("r")));
        let bytes = old.take_notes().expect("noted");
        assert!(site(1, 2).restore_notes(&bytes));
    }

    #[test]
    fn a_file_and_a_directory_of_one_name_keep_the_directory() {
        assert!(clash_moves_ours_aside(false, true));
        assert!(!clash_moves_ours_aside(true, false));
        assert!(!clash_moves_ours_aside(false, false));
    }

    /// A name reused at one site (removed, then made again there) while the other site changes
    /// the old file: the new entry keeps the name, the old file comes back as a conflict copy.
    #[test]
    fn a_name_reused_at_one_site_keeps_the_new_entry_and_the_old_file_in_a_copy() {
        let base = [("a", Some("a0")), ("c", Some("c0"))];
        for reuser in [1, 2] {
            let split = |reuse: Vec<R>, change: Vec<R>| {
                if reuser == 1 {
                    (reuse, change)
                } else {
                    (change, reuse)
                }
            };
            // Removed and created again (written, or left empty).
            let (at1, at2) = split(
                vec![R::Unlink("a"), R::Create("a"), R::Write("a", "new")],
                vec![R::Write("a", "changed")],
            );
            check(
                &base,
                &at1,
                &at2,
                &[
                    ("a", Some("new")),
                    ("a.conflict", Some("changed")),
                    ("c", Some("c0")),
                ],
                true,
            );
            let (at1, at2) = split(
                vec![R::Unlink("a"), R::Create("a")],
                vec![R::Write("a", "changed"), R::Write("a", "again")],
            );
            check(
                &base,
                &at1,
                &at2,
                &[
                    ("a", Some("")),
                    ("a.conflict", Some("again")),
                    ("c", Some("c0")),
                ],
                true,
            );
            // Removed, then another file renamed onto the name.
            let (at1, at2) = split(
                vec![R::Unlink("a"), R::Rename("c", "a")],
                vec![R::Write("a", "changed")],
            );
            check(
                &base,
                &at1,
                &at2,
                &[("a", Some("c0")), ("a.conflict", Some("changed"))],
                true,
            );
            // Renamed away, then made again: the change follows the old file to its new name.
            let (at1, at2) = split(
                vec![R::Rename("a", "b"), R::Create("a"), R::Write("a", "new")],
                vec![R::Write("a", "changed")],
            );
            check(
                &base,
                &at1,
                &at2,
                &[
                    ("a", Some("new")),
                    ("b", Some("changed")),
                    ("c", Some("c0")),
                ],
                false,
            );
        }
    }

    /// Seed 213,715: a name removed and made again at one site (then written there), while the
    /// other site writes the old file and removes it. The old file is gone at both; the new
    /// entry keeps its write at both (the remover's own write of the old file, removed since,
    /// is not concurrent with a write of the new one).
    #[test]
    fn a_file_written_and_removed_while_the_other_site_made_its_name_again_keeps_the_new_write() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        let reuse = vec![R::Unlink("d/x"), R::Create("d/x"), R::Write("d/x", "new")];
        let change = vec![R::Write("d/x", "old"), R::Unlink("d/x")];
        check_either_way(
            &base,
            &reuse,
            &change,
            &[("a", Some("a0")), ("d", None), ("d/x", Some("new"))],
            true,
        );
    }

    /// Seed 508,052: a directory made at one site (`mkdir e`) and given by a rename at the other
    /// (`d` → `e`, then a write of `e/x`), while the first renames a file in the old directory
    /// (`d/x` → `d/y`). The two directories clash (the lower id's stays at `e`, the other goes
    /// to `e.conflict`); the write follows the file to `e.conflict/y` at both.
    #[test]
    fn a_write_in_a_directory_renamed_onto_a_clash_follows_a_rename_in_it() {
        let base = [("d", None), ("d/x", Some("x0"))];
        for maker in [1, 2] {
            let made = vec![R::Mkdir("e"), R::Rename("d/x", "d/y")];
            let renamed = vec![R::Rename("d", "e"), R::Write("e/x", "new")];
            let (at1, at2) = if maker == 1 {
                (made, renamed)
            } else {
                (renamed, made)
            };
            let expect: &[(&str, Option<&str>)] = if maker == 1 {
                &[
                    ("e", None),
                    ("e.conflict", None),
                    ("e.conflict/y", Some("new")),
                ]
            } else {
                &[("e", None), ("e/y", Some("new")), ("e.conflict", None)]
            };
            check(&base, &at1, &at2, expect, true);
        }
    }

    /// As [`a_write_in_a_directory_renamed_onto_a_clash_follows_a_rename_in_it`], with an
    /// exchange in the old directory (`d/x` ⇄ `d/y`) in place of the rename: the peer's write
    /// of its `e/x` (the file it had at `d/x`) follows our exchange to `y` beneath the peer's
    /// directory, and is not moved again by our setting aside of our `e` (which came before
    /// the peer's rename here: `Moved::current_after` of the exchange).
    ///
    /// At the maker (the lower id, holding the peer's `e` as `e.conflict`), the exchange's ends
    /// need two names each, the peer's (`e/x`: its records' source) and ours (`e.conflict/y`:
    /// where the entry is), `Moved::here`; before it the maker ended with `e.conflict/y` =
    /// `x0`, the write lost there. At the other site (its `e` set aside after the exchange),
    /// without `current_after` the write went on to `e.conflict/y`.
    #[test]
    fn a_write_in_a_directory_renamed_onto_a_clash_follows_an_exchange_in_it() {
        let base = [("d", None), ("d/x", Some("x0")), ("d/y", Some("y0"))];
        for maker in [1, 2] {
            let made = vec![R::Mkdir("e"), R::Exchange("d/x", "d/y")];
            let renamed = vec![R::Rename("d", "e"), R::Write("e/x", "new")];
            let (at1, at2) = if maker == 1 {
                (made, renamed)
            } else {
                (renamed, made)
            };
            let expect: &[(&str, Option<&str>)] = if maker == 1 {
                &[
                    ("e", None),
                    ("e.conflict", None),
                    ("e.conflict/x", Some("y0")),
                    ("e.conflict/y", Some("new")),
                ]
            } else {
                &[
                    ("e", None),
                    ("e/x", Some("y0")),
                    ("e/y", Some("new")),
                    ("e.conflict", None),
                ]
            };
            check(&base, &at1, &at2, expect, true);
        }
    }

    /// As [`a_write_in_a_directory_renamed_onto_a_clash_follows_an_exchange_in_it`] (and with a
    /// rename in place of the exchange), the peer's write coming after its setting aside of its
    /// directory, through its aside name (`e.conflict/x`), having seen our `mkdir e` but not
    /// our rename or exchange: it follows ours, at the lower id after the hold ended too.
    #[test]
    fn a_write_through_the_aside_name_of_a_directory_renamed_onto_a_clash_follows_ours() {
        let base = [("d", None), ("d/x", Some("x0")), ("d/y", Some("y0"))];
        for (xchg, want) in [(false, "e.conflict/z"), (true, "e.conflict/y")] {
            for first in [true, false] {
                let mut s1 = Site::new(1, 2, &base);
                let mut s2 = Site::new(2, 1, &base);
                s1.local(R::Mkdir("e"));
                s1.local(if xchg {
                    R::Exchange("d/x", "d/y")
                } else {
                    R::Rename("d/x", "d/z")
                });
                s2.local(R::Rename("d", "e"));
                let (rec, seen) = s1.journal[0].clone();
                s2.peer(&rec, seen);
                assert!(s2.tree.contains_key(&b("e.conflict")), "{:?}", s2.tree);
                s2.local(R::Write("e.conflict/x", "later"));
                let (mut d1, mut d2) = (1usize, 0usize);
                loop {
                    let more1 = d1 < s1.journal.len();
                    let more2 = d2 < s2.journal.len();
                    if more2 && (first || !more1) {
                        let (rec, seen) = s2.journal[d2].clone();
                        d2 += 1;
                        s1.peer(&rec, seen);
                    } else if more1 {
                        let (rec, seen) = s1.journal[d1].clone();
                        d1 += 1;
                        s2.peer(&rec, seen);
                    } else {
                        break;
                    }
                }
                assert_eq!(
                    s1.tree, s2.tree,
                    "exchange {xchg}, the peer's first {first}"
                );
                assert_eq!(
                    s1.tree.get(&b(want)),
                    Some(&Some("later".to_string())),
                    "exchange {xchg}, the peer's first {first}: {:?}",
                    s1.tree
                );
            }
        }
    }

    /// Two renames of ours in a directory the peer renamed (`d/a` → `d/b` → `d/c` here, `d` →
    /// `e` and a write of `e/a` there): the write goes through both to `e/c`. The first
    /// rename's new name, not current, follows the peer's rename as the second's source does.
    #[test]
    fn a_write_in_a_directory_renamed_at_the_other_site_follows_two_renames_in_it() {
        let base = [("d", None), ("d/a", Some("a0"))];
        check_either_way(
            &base,
            &[R::Rename("d/a", "d/b"), R::Rename("d/b", "d/c")],
            &[R::Rename("d", "e"), R::Write("e/a", "new")],
            &[("e", None), ("e/c", Some("new"))],
            false,
        );
    }

    /// Seeds 235,067 and 832,708 (with exchanges): a directory written in and exchanged with a
    /// file at one site (`d/x` written, `d` ⇄ `a`) while the other empties and removes it. The
    /// exchange is two renames; the move of the directory wins over its removal: it comes back
    /// under `a` with the write, and the file is at `d`, at both.
    #[test]
    fn a_directory_written_in_and_exchanged_while_the_other_site_removes_it_keeps_the_write() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        let removes = vec![R::Unlink("d/x"), R::Rmdir("d")];
        let exchanges = vec![R::Write("d/x", "new"), R::Exchange("d", "a")];
        check_either_way(
            &base,
            &removes,
            &exchanges,
            &[("a", None), ("a/x", Some("new")), ("d", Some("a0"))],
            true,
        );
    }

    #[test]
    fn the_old_entrys_records_are_not_applied_to_the_new_one() {
        let mut r = site(2, 1);
        r.local_change(5, &Local::Removed(b("a")));
        r.local_change(6, &Local::Made(b("a")));
        let a = fnv(b"a");
        assert!(r.reused_since(a, 5), "journaled before our making");
        assert_eq!(
            r.peer_data(b"a", 3),
            (
                b("a"),
                Decision::Skip {
                    rewrite: false,
                    first: true
                }
            )
        );
        assert_eq!(
            r.peer_data(b"a", 4).1,
            Decision::Skip {
                rewrite: false,
                first: false
            },
            "listed once"
        );
        assert!(!r.peer_meta(b"a", 1, 5), "the old entry's mode");
        // A making without a removal before it, or one the peer saw: no reuse.
        r.local_change(7, &Local::Made(b("c")));
        assert!(!r.reused_since(fnv(b"c"), 0));
        assert!(r.peer_meta(b"a", 1, 6));
        assert!(!r.reused_since(a, 6));
        // The site that changed the file and kept it against the peer's removal: the peer's
        // making of the name again, concurrent with the change, takes the name (once).
        let mut c = site(1, 2);
        c.local_change(4, &Local::Data(b("a")));
        assert_eq!(
            c.peer_unlink(b"a", 2),
            (b("a"), Decision::Restore { first: true })
        );
        c.local_path(8, b"a", true);
        assert!(!c.peer_reused(b"b", 3));
        assert!(c.peer_reused(b"a", 3));
        assert!(c.peer_reused(b"a", 3), "asked again (a copy that failed)");
        c.reused_aside(b"a");
        assert!(!c.peer_reused(b"a", 3));
        assert!(c.is_empty(), "the change went with the copy");
        // Noted for a restart.
        let mut c = site(1, 2);
        c.local_change(4, &Local::Data(b("a")));
        c.peer_unlink(b"a", 2);
        let notes = c.take_notes().expect("noted");
        let mut again = site(1, 2);
        assert!(again.restore_notes(&notes));
        again.local_change(4, &Local::Data(b("a")));
        assert!(again.peer_reused(b"a", 3));
    }

    /// A file renamed away (`a` → `b`), removed under its new name, and another file renamed
    /// onto that name (`c` → `b`) at one site, while the other site writes the old file (`a`):
    /// the write, translated to `b`, is of the removed file, not of the one now at `b`. It is
    /// not applied there; the writer gives the old file back and moves it aside when the new
    /// `b` arrives (as for a name reused in place). Seeds 394,957 and 464,963.
    #[test]
    fn a_write_of_a_file_renamed_then_removed_is_not_applied_to_the_new_entry_of_its_name() {
        let base = [("a", Some("a0")), ("c", Some("c0"))];
        let reuse = vec![R::Rename("a", "b"), R::Unlink("b"), R::Rename("c", "b")];
        let change = vec![R::Write("a", "changed")];
        check_either_way(
            &base,
            &reuse,
            &change,
            &[("b", Some("c0")), ("b.conflict", Some("changed"))],
            true,
        );
    }

    /// A name renamed away (`d` → `e`) at one site, then made again and removed there, while the
    /// other site renames (`d` → `c`) or removes the old entry: the peer's record is of the
    /// entry we renamed, not of the one we removed, so it is decided as for our rename (both
    /// renamed it: the lower id's name stays; removed at the other: the rename wins). Seed
    /// 235,452.
    #[test]
    fn a_name_renamed_away_then_made_and_removed_again_still_names_the_renamed_entry() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        for renamer in [1, 2] {
            let split = |away: Vec<R>, other: Vec<R>| {
                if renamer == 1 {
                    (away, other)
                } else {
                    (other, away)
                }
            };
            let (at1, at2) = split(
                vec![R::Rename("d", "e"), R::Mkdir("d"), R::Rmdir("d")],
                vec![R::Rename("d", "c")],
            );
            let kept = if renamer == 1 { "e" } else { "c" };
            let x = format!("{kept}/x");
            check(
                &base,
                &at1,
                &at2,
                &[("a", Some("a0")), (kept, None), (&x, Some("x0"))],
                true,
            );
            let (at1, at2) = split(
                vec![R::Rename("a", "b"), R::Mkdir("a"), R::Rmdir("a")],
                vec![R::Unlink("a")],
            );
            check(
                &base,
                &at1,
                &at2,
                &[("b", Some("a0")), ("d", None), ("d/x", Some("x0"))],
                true,
            );
        }
    }

    /// A file removed at one site, a directory made under its name and removed again there,
    /// while the other site writes the file: the writer keeps its file and moves it aside when
    /// the directory arrives (a file against a directory of one name); the remover does not
    /// apply the writer's give-back, journaled before it had seen the directory, to the name
    /// (a directory made under a removed name is a new entry for the peer's data records).
    /// Both end with the file in its conflict copy. Seed 500,367.
    #[test]
    fn a_file_removed_and_its_name_made_a_directory_and_removed_keeps_the_change_aside() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        let remove = vec![R::Unlink("d/x"), R::Mkdir("d/x"), R::Rmdir("d/x")];
        let change = vec![R::Write("d/x", "changed")];
        check_either_way(
            &base,
            &remove,
            &change,
            &[
                ("a", Some("a0")),
                ("d", None),
                ("d/x.conflict", Some("changed")),
            ],
            true,
        );
    }

    /// A directory emptied and removed at one site and a file made under its name there,
    /// while the other site changes a file in it: the change wins and brings the directory
    /// back (`Reconciler::refill`); the remover's file of that name goes aside for it, as for a
    /// peer's directory of its name (the directory stays). Seed 575,881.
    #[test]
    fn a_directory_made_again_for_a_change_moves_a_file_of_its_name_aside() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        let remove = vec![R::Unlink("d/x"), R::Rmdir("d"), R::Create("d")];
        let change = vec![R::Write("d/x", "changed")];
        check_either_way(
            &base,
            &remove,
            &change,
            &[
                ("a", Some("a0")),
                ("d", None),
                ("d.conflict", Some("")),
                ("d/x", Some("changed")),
            ],
            true,
        );
    }

    /// A name made and removed again at one site (`mkdir b`, `rmdir b`; `a` → `b`, `create a`,
    /// `unlink a`) while the other site gives it an entry and then removes that entry (its
    /// file moved aside for our directory; an unlink): the later removal is of the entry we
    /// applied from the peer, not of ours, so it applies. Seed 9,939 and the variant found by
    /// `a_name_renamed_away_then_made_and_removed_again_still_names_the_renamed_entry`.
    #[test]
    fn a_peer_removal_of_its_entry_of_a_name_we_removed_applies() {
        let base = [("a", Some("a0")), ("d", None), ("d/x", Some("x0"))];
        for first in [1, 2] {
            let split = |one: Vec<R>, other: Vec<R>| {
                if first == 1 {
                    (one, other)
                } else {
                    (other, one)
                }
            };
            let (at1, at2) = split(
                vec![R::Mkdir("b"), R::Rmdir("b")],
                vec![R::Rename("a", "b")],
            );
            check(
                &base,
                &at1,
                &at2,
                &[("b.conflict", Some("a0")), ("d", None), ("d/x", Some("x0"))],
                true,
            );
            let (at1, at2) = split(
                vec![R::Rename("a", "b"), R::Create("a"), R::Unlink("a")],
                vec![R::Unlink("a")],
            );
            check(
                &base,
                &at1,
                &at2,
                &[("b", Some("a0")), ("d", None), ("d/x", Some("x0"))],
                true,
            );
        }
    }
}

#[cfg(test)]
mod links {
    //! Hard links: a peer data record (or metadata change) for one name of a file is concurrent
    //! with our unseen data change (of that attribute) of the file through another name.
    use super::*;

    fn site(me: u64, peer: u64) -> Reconciler {
        Reconciler::new(Config::new(me, peer), 0)
    }

    fn data(p: &str) -> Local {
        Local::Data(p.as_bytes().to_vec())
    }

    fn b(p: &str) -> Vec<u8> {
        p.as_bytes().to_vec()
    }

    /// Site 1 (the winner) wrote through `a`, the peer through `b`, one file (inode 99 here).
    #[test]
    fn the_winner_skips_a_write_through_another_name_and_rewrites_once() {
        let mut w = site(1, 2);
        w.local_change(10, &data("a"));
        assert!(w.wants_file(b"a"));
        w.note_file(b"a", 99);
        assert!(!w.wants_file(b"a"), "looked at once per entry");
        w.local_change(11, &data("a"));
        assert!(!w.wants_file(b"a"), "the file stays with the entry");
        assert_eq!(
            w.peer_linked_data(b"b", 99, 3, false),
            (
                Decision::Skip {
                    rewrite: true,
                    first: true
                },
                Some(b"a".to_vec())
            )
        );
        assert_eq!(
            w.peer_linked_data(b"b", 99, 3, false),
            (
                Decision::Skip {
                    rewrite: false,
                    first: false
                },
                Some(b"a".to_vec())
            )
        );
        // Before this rule the record for `b` was its own object, never concurrent.
        assert_eq!(w.clone().peer_data(b"b", 3).1, Decision::Apply);
        // Another file, or a file of one name: not concurrent.
        assert_eq!(
            w.peer_linked_data(b"c", 98, 3, false),
            (Decision::Apply, None)
        );
        assert_eq!(
            w.peer_linked_data(b"c", 0, 3, false),
            (Decision::Apply, None)
        );
        // The peer saw our writes: nothing concurrent any more.
        assert_eq!(
            w.peer_linked_data(b"b", 99, 11, false),
            (Decision::Apply, None)
        );
        assert_eq!(w.files_len(), 0);
    }

    /// Site 2 (the loser) wrote through `b`, the winner through `a`: copy once under `b`.
    #[test]
    fn the_loser_copies_its_version_under_its_own_name_once() {
        let mut l = site(2, 1);
        l.local_change(10, &data("b"));
        l.note_file(b"b", 7);
        assert_eq!(
            l.peer_linked_data(b"a", 7, 3, false),
            (Decision::CopyThenApply, Some(b"b".to_vec()))
        );
        assert_eq!(
            l.peer_linked_data(b"a", 7, 3, false),
            (Decision::Apply, Some(b"b".to_vec()))
        );
        // The winner's rewrite (through `b`), journaled after it considered our 10.
        assert_eq!(
            l.peer_linked_data(b"b", 7, 10, false),
            (Decision::Apply, None)
        );
        assert!(l.is_empty());
    }

    /// The entry keeps its file through a rename of the name, and a restart finds it again:
    /// the replay of the journal, then the names looked up again.
    #[test]
    fn the_file_follows_a_rename_and_is_looked_up_again_after_a_restart() {
        let mut w = site(1, 2);
        let journal = [
            (10, data("a")),
            (
                11,
                Local::Rename {
                    from: b"a".to_vec(),
                    to: b"d/c".to_vec(),
                    exchange: false,
                },
            ),
        ];
        for (s, c) in &journal {
            w.local_change(*s, c);
            if w.wants_file(b"a") {
                w.note_file(b"a", 5);
            }
        }
        let mut again = Reconciler::new(Config::new(1, 2), 0);
        for (s, c) in &journal {
            again.local_change(*s, c);
        }
        assert_eq!(again.unfiled(), vec![b"d/c".to_vec()]);
        again.note_file(b"d/c", 5);
        assert!(again.unfiled().is_empty());
        for m in [&mut w, &mut again] {
            let (d, name) = m.peer_linked_data(b"b", 5, 3, false);
            assert!(matches!(d, Decision::Skip { rewrite: true, .. }), "{d:?}");
            assert_eq!(name, Some(b"d/c".to_vec()));
        }
    }

    /// Our write of `a`, a file also named `b` (inode 5), then our unlink of `a` (its link
    /// count 2: the file lives on as `b`), while the peer writes through `b`: one file written
    /// at both sites, a conflict. After a restart in the middle of the split (the notes last
    /// taken, the journal replayed, the entries' names looked up again: `a` is gone) the
    /// peer's write is decided as before it.
    #[test]
    fn a_restart_keeps_our_write_of_a_file_unlinked_under_one_of_its_names() {
        let unlink = Op::Unlink {
            path: RelPath::new("a").expect("a name"),
            nlink: 2,
        };
        let removal = Local::of(&unlink).expect("a change to the rule");
        let journal = [(10, data("a")), (11, removal)];
        for me in [1, 2] {
            let mut before = Reconciler::new(Config::new(me, 3 - me), 2);
            for (s, c) in &journal {
                before.local_change(*s, c);
                if before.wants_file(b"a") {
                    // The shell's lookup under the order lock: `a` and `b`, two names.
                    before.note_file(b"a", 5);
                }
            }
            let want = before.clone().peer_linked_data(b"b", 5, 2, false);
            let conflict = if me == 1 {
                Decision::Skip {
                    rewrite: true,
                    first: true,
                }
            } else {
                Decision::CopyThenApply
            };
            assert_eq!(want, (conflict, Some(b"a".to_vec())), "site {me}");
            let mut after = Reconciler::new(before.config(), before.seen_by_peer());
            let notes = before.take_notes().expect("the notes changed");
            assert!(after.restore_notes(&notes));
            for (s, c) in &journal {
                after.local_change(*s, c);
            }
            // `set_backing`: the entries' names looked up again; `a` is not found.
            assert!(after.unfiled().iter().all(|p| p.as_slice() == b"a"));
            assert_eq!(
                after.peer_linked_data(b"b", 5, 2, false),
                want,
                "site {me} after a restart"
            );
        }
    }

    /// The file index holds one file per entry at most: bounded with the entries, emptied
    /// with them; a dropped entry still counts as concurrent (the floor), by its own name.
    #[test]
    fn the_file_index_is_bounded_by_the_entries() {
        let mut w = Reconciler::new(
            Config {
                entries_max: 4,
                ..Config::new(1, 2)
            },
            0,
        );
        for i in 0..100u64 {
            let p = format!("f{i}");
            w.local_change(10 + i, &data(&p));
            w.note_file(p.as_bytes(), 1000 + i);
            assert!(w.files_len() <= 4 && w.len() <= 4);
        }
        // f0 was dropped: its other name is not found by file, but the floor still counts.
        let (d, name) = w.peer_linked_data(b"g0", 1000, 3, false);
        assert_eq!(name, None);
        assert!(matches!(d, Decision::Skip { .. }), "{d:?}");
        // Two names written here: the index names the newer, the older its own name only.
        let mut w = site(1, 2);
        w.local_change(10, &data("a"));
        w.note_file(b"a", 9);
        w.local_change(11, &data("b"));
        w.note_file(b"b", 9);
        assert_eq!(w.files_len(), 1);
        assert_eq!(w.peer_linked_data(b"c", 9, 3, false).1, Some(b"b".to_vec()));
        let _ = w.peer_linked_data(b"c", 9, 200, false);
        assert_eq!((w.files_len(), w.len()), (0, 0));
    }

    /// Site 1 (the winner) set the mode (and an xattr) through `a`, the peer through `b`, one
    /// file (inode 99 here): the winner keeps its own, the loser applies the winner's.
    #[test]
    fn metadata_set_through_two_names_of_one_file_ends_with_the_winners_value() {
        let (mode, xattr) = (1, 77);
        let mut w = site(1, 2);
        let mut l = site(2, 1);
        w.local_change(10, &Local::Meta(b("a"), mode));
        w.local_change(11, &Local::Meta(b("a"), xattr));
        l.local_change(10, &Local::Meta(b("b"), mode));
        l.local_change(11, &Local::Meta(b("b"), xattr));
        assert!(w.wants_meta_file(b"a", mode) && w.wants_meta_file(b"a", xattr));
        assert!(
            !l.wants_meta_file(b"b", mode),
            "the loser never compares files"
        );
        assert!(l.meta_unfiled().is_empty());
        w.note_meta_file(b"a", mode, 99);
        w.note_meta_file(b"a", xattr, 99);
        assert!(!w.wants_meta_file(b"a", mode), "looked at once per change");
        w.local_change(12, &Local::Meta(b("a"), mode));
        assert!(
            !w.wants_meta_file(b"a", mode),
            "the file stays with the change"
        );
        assert_eq!(w.meta_files_len(), 2);
        // Before this rule the peer's `b` was its own object: applied, and the sites differed.
        assert!(w.clone().peer_meta(b"b", mode, 3));
        assert!(
            !w.peer_linked_meta(b"b", mode, 99, 3),
            "the winner keeps its mode"
        );
        assert!(!w.peer_linked_meta(b"b", xattr, 99, 3), "and its xattr");
        assert!(
            l.peer_linked_meta(b"a", mode, 7, 3),
            "the loser takes the winner's"
        );
        assert!(l.peer_linked_meta(b"a", xattr, 7, 3));
        // Another attribute, another file, a file of one name: not concurrent.
        assert!(w.peer_linked_meta(b"b", 2, 99, 3));
        assert!(w.peer_linked_meta(b"c", mode, 98, 3));
        assert!(w.peer_linked_meta(b"c", mode, 0, 3));
        // The peer saw ours through 11: the xattr is settled, the mode (12) not yet.
        assert!(w.peer_linked_meta(b"b", xattr, 99, 11));
        assert!(!w.peer_linked_meta(b"b", mode, 99, 11));
        assert_eq!(w.meta_files_len(), 1);
        assert!(w.peer_linked_meta(b"b", mode, 99, 12));
        assert_eq!(w.meta_files_len(), 0);
    }

    /// After a restart the replay brings our metadata changes back and the shell looks up
    /// their files again by name; the index is bounded by the changes, and two names changed
    /// here leave the newer in it.
    #[test]
    fn the_metadata_file_index_is_rebuilt_after_a_restart_and_bounded() {
        let journal = [(10, Local::Meta(b("a"), 1)), (11, Local::Meta(b("d/c"), 1))];
        let mut again = site(1, 2);
        for (s, c) in &journal {
            again.local_change(*s, c);
        }
        let mut names = again.meta_unfiled();
        names.sort();
        assert_eq!(names, vec![(b("a"), 1), (b("d/c"), 1)]);
        again.note_meta_file(b"a", 1, 5);
        again.note_meta_file(b"d/c", 1, 5);
        assert!(again.meta_unfiled().is_empty());
        assert_eq!(
            again.meta_files_len(),
            1,
            "one file, the newer name indexed"
        );
        assert!(
            !again.peer_linked_meta(b"b", 1, 5, 10),
            "d/c's change at 11"
        );
        assert!(again.peer_linked_meta(b"b", 1, 5, 11));
        let mut w = Reconciler::new(
            Config {
                entries_max: 4,
                ..Config::new(1, 2)
            },
            0,
        );
        for i in 0..100u64 {
            let p = format!("f{i}");
            w.local_change(10 + i, &Local::Meta(b(&p), 1));
            w.note_meta_file(p.as_bytes(), 1, 1000 + i);
            assert!(w.meta_files_len() <= 4);
        }
        // f0's change was dropped: not found by file, but the floor still counts.
        assert!(!w.peer_linked_meta(b"g0", 1, 1000, 3));
        assert!(w.peer_linked_meta(b"g0", 1, 1000, 200));
        assert_eq!(w.meta_files_len(), 0);
    }
}
