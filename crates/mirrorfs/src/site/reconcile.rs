//! The shell of `core::reconcile` at one writable site of a pair (`mount --peer --receive
//! --write-tokens ME:PEER --partition reconcile`): the machine under a mutex, the change points
//! of our stream (sent as `Msg::PeerSeen` before the records they cover, `net::remote`), the
//! peer's change points (from its stream, `net::peer`), and the two actions the machine asks
//! for, carried out through the volume like any change (`Volume::mutate_beneath_unsettled`,
//! `Volume::record`): the loser's conflict copy and the winner's rewrite.
//!
//! ```text
//!  FUSE write/truncate/fallocate ─▶ Volume::mutate ─▶ (under the order lock) local(seq, P)
//!  peer record R ─▶ net::peer::apply ─▶ (under the order lock) decide(P, seen(R))
//!        Apply ─▶ apply_op            Skip ─▶ journaled with its Abort; rewrite queued
//!        CopyThenApply ─▶ journaled with its Abort, copy P to P.conflict-siteN-TIME, R again
//!  end of a batch ─▶ change point (next seq, last peer seq) ─▶ rewrites ─▶ STATE/peer-applied
//!                    (applied, seen_by_peer, the point)
//! ```
//!
//! **Retention.** After a restart the machine's entries are rebuilt from the journal (our own
//! data records after `seen_by_peer`), so the link to the peer keeps every record after the
//! persisted `seen_by_peer` (`MirrorShared::needed_after`).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};
use mirrorfs_core::journal::Origin;
use mirrorfs_core::op::Op;
use mirrorfs_core::path::RelPath;
use mirrorfs_core::reconcile::{
    renamed_path, ChangePoints, Config, Decision, DirClash, EntryClash, ExchangeDecision, Local,
    PeerPoints, Reconciler, RenameDecision,
};
use mirrorfs_core::tree::apply_op;

use crate::site::conflicts::{self, ConflictEntry};
use crate::site::tokens::object_of;
use crate::site::volume::{lock, Volume};
use crate::tree::dirtree::{DirTree, Root};

/// The reason word of a conflict two sites made during a split (`mirrorfs conflicts`).
pub const REASON: &str = "split-both-modified";

/// Bytes per record of a copy or a rewrite.
const CHUNK: usize = 1 << 20;

/// One site's reconciliation state.
pub struct SiteReconcile {
    cfg: Config,
    machine: Mutex<Reconciler>,
    points: Mutex<ChangePoints>,
    peer_points: Mutex<PeerPoints>,
    /// The winner: objects it skipped the peer's records of, by path, with when: listed as a
    /// conflict once the loser's copy of it arrives.
    pending: Mutex<BTreeMap<Vec<u8>, i64>>,
    /// `seen_by_peer` as persisted in `STATE/peer-applied` (the journal keeps what is after it).
    persisted_seen: AtomicU64,
    /// The machine's notes not yet written to `STATE/reconcile-notes` ([`SiteReconcile::save_notes`]).
    notes: Mutex<Option<Vec<u8>>>,
    state: PathBuf,
    /// The backing tree, where the file behind a name is looked up (hard links,
    /// [`SiteReconcile::set_backing`]); unset until the replay at the mount is done.
    backing: std::sync::OnceLock<Root>,
    /// The name of ours under which the loser copies its version aside, when the last data
    /// decision was taken by our change of the file through another name (a hard link).
    linked_copy: Mutex<Option<Vec<u8>>>,
}

impl SiteReconcile {
    /// `seen` and `point` come from `STATE/peer-applied` (the watermark, the last change point);
    /// `next_seq` is the journal's next seq now (records from it on are written after the peer's
    /// `applied`).
    pub fn new(
        me: u64,
        peer: u64,
        seen: u64,
        applied: u64,
        point_from: u64,
        next_seq: u64,
        state: &Path,
    ) -> SiteReconcile {
        let cfg = Config::new(me, peer);
        let mut points = ChangePoints::default();
        if point_from > 0 {
            points.note(point_from, applied);
        }
        points.note(next_seq, applied);
        SiteReconcile {
            cfg,
            machine: Mutex::new(Reconciler::new(cfg, seen).with_hash(object_of)),
            points: Mutex::new(points),
            peer_points: Mutex::new(PeerPoints::default()),
            pending: Mutex::new(BTreeMap::new()),
            persisted_seen: AtomicU64::new(seen),
            notes: Mutex::new(None),
            state: state.to_path_buf(),
            backing: std::sync::OnceLock::new(),
            linked_copy: Mutex::new(None),
        }
    }

    /// Our data record `seq` (called under the order lock).
    pub fn local(&self, seq: u64, path: &[u8], rewrite: bool) {
        lock(&self.machine).local_path(seq, path, rewrite);
        self.look_up_file(path);
    }

    /// Our change `seq` of any kind ([`Local::of`]; called under the order lock).
    pub fn local_change(&self, seq: u64, change: &Local) {
        lock(&self.machine).local_change(seq, change);
        if let Local::Data(p) = change {
            self.look_up_file(p);
        }
        if let Local::Meta(p, key) = change {
            self.look_up_meta_file(p, *key);
        }
        if let Local::Rename { from, to, exchange } = change {
            self.rename_pending(from, to, *exchange);
        }
        let kept = match change {
            Local::RemovedLinked(p) => {
                self.backing.get().is_some() && lock(&self.machine).kept_unlinked(p)
            }
            _ => false,
        };
        if let (true, Local::RemovedLinked(p)) = (kept, change) {
            // Our entry of the file stays, and the file it was told goes into the notes
            // (`Reconciler::drop_removed_entry`): the removed name cannot be looked up after a
            // restart. Written now, not only at the end of a peer batch: a restart in the
            // middle of a split has no batch before it. Rare (a file with other names,
            // unlinked after an unseen write of it), so under the order lock; not in the
            // replay at the mount (no backing yet), which rebuilds it from the notes.
            if let Err(e) = self.save_notes() {
                tracing::error!(
                    "the file of {} (unlinked, it has other names) is not in the reconcile notes: after a restart a peer write through another name may not be seen as concurrent with ours: {e:#}",
                    String::from_utf8_lossy(p)
                );
            }
        }
    }

    /// The peer's `op` with its names translated through our renames it had not seen
    /// (`None`: unchanged; a name too long here: unchanged, and it fails as it would).
    /// A rename of a name whose directory is held here ([`SiteReconcile::hold`]) names the
    /// holding name as its source, whatever the peer had seen (`Reconciler::peer_rename` ends
    /// the hold with it).
    pub fn translate(&self, op: &Op, seen: u64) -> Option<Op> {
        let mut m = lock(&self.machine);
        let out = m.translate_op(op, seen).ok().flatten();
        if let Op::Rename { from, flags, .. } = op {
            // Linux's `RENAME_EXCHANGE`: both names swap, nothing is held.
            let exchange = flags & 2 != 0;
            if let (false, Some(h)) = (exchange, m.held_as(from.as_bytes())) {
                let mut t = out.unwrap_or_else(|| op.clone());
                if let (Op::Rename { from, .. }, Ok(h)) = (&mut t, RelPath::new(h.to_vec())) {
                    *from = h;
                }
                return Some(t);
            }
        }
        out
    }

    /// The decision for a peer rename (its names; under the order lock).
    pub fn decide_rename(&self, from: &[u8], to: &[u8], seen: u64) -> RenameDecision {
        *lock(&self.linked_copy) = None;
        lock(&self.machine).peer_rename(from, to, seen)
    }

    /// The decision for a peer exchange (its names): applied as sent, or carried out as the
    /// renames it is to the rule (`Reconciler::peer_exchange`).
    pub fn decide_exchange(&self, a: &[u8], b: &[u8], seen: u64) -> ExchangeDecision {
        lock(&self.machine).peer_exchange(a, b, seen)
    }

    /// The decision for a peer unlink (its name; under the order lock): our name for it, and
    /// what to do.
    /// How many steps of the peer's exchange record `seq` are done here
    /// (`Reconciler::exchange_done`: 3 is all, or applied as sent).
    pub fn exchange_done(&self, seq: u64) -> u8 {
        lock(&self.machine).exchange_done(seq)
    }

    /// `done` steps of the peer's exchange record `seq` are done here (not durable until
    /// [`SiteReconcile::save_notes`]).
    pub fn exchange_step_done(&self, seq: u64, done: u8) {
        lock(&self.machine).exchange_step_done(seq, done);
    }

    /// The peer's records through `seq` are acknowledged (`STATE/peer-applied`).
    pub fn peer_acknowledged(&self, seq: u64) {
        lock(&self.machine).peer_acknowledged(seq);
    }

    pub fn decide_unlink(&self, path: &[u8], seen: u64) -> (Vec<u8>, Decision) {
        lock(&self.machine).peer_unlink(path, seen)
    }

    /// The peer renamed `from` (our name) onto a name that is a directory here
    /// (`Reconciler::peer_rename_onto_dir`; under the order lock).
    pub fn decide_onto_dir(&self, from: &[u8], seen: u64) -> Decision {
        lock(&self.machine).peer_rename_onto_dir(from, seen)
    }

    /// The peer made `path` (our name) again after removing it, while we kept our changed file
    /// there against that removal (`Reconciler::peer_reused`; under the order lock): `true`,
    /// its new entry takes the name and ours goes to a conflict copy first.
    pub fn decide_reused(&self, path: &[u8], seen: u64) -> bool {
        lock(&self.machine).peer_reused(path, seen)
    }

    /// Our file at `path` is in its conflict copy now (`Reconciler::reused_aside`).
    pub fn reused_aside(&self, path: &[u8]) {
        lock(&self.machine).reused_aside(path);
    }

    /// The peer made a directory at `theirs` (its name; `ours`: ours for it) where we have a
    /// directory: did we give it the name concurrently, and whose stays
    /// (`Reconciler::peer_dir_clash`; under the order lock)?
    pub fn decide_dir_clash(&self, theirs: &[u8], ours: &[u8], seen: u64) -> DirClash {
        lock(&self.machine).peer_dir_clash(theirs, ours, seen)
    }

    /// The source `from` of the peer's rename `theirs_from` → `theirs_to` (its names) onto our
    /// directory `to`, moved to `hold` and held there (`Reconciler::hold_source`; written with
    /// the notes).
    pub fn hold_source(
        &self,
        theirs: (&[u8], &[u8]),
        ours: (&[u8], &[u8]),
        hold: &[u8],
        seen: u64,
    ) {
        lock(&self.machine).hold_source(theirs, ours, hold, seen);
    }

    /// [`DirClash::Ours`]: the peer's directory `theirs` (its name) is held here under `ours`
    /// until its rename aside arrives (`Reconciler::hold`; written with the notes).
    pub fn hold(&self, theirs: &[u8], ours: &[u8], made: u64) {
        lock(&self.machine).hold(theirs, ours, made);
    }

    /// The peer's rmdir of `path` (its name) is done here, applied or journaled with its
    /// abort: a hold of the name ends (`Reconciler::peer_rmdir_done`; translating the record
    /// does not end it, so that every translation of it names the holding name).
    pub fn peer_rmdir_done(&self, path: &[u8], seen: u64) {
        lock(&self.machine).peer_rmdir_done(path, seen);
    }

    /// [`DirClash::Theirs`]: our directory `name` went aside; the peer's later records for the
    /// name are for its directory (`Reconciler::yielded`).
    pub fn yielded(&self, name: &[u8]) {
        lock(&self.machine).yielded(name);
    }

    /// The peer makes `path` (our name) where we have another entry, not a directory, the two
    /// not both regular files nor one symlink target ([`entries_clash`]): did we give it the
    /// name concurrently, and whose stays (`Reconciler::peer_entry_clash`; under the order
    /// lock)?
    pub fn decide_entry_clash(&self, path: &[u8], seen: u64) -> EntryClash {
        lock(&self.machine).peer_entry_clash(path, seen)
    }

    /// Our entry at `path` went to its conflict copy for the peer's
    /// (`Reconciler::entry_set_aside`; under the order lock).
    pub fn entry_set_aside(&self, path: &[u8]) {
        lock(&self.machine).entry_set_aside(path);
    }

    /// The decision for a peer metadata change (our name; under the order lock). A file with
    /// other names here (hard links) is one object with them: the peer's change of an
    /// attribute through one name is concurrent with ours through another
    /// (`Reconciler::peer_linked_meta`).
    pub fn decide_meta(&self, path: &[u8], key: u64, seen: u64) -> bool {
        // Looked up only while some change of ours is of a file with other names (the winner's).
        let linked = lock(&self.machine).meta_files_len() > 0;
        let file = if linked {
            self.file_of(path).unwrap_or(0)
        } else {
            0
        };
        lock(&self.machine).peer_linked_meta(path, key, file, seen)
    }

    /// A file or directory moved here (a peer rename applied): our unseen data changes of it
    /// (or beneath it) go with it, and so do the conflicts waiting for the loser's copy.
    pub fn moved(&self, from: &[u8], to: &[u8], exchange: bool) {
        lock(&self.machine).moved(from, to, exchange);
        self.rename_pending(from, to, exchange);
    }

    /// [`SiteReconcile::moved`] of the peer's rename `theirs` (its names) applied here as
    /// `from` → `to`: our unseen renames of names in it follow it too
    /// (`Reconciler::peer_renamed`).
    pub fn peer_renamed(&self, theirs: (&[u8], &[u8]), from: &[u8], to: &[u8], exchange: bool) {
        lock(&self.machine).peer_renamed(theirs.0, theirs.1, from, to, exchange);
        self.rename_pending(from, to, exchange);
    }

    /// The winner waits for the loser's copy of a file under the file's name here: a rename of
    /// it (or of a directory above it) before the copy arrives moves the name it waits for.
    fn rename_pending(&self, from: &[u8], to: &[u8], exchange: bool) {
        let mut pending = lock(&self.pending);
        if pending.is_empty() {
            return;
        }
        let old = std::mem::take(&mut *pending);
        for (p, t) in old {
            let q = renamed_path(&p, from, to, exchange).unwrap_or(p);
            pending.insert(q, t);
        }
    }

    /// The directories on the way to `path` we removed concurrently (outermost first).
    pub fn refill(&self, path: &[u8], seen: u64) -> Vec<Vec<u8>> {
        lock(&self.machine).refill(path, seen)
    }

    /// Both sites renamed one file during the split: `ours` is the name it keeps at both (the
    /// lower id's), `theirs` the other site's; listed here, with no copy (nothing else differs).
    pub fn list_renamed(&self, ours: &[u8], theirs: &[u8]) {
        let e = ConflictEntry {
            path: ours.to_vec(),
            copy: None,
            reason: "split-both-renamed".to_string(),
            peer: format!("site{}", self.cfg.peer),
            time: now(),
        };
        if let Err(e) = conflicts::record(&self.state, &[e]) {
            tracing::error!(
                "cannot list the conflict on {}: {e:#}",
                String::from_utf8_lossy(ours)
            );
        } else {
            tracing::warn!(
                "conflict: both sites renamed one file during the split; it keeps site {}'s name {} (the other name was {})",
                self.cfg.me.min(self.cfg.peer),
                String::from_utf8_lossy(ours),
                String::from_utf8_lossy(theirs)
            );
        }
    }

    /// Our records from `from` on consider the peer's through `through` (under the order lock).
    pub fn note_point(&self, from: u64, through: u64) {
        lock(&self.points).note(from, through);
    }

    /// The change points a batch of our records needs.
    pub fn points_for(&self, first: u64, last: u64) -> Vec<(u64, u64)> {
        lock(&self.points).for_batch(first, last)
    }

    /// The peer holds our records through `seq`.
    pub fn acknowledged(&self, seq: u64) {
        lock(&self.points).forget_through(seq);
    }

    /// The last change point (persisted with the peer's applied position).
    pub fn last_point(&self) -> u64 {
        lock(&self.points).last_from()
    }

    /// A `PeerSeen` from the peer.
    pub fn peer_seen(&self, from: u64, through: u64) {
        lock(&self.peer_points).note(from, through);
    }

    /// seen(R) for the peer's record `seq` (asked in order).
    pub fn seen_of(&self, seq: u64) -> u64 {
        lock(&self.peer_points).seen_at(seq)
    }

    /// The decision for a peer record (called under the order lock when it is a data change).
    pub fn decide(&self, path: Option<&[u8]>, seen: u64) -> Decision {
        lock(&self.machine).peer_record(path.map(object_of), seen)
    }

    /// The decision for a peer data change of `path` (our name; under the order lock), which
    /// the peer named `theirs`: translated when the peer named it by a name we renamed it from
    /// (`Reconciler::peer_data_record`), unless we removed `path` after the renames that took
    /// the peer's file there: what is at it now is another entry, and the record is decided as
    /// one naming `path` itself (`Reconciler::removed_since_moved`, as `Reconciler::peer_data`).
    /// A file with other names here (hard links) is one object with them: the peer's change
    /// through one name is concurrent with ours through another (`Reconciler::peer_linked_data`;
    /// the name the loser copies aside is then [`SiteReconcile::take_linked_copy`]'s).
    pub fn decide_data(&self, theirs: &[u8], path: &[u8], seen: u64) -> Decision {
        let translated = {
            let mut m = lock(&self.machine);
            // A name our renames moved away and back is translated too (`moved_and_back`).
            (theirs != path || m.moved_and_back(path, seen)) && !m.removed_since_moved(theirs, path)
        };
        // Looked up only while some entry of ours is of a file with other names. Whatever the
        // link count now: a file we unlinked one name of since our write may have one left
        // (`Local::RemovedLinked`); the index holds only files that had others.
        let linked = lock(&self.machine).files_len() > 0;
        let file = if linked {
            self.inode_of(path).unwrap_or(0)
        } else {
            0
        };
        let (d, ours) = lock(&self.machine).peer_linked_data(path, file, seen, translated);
        *lock(&self.linked_copy) = ours;
        d
    }

    /// The loser's `CopyThenApply` of the last data decision was for our change of the file
    /// through another name than the peer's: our name, under which its version goes aside
    /// (listed as the winner lists it: the name the loser wrote through).
    pub fn take_linked_copy(&self) -> Option<RelPath> {
        lock(&self.linked_copy)
            .take()
            .and_then(|p| RelPath::new(p).ok())
    }

    /// The backing tree, once the replay at the mount is done: from now on each data change
    /// noted has its file looked up (`lstat` beneath the root, under the order lock, once per
    /// entry), and so have the entries the replay rebuilt (their names now; a rename is in the
    /// replay); likewise the winner's metadata changes, once per name and attribute.
    pub fn set_backing(&self, backing: &Path) -> Result<()> {
        let root = open_backing(backing)?;
        let _ = self.backing.set(root);
        let names = lock(&self.machine).unfiled();
        for p in names {
            self.look_up_file(&p);
        }
        let metas = lock(&self.machine).meta_unfiled();
        for (p, key) in metas {
            self.look_up_meta_file(&p, key);
        }
        Ok(())
    }

    /// The file behind `path` if it has other names (its inode number), 0 if it has one;
    /// `None` when it cannot be looked at (gone, or no backing yet).
    fn file_of(&self, path: &[u8]) -> Option<mirrorfs_core::reconcile::FileId> {
        let root = self.backing.get()?;
        let rel = RelPath::new(path.to_vec()).ok()?;
        let st = root.lstat(&rel).ok()?;
        let linked = st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink > 1;
        Some(if linked { st.st_ino } else { 0 })
    }

    /// The inode of the regular file at `path`, whatever its link count (the peer's name for a
    /// data change, matched against the files our entries were told); `None` when it cannot be
    /// looked at, 0 for another type.
    fn inode_of(&self, path: &[u8]) -> Option<mirrorfs_core::reconcile::FileId> {
        let root = self.backing.get()?;
        let rel = RelPath::new(path.to_vec()).ok()?;
        let st = root.lstat(&rel).ok()?;
        Some(if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            st.st_ino
        } else {
            0
        })
    }

    /// Tells the machine the file of our entry for `path` if it has not been told yet.
    fn look_up_file(&self, path: &[u8]) {
        if self.backing.get().is_none() || !lock(&self.machine).wants_file(path) {
            return;
        }
        if let Some(f) = self.file_of(path) {
            lock(&self.machine).note_file(path, f);
        }
    }

    /// Tells the machine the file of our metadata change of `path` (attribute `key`) if it
    /// wants it (the winner, once per change).
    fn look_up_meta_file(&self, path: &[u8], key: u64) {
        if self.backing.get().is_none() || !lock(&self.machine).wants_meta_file(path, key) {
            return;
        }
        if let Some(f) = self.file_of(path) {
            lock(&self.machine).note_meta_file(path, key, f);
        }
    }

    /// The peer removed `path` while this site changed it: it is kept (and given back to the
    /// peer); listed here, with no copy.
    pub fn list_removed(&self, path: &[u8]) {
        let e = ConflictEntry {
            path: path.to_vec(),
            copy: None,
            reason: "they-deleted".to_string(),
            peer: format!("site{}", self.cfg.peer),
            time: now(),
        };
        if let Err(e) = conflicts::record(&self.state, &[e]) {
            tracing::error!(
                "cannot list the conflict on {} (kept): {e:#}",
                String::from_utf8_lossy(path)
            );
        } else {
            tracing::warn!(
                "conflict: site {} removed {} while this site changed it during the split; it is kept at both sites",
                self.cfg.peer,
                String::from_utf8_lossy(path)
            );
        }
    }

    /// The copy or rewrite of `path` failed: the machine asks for it again.
    pub fn retry(&self, path: &[u8]) {
        lock(&self.machine).retry(object_of(path));
    }

    pub fn seen_by_peer(&self) -> u64 {
        lock(&self.machine).seen_by_peer()
    }

    /// `seen_by_peer` was made durable.
    pub fn persisted(&self, seen: u64) {
        self.persisted_seen.store(seen, Ordering::Release);
    }

    /// The journal keeps every record after this for the rebuild after a restart.
    pub fn retain_after(&self) -> u64 {
        self.persisted_seen.load(Ordering::Acquire)
    }

    /// Rebuilds the machine's entries from the journal (our own data records after the
    /// watermark; not those that came from the peer: `Origin::Peer` in their frames, or in an
    /// older version's `STATE/peer-origin`, `legacy`).
    /// First the names the peer's records noted (`STATE/reconcile-notes`: the journal holds
    /// those records, but not the peer's `seen` of each, so they cannot be decided again).
    pub fn rebuild(
        &self,
        vol: &Volume,
        legacy: Option<&crate::site::peer::LegacyOrigins>,
    ) -> Result<usize> {
        let file = self.notes_file();
        match std::fs::read(&file) {
            Ok(b) => {
                if !lock(&self.machine).restore_notes(&b) {
                    // Replaced atomically: not a crash. Only the names it held are lost.
                    tracing::error!(
                        "{} is damaged: the names the peer's records noted during a split are not known again (the sites can differ after the heal)",
                        file.display()
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
        }
        let (first, end) = {
            let o = lock(&vol.order);
            (
                o.journal.first_seq(),
                o.journal.next_seq().saturating_sub(1),
            )
        };
        let from = self.seen_by_peer().saturating_add(1).max(first);
        let mut n = 0;
        vol.each_record(from, end, |r, origin| {
            if origin == Origin::Peer || legacy.is_some_and(|o| o.contains(r.seq)) {
                return;
            }
            if let Some(c) = Local::of(&r.op) {
                self.local_change(r.seq, &c);
                n += 1;
            }
        })?;
        Ok(n)
    }

    fn notes_file(&self) -> PathBuf {
        self.state.join("reconcile-notes")
    }

    /// Makes the machine's notes durable if they changed (at the end of a batch of the peer's
    /// records, before `STATE/peer-applied`: a record acknowledged is not decided again after
    /// a restart, so what it noted must be known again from this file). Not written: kept for
    /// the next call, and the batch is not acknowledged.
    pub fn save_notes(&self) -> Result<()> {
        let mut pending = lock(&self.notes);
        if let Some(b) = lock(&self.machine).take_notes() {
            *pending = Some(b);
        }
        if let Some(b) = pending.as_ref() {
            let file = self.notes_file();
            crate::site::statefile::replace_durable(&file, b, 0o600)
                .with_context(|| format!("cannot write {}", file.display()))?;
            *pending = None;
        }
        Ok(())
    }

    /// The winner skipped a record of the peer for `path` (`first`: a new conflict).
    pub fn skipped(&self, path: &[u8], first: bool) {
        if first {
            lock(&self.pending).insert(path.to_vec(), now());
        }
    }

    /// The peer created `path`: if it is the loser's copy of an object the winner skipped,
    /// the conflict is listed here too.
    pub fn peer_created(&self, path: &[u8]) {
        let prefix_of = |p: &[u8]| {
            let mut v = p.to_vec();
            v.extend_from_slice(format!(".conflict-site{}-", self.cfg.peer).as_bytes());
            v
        };
        let hit = {
            let mut pending = lock(&self.pending);
            let k = pending
                .iter()
                .find(|(p, _)| path.starts_with(&prefix_of(p)))
                .map(|(p, t)| (p.clone(), *t));
            if let Some((p, _)) = &k {
                pending.remove(p);
            }
            k
        };
        if let Some((p, time)) = hit {
            self.list(&p, path, time);
        }
    }

    fn list(&self, path: &[u8], copy: &[u8], time: i64) {
        let e = ConflictEntry {
            path: path.to_vec(),
            copy: Some(copy.to_vec()),
            reason: REASON.to_string(),
            peer: format!("site{}", self.cfg.peer),
            time,
        };
        match conflicts::record(&self.state, &[e]) {
            Ok(()) => tracing::warn!(
                "conflict: both sites changed {} during the split; site {}'s version is at the path, site {}'s in {}",
                String::from_utf8_lossy(path),
                self.cfg.me.min(self.cfg.peer),
                self.cfg.me.max(self.cfg.peer),
                String::from_utf8_lossy(copy)
            ),
            Err(e) => tracing::error!(
                "cannot list the conflict on {} (both versions are kept: {}): {e:#}",
                String::from_utf8_lossy(path),
                String::from_utf8_lossy(copy)
            ),
        }
    }

    /// A peer rename or unlink of a conflict copy (`conflicts resolve` at the other site):
    /// the entry is settled here too.
    pub fn peer_settled(&self, copy: &[u8]) {
        if !copy.windows(10).any(|w| w == b".conflict-") {
            return;
        }
        let gone = |e: &ConflictEntry| e.reason == REASON && e.copy.as_deref() == Some(copy);
        match conflicts::list(&self.state) {
            Ok(all) => {
                let settled: Vec<_> = all.into_iter().filter(gone).collect();
                if !settled.is_empty() {
                    if let Err(e) = conflicts::remove_entries(&self.state, &settled) {
                        tracing::warn!("cannot drop a conflict the peer settled: {e:#}");
                    }
                }
            }
            Err(e) => tracing::warn!("cannot read the conflict registry: {e:#}"),
        }
    }

    /// Makes the directory `dir` again through the volume (journaled, streamed to the peer, where
    /// it exists already and fails): a peer's change beneath it wins over our removal. Its mode
    /// and owner are its parent's until the peer's own arrive (the peer journals them when our
    /// removal fails there).
    pub fn remake_dir(&self, vol: &Volume, backing: &Path, dir: &RelPath) -> Result<()> {
        let root = open_backing(backing)?;
        if root.lstat(dir).is_ok() {
            return Ok(());
        }
        let parent = dir.parent().unwrap_or_else(RelPath::root);
        let st = root.lstat(&parent).with_context(|| {
            format!("cannot stat {}", String::from_utf8_lossy(parent.as_bytes()))
        })?;
        tracing::warn!(
            "conflict: site {} changed {} beneath {} during the split while this site removed it; made again",
            self.cfg.peer,
            String::from_utf8_lossy(dir.as_bytes()),
            String::from_utf8_lossy(dir.as_bytes())
        );
        self.beneath(
            vol,
            backing,
            Op::Mkdir {
                path: dir.clone(),
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
            },
        )
    }

    /// The peer removed `dir`, which holds what this site made in it during the split (the
    /// removal failed here): journals its mode and owner, so that the peer, which makes it again
    /// for our changes beneath it, ends with the same. (Not a `Mkdir` of it: a crash replay of
    /// a create at a mirror clears what is at its name, and the children would not follow.)
    pub fn give_back_dir(&self, vol: &Volume, backing: &Path, dir: &RelPath) -> Result<()> {
        let root = open_backing(backing)?;
        let Ok(st) = root.lstat(dir) else {
            return Ok(());
        };
        let refused = |e: i32| {
            anyhow::anyhow!(
                "cannot journal the directory's attributes: {}",
                std::io::Error::from_raw_os_error(e)
            )
        };
        vol.record(|| {
            Some(Op::SetMode {
                path: dir.clone(),
                mode: st.st_mode & 0o7777,
            })
        })
        .map_err(refused)?;
        vol.record(|| {
            Some(Op::SetOwner {
                path: dir.clone(),
                uid: Some(st.st_uid),
                gid: Some(st.st_gid),
            })
        })
        .map_err(refused)?;
        Ok(())
    }

    /// Both sites made `path` during the split, a directory at the peer and not here: ours goes
    /// to a conflict name (a regular file is copied, a symlink or special file made again
    /// there, then it is removed; listed), so that the peer's directory can be made. `false`:
    /// a directory here too (or gone), left as it is.
    pub fn move_aside(&self, vol: &Volume, backing: &Path, path: &RelPath) -> Result<bool> {
        if self.copy_aside(vol, backing, path)?.is_none()
            && self.special_aside(vol, backing, path)?.is_none()
        {
            return Ok(false);
        }
        let root = open_backing(backing)?;
        let nlink = root.lstat(path).map_or(1, |st| st.st_nlink as u32);
        self.beneath(
            vol,
            backing,
            Op::Unlink {
                path: path.clone(),
                nlink,
            },
        )?;
        // The removal was of our entry: the name is the peer's directory's now.
        lock(&self.machine).moved_aside_for_peer(path.as_bytes());
        Ok(true)
    }

    /// The loser: copies its current `path` to a new conflict name beneath `backing`, through
    /// the volume (journaled, streamed to the peer), and lists the conflict. `None`: nothing to
    /// copy (not a regular file).
    pub fn copy_aside(
        &self,
        vol: &Volume,
        backing: &Path,
        path: &RelPath,
    ) -> Result<Option<RelPath>> {
        let root = open_backing(backing)?;
        let st = match root.lstat(path) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => st,
            _ => return Ok(None),
        };
        let (copy, time) = self.conflict_name(&root, path)?;
        let fd = root
            .open_at(path, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
            .with_context(|| format!("cannot open {}", String::from_utf8_lossy(path.as_bytes())))?;
        let mut file = std::fs::File::from(fd);
        let create = Op::Create {
            path: copy.clone(),
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        };
        self.beneath(vol, backing, create)?;
        let mut off = 0u64;
        loop {
            let mut data = Vec::with_capacity(CHUNK);
            (&mut file)
                .take(CHUNK as u64)
                .read_to_end(&mut data)
                .context("cannot read the version to copy")?;
            if data.is_empty() {
                break;
            }
            let n = data.len() as u64;
            self.beneath(
                vol,
                backing,
                Op::Write {
                    path: copy.clone(),
                    offset: off,
                    data,
                },
            )?;
            off += n;
        }
        self.list(path.as_bytes(), copy.as_bytes(), time);
        Ok(Some(copy))
    }

    /// [`DirClash::Theirs`]: our directory `path`, given its name during the split as the peer
    /// gave it one of its own, goes aside with its contents: a local rename to a new conflict
    /// name (`PATH.conflict-site<ME>-<TIME>`), journaled and streamed like a rename through the
    /// mount (noted as ours: `Local::Rename`), listed here. `None`: not a directory here (left
    /// as it is).
    pub fn dir_aside(
        &self,
        vol: &Volume,
        backing: &Path,
        path: &RelPath,
    ) -> Result<Option<RelPath>> {
        let root = open_backing(backing)?;
        let st = match root.lstat(path) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => st,
            _ => return Ok(None),
        };
        let (aside, time) = self.conflict_name(&root, path)?;
        let op = Op::Rename {
            from: path.clone(),
            to: aside.clone(),
            flags: 0,
            from_ino: st.st_ino,
        };
        let change = Local::of(&op);
        let mut tree =
            DirTree::open(backing).with_context(|| format!("cannot open {}", backing.display()))?;
        vol.mutate_beneath_unsettled(op.clone(), |seq| {
            apply_op(&mut tree, &op, false).map_err(|e| std::io::Error::other(e.to_string()))?;
            // Under the order lock, as `Volume::mutate` notes a rename through the mount.
            if let Some(c) = &change {
                self.local_change(seq, c);
            }
            Ok(())
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot move the directory aside: {}",
                std::io::Error::from_raw_os_error(e)
            )
        })?;
        self.list(path.as_bytes(), aside.as_bytes(), time);
        Ok(Some(aside))
    }

    /// [`DirClash::Ours`]: a free name for the peer's directory of `path` while it is held here
    /// (`PATH.held-site<PEER>-<TIME>`; the peer's rename aside moves it to its conflict name).
    pub fn holding_name(&self, backing: &Path, path: &RelPath) -> Result<RelPath> {
        let root = open_backing(backing)?;
        let label =
            mirrorfs_core::reintegrate::conflict_label(&format!("site{}", self.cfg.peer), now());
        let label = label.strip_prefix("conflict-").unwrap_or(&label);
        for n in 0..1000u32 {
            let mut name = path.as_bytes().to_vec();
            name.extend_from_slice(b".held-");
            name.extend_from_slice(label.as_bytes());
            if n > 0 {
                name.extend_from_slice(format!("-{n}").as_bytes());
            }
            let rel = RelPath::new(name).map_err(|e| anyhow::anyhow!("{e}"))?;
            if root.lstat(&rel).is_err() {
                return Ok(rel);
            }
        }
        anyhow::bail!("no free holding name")
    }

    /// A free conflict name for `path` (`PATH.conflict-site<ME>-<TIME>`) and its time.
    fn conflict_name(&self, root: &Root, path: &RelPath) -> Result<(RelPath, i64)> {
        let time = now();
        let label =
            mirrorfs_core::reintegrate::conflict_label(&format!("site{}", self.cfg.me), time);
        for n in 0..1000u32 {
            let mut name = path.as_bytes().to_vec();
            name.push(b'.');
            name.extend_from_slice(label.as_bytes());
            if n > 0 {
                name.extend_from_slice(format!("-{n}").as_bytes());
            }
            let rel = RelPath::new(name).map_err(|e| anyhow::anyhow!("{e}"))?;
            if root.lstat(&rel).is_err() {
                return Ok((rel, time));
            }
        }
        anyhow::bail!("no free conflict name")
    }

    /// [`SiteReconcile::copy_aside`] of a symlink (made again with its target) or a device
    /// node, FIFO or socket (made again with its type, mode and device number) under a new
    /// conflict name, through the volume, listed. `None`: neither (a regular file, a
    /// directory, or gone).
    pub fn special_aside(
        &self,
        vol: &Volume,
        backing: &Path,
        path: &RelPath,
    ) -> Result<Option<RelPath>> {
        let root = open_backing(backing)?;
        let Ok(st) = root.lstat(path) else {
            return Ok(None);
        };
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFREG || kind == libc::S_IFDIR {
            return Ok(None);
        }
        let (copy, time) = self.conflict_name(&root, path)?;
        let op = if kind == libc::S_IFLNK {
            let target = root.readlink(path).with_context(|| {
                format!(
                    "cannot read the link {}",
                    String::from_utf8_lossy(path.as_bytes())
                )
            })?;
            Op::Symlink {
                path: copy.clone(),
                target,
                uid: st.st_uid,
                gid: st.st_gid,
            }
        } else {
            Op::Mknod {
                path: copy.clone(),
                mode: st.st_mode,
                rdev: st.st_rdev,
                uid: st.st_uid,
                gid: st.st_gid,
            }
        };
        self.beneath(vol, backing, op)?;
        self.list(path.as_bytes(), copy.as_bytes(), time);
        Ok(Some(copy))
    }

    /// [`SiteReconcile::copy_aside`] or [`SiteReconcile::special_aside`], whichever `path`
    /// is (a conflict copy under a new name, journaled, streamed, listed). `None`: nothing to
    /// copy (a directory, or gone).
    pub fn entry_aside(
        &self,
        vol: &Volume,
        backing: &Path,
        path: &RelPath,
    ) -> Result<Option<RelPath>> {
        match self.copy_aside(vol, backing, path)? {
            Some(copy) => Ok(Some(copy)),
            None => self.special_aside(vol, backing, path),
        }
    }

    fn beneath(&self, vol: &Volume, backing: &Path, op: Op) -> Result<()> {
        let mut tree =
            DirTree::open(backing).with_context(|| format!("cannot open {}", backing.display()))?;
        vol.mutate_beneath_unsettled(op.clone(), |_| {
            apply_op(&mut tree, &op, false).map_err(|e| std::io::Error::other(e.to_string()))
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot make the conflict copy ({}): {}",
                op.name(),
                std::io::Error::from_raw_os_error(e)
            )
        })?;
        Ok(())
    }

    /// The winner: journals its whole current `path` (its size, then its content), each record
    /// built under the order lock from what the backing holds at that point, applying nothing
    /// (the backing already holds it). The peer applies it over the mix of diffs it has. With
    /// `create` (the peer removed it: `Restore`), its creation is journaled first.
    pub fn rewrite(
        &self,
        vol: &Volume,
        backing: &Path,
        path: &RelPath,
        create: bool,
    ) -> Result<()> {
        let root = open_backing(backing)?;
        let Ok(fd) = root.open_at(path, libc::O_RDONLY | libc::O_NOFOLLOW, 0) else {
            // Gone (a local unlink since): nothing to rewrite; the peer's own unlink follows.
            return Ok(());
        };
        let raw = fd.as_raw_fd();
        let size_of = || {
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: `raw` is open for the whole call; `st` is a valid out-pointer.
            (unsafe { libc::fstat(raw, &mut st) } == 0
                && st.st_mode & libc::S_IFMT == libc::S_IFREG)
                .then_some(st.st_size as u64)
        };
        let refused = |e: i32| {
            anyhow::anyhow!(
                "cannot journal the rewrite: {}",
                std::io::Error::from_raw_os_error(e)
            )
        };
        if create {
            vol.record(|| {
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: `raw` is open for the whole call; `st` is a valid out-pointer.
                (unsafe { libc::fstat(raw, &mut st) } == 0
                    && st.st_mode & libc::S_IFMT == libc::S_IFREG)
                    .then(|| Op::Create {
                        path: path.clone(),
                        mode: st.st_mode & 0o7777,
                        uid: st.st_uid,
                        gid: st.st_gid,
                    })
            })
            .map_err(refused)?;
        }
        let seq = vol
            .record(|| {
                size_of().map(|size| Op::Truncate {
                    path: path.clone(),
                    size,
                })
            })
            .map_err(refused)?;
        let Some(seq) = seq else { return Ok(()) };
        self.local(seq, path.as_bytes(), true);
        let mut off = 0u64;
        loop {
            let mut n = 0usize;
            let seq = vol
                .record(|| {
                    let mut data = vec![0u8; CHUNK];
                    // SAFETY: `raw` is open; `data` has room for `CHUNK` bytes.
                    let r = unsafe {
                        libc::pread(raw, data.as_mut_ptr().cast(), CHUNK, off as libc::off_t)
                    };
                    if r <= 0 {
                        return None;
                    }
                    data.truncate(r as usize);
                    n = r as usize;
                    Some(Op::Write {
                        path: path.clone(),
                        offset: off,
                        data,
                    })
                })
                .map_err(refused)?;
            let Some(seq) = seq else { break };
            self.local(seq, path.as_bytes(), true);
            off += n as u64;
        }
        drop(fd);
        tracing::info!(
            "rewrote {} ({off} bytes) for the peer: this site's version stays",
            String::from_utf8_lossy(path.as_bytes())
        );
        Ok(())
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What is at `path` beneath `backing` (not following a symlink): its type (`S_IFMT` bits)
/// and, for a symlink, its target. `None`: nothing (or unreadable).
pub fn entry_of(backing: &Path, path: &RelPath) -> Option<(u32, Option<Vec<u8>>)> {
    let root = Root::open(backing).ok()?;
    let kind = root.lstat(path).ok()?.st_mode & libc::S_IFMT;
    let target = if kind == libc::S_IFLNK {
        Some(root.readlink(path).ok()?)
    } else {
        None
    };
    Some((kind, target))
}

/// Two entries given one name at both sites that the rule of
/// `core::reconcile::EntryClash` settles: neither a directory (the directory rows), not both
/// regular files (the data rows), and not two symlinks to one target (one entry).
pub fn entries_clash(ours: &(u32, Option<Vec<u8>>), theirs: &(u32, Option<Vec<u8>>)) -> bool {
    let dir = |e: &(u32, Option<Vec<u8>>)| e.0 == libc::S_IFDIR;
    let reg = |e: &(u32, Option<Vec<u8>>)| e.0 == libc::S_IFREG;
    !(dir(ours) || dir(theirs) || (reg(ours) && reg(theirs)) || ours == theirs)
}

/// The backing tree's root, for a change the reconciliation makes beneath it.
fn open_backing(backing: &Path) -> Result<Root> {
    Root::open(backing).with_context(|| format!("cannot open {}", backing.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_winner_lists_a_conflict_when_the_losers_copy_arrives_and_drops_it_when_settled() {
        let d = tempfile::tempdir().expect("tempdir");
        let rc = SiteReconcile::new(1, 2, 0, 0, 0, 1, d.path());
        rc.skipped(b"notes.txt", true);
        // Another file's copy, or a copy from the wrong site, lists nothing.
        rc.peer_created(b"other.txt.conflict-site2-20261206-120000");
        rc.peer_created(b"notes.txt.conflict-site1-20261206-120000");
        assert!(conflicts::list(d.path()).expect("list").is_empty());
        let copy = b"notes.txt.conflict-site2-20261206-120000".to_vec();
        rc.peer_created(&copy);
        let listed = conflicts::list(d.path()).expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].path, b"notes.txt");
        assert_eq!(listed[0].copy.as_deref(), Some(&copy[..]));
        assert_eq!(listed[0].reason, REASON);
        assert_eq!(listed[0].peer, "site2");
        // Listed once: a second copy of the same conflict is not matched again.
        rc.peer_created(b"notes.txt.conflict-site2-20261206-120000-1");
        assert_eq!(conflicts::list(d.path()).expect("list").len(), 1);
        // The peer settles it (renames or removes the copy): the entry goes here too.
        rc.peer_settled(b"unrelated.txt");
        assert_eq!(conflicts::list(d.path()).expect("list").len(), 1);
        rc.peer_settled(&copy);
        assert!(conflicts::list(d.path()).expect("list").is_empty());
    }

    #[test]
    fn the_change_points_survive_a_restart_through_peer_applied() {
        let d = tempfile::tempdir().expect("tempdir");
        // Before: records from 40 on were written after the peer's 17.
        let rc = SiteReconcile::new(2, 1, 0, 17, 40, 55, d.path());
        assert_eq!(rc.points_for(40, 60), vec![(40, 17)]);
        // Records before the persisted point are unknown: 0 (conservative).
        assert_eq!(rc.points_for(30, 35), vec![(30, 0)]);
        assert_eq!(rc.last_point(), 40);
        rc.note_point(60, 20);
        assert_eq!(rc.points_for(50, 70), vec![(50, 17), (60, 20)]);
        rc.acknowledged(65);
        assert_eq!(rc.points_for(66, 66), vec![(66, 20)]);
    }
}
