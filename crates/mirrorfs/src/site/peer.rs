//! What a writable site keeps about the other writable site of its pair (issue 7 item 5): which
//! of its own journal records came from the peer, so they are never sent back (no echo: the
//! record's origin is in its frame, `core::journal::Origin`; `STATE/peer-origin` only as an
//! older version left it), and how far the peer's journal is applied here
//! (`STATE/peer-applied`, where the peer's stream resumes). The link that carries the records
//! is `net::peer`.
//!
//! ```text
//!  peer's record (its seq P) ─▶ Volume::mutate_from_peer ─▶ our record (seq L), its frame
//!                                 flagged Origin::Peer (durable exactly when the record is)
//!  end of a batch: local journal durable ─▶ PeerPosition::store(P) (durable) ─▶ Ack{P}
//!  our link to the peer (net::remote::next_for_link): L read as Origin::Peer ─▶ sent as Abort{L}
//! ```
//!
//! **Layouts** (also in `docs/journal.md`, "State files"). `STATE/peer-origin` (read only, see
//! `LegacyOrigins`) is a sequence of little-endian u64 seqs of our own journal. `STATE/peer-applied`
//! is 64 bytes, replaced atomically: magic `MFPA`, 4 zero bytes, the peer's volume id (16), the
//! last peer seq applied here and durable, then (`--partition reconcile`, `site::reconcile`) the
//! largest of our seqs the peer had considered as of that record and our last change point, then
//! an exchange's intent (each u64 LE; files of the 32- and 48-byte layouts read the rest as 0).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use mirrorfs_core::applier::Intent;
use mirrorfs_core::wire::VolumeId;

use crate::site::statefile;
use crate::site::volume::lock;

/// The peer's stream into this site, for `status` (`peer_receive`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReceiveStatus {
    /// Where this site listens (`--receive`).
    pub listen: String,
    pub connected: bool,
    /// The peer's records through this are applied here and durable (`STATE/peer-applied`;
    /// those that change nothing here follow within `net::peer::INERT_DEFER`).
    pub applied: u64,
    /// Times `STATE/peer-applied` was written since the mount: once per batch that changed
    /// something, batches that changed nothing together at most once per
    /// `net::peer::INERT_DEFER`.
    #[serde(default)]
    pub position_writes: u64,
    /// Peer records that failed here (journaled with their `Abort`).
    pub failed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The peer's initial copy under way here (`core::pair`): changes through the mount are
    /// refused until it is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyStatus>,
    /// This site has applied the peer's stream before (`STATE/peer-applied` names its volume).
    #[serde(default)]
    pub paired: bool,
    /// The volume's journal was empty on an empty tree when it first ran with `--peer`
    /// (`STATE/pair-born-empty`): while it holds record 1, its tree is what it made.
    #[serde(default)]
    pub born_empty: bool,
}

/// An initial copy from the peer, for `status`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CopyStatus {
    /// The peer, as `status` names it ("site 1", or "the peer" without write tokens).
    pub from: String,
    pub sync_id: u32,
    /// The copy's data received and applied so far (the sending site's `status` shows the
    /// total: its mirror line, `syncing X of Y`).
    pub bytes: u64,
}

/// `STATE/peer-copy`: an initial copy from the peer is under way here (its id). 8 bytes: magic
/// `MFPC`, the copy's id (u32 LE). Written durably before the copy's first record is applied,
/// removed durably once its `SyncDone` is applied.
pub struct CopyFile(PathBuf);

const COPY_MAGIC: [u8; 4] = *b"MFPC";

impl CopyFile {
    pub fn at(path: PathBuf) -> CopyFile {
        CopyFile(path)
    }

    /// The copy under way, if any.
    pub fn load(&self) -> Result<Option<u32>> {
        let bytes = match std::fs::read(&self.0) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", self.0.display())),
        };
        match (bytes.get(..4), bytes.get(4..8)) {
            (Some(m), Some(id)) if bytes.len() == 8 && m == COPY_MAGIC => {
                let id: [u8; 4] = id.try_into().unwrap_or_default();
                Ok(Some(u32::from_le_bytes(id)))
            }
            _ => bail!(
                "{} is damaged (it is replaced atomically, so this is not a crash): empty this site's tree and move the file away to receive the peer's copy again",
                self.0.display()
            ),
        }
    }

    pub fn store(&self, sync_id: u32) -> io::Result<()> {
        let mut b = COPY_MAGIC.to_vec();
        b.extend_from_slice(&sync_id.to_le_bytes());
        statefile::replace_durable(&self.0, &b, 0o600)
    }

    pub fn remove(&self) -> io::Result<()> {
        statefile::remove_durable(&self.0)
    }
}

/// Whether `backing` holds nothing but the state directory `hidden`.
pub fn tree_is_empty(backing: &Path, hidden: &[u8]) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    for e in std::fs::read_dir(backing)? {
        if e?.file_name().as_bytes() != hidden {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What this site says of its tree in the `Hello` of its stream to the peer (`core::pair`).
pub fn tree_note(
    vol: &crate::site::volume::Volume,
    backing: &Path,
    hidden: &[u8],
) -> mirrorfs_core::pair::TreeNote {
    if let Some(r) = vol.peer_receive.get() {
        if lock(r).copy.is_some() {
            return mirrorfs_core::pair::TreeNote::Copying;
        }
    }
    own_tree(vol, backing, hidden)
}

/// `Empty`, `Journal` or `Data` (`core::pair`): an unreadable tree is said to hold data (the
/// peer then never takes it for empty).
pub fn own_tree(
    vol: &crate::site::volume::Volume,
    backing: &Path,
    hidden: &[u8],
) -> mirrorfs_core::pair::TreeNote {
    use mirrorfs_core::pair::TreeNote;
    if tree_is_empty(backing, hidden).unwrap_or(false) {
        return TreeNote::Empty;
    }
    let born = vol.peer_receive.get().is_some_and(|r| lock(r).born_empty);
    if born && lock(&vol.order).journal.first_seq() <= 1 {
        TreeNote::Journal
    } else {
        TreeNote::Data
    }
}

/// `STATE/pair-born-empty` (4 bytes, `MFPB`): made at the first start with `--peer` of a volume
/// whose journal and tree are both empty. Returns whether it exists.
pub fn born_empty(
    state_file: &Path,
    journal_end: u64,
    backing: &Path,
    hidden: &[u8],
) -> Result<bool> {
    if state_file.exists() {
        return Ok(true);
    }
    if journal_end != 0 || !tree_is_empty(backing, hidden)? {
        return Ok(false);
    }
    statefile::replace_durable(state_file, b"MFPB", 0o600)
        .with_context(|| format!("cannot write {}", state_file.display()))?;
    Ok(true)
}

/// Makes `link` the link to this site's peer writable site (`mount --peer`): it sends our
/// records that came from the peer (`Origin::Peer` in their frames, `Volume::mutate_from_peer`)
/// as placeholders (`net::remote::next_for_link`). A `STATE/peer-origin` left by an older
/// version is honoured until the peer holds those records (`LegacyOrigins`).
pub fn attach_link(
    vol: &crate::site::volume::Volume,
    dir: &crate::site::state_dir::StateDir,
    link: &crate::site::volume::MirrorShared,
) -> Result<()> {
    let (first, end) = {
        let o = lock(&vol.order);
        (o.journal.first_seq(), o.journal.next_seq() - 1)
    };
    let legacy = LegacyOrigins::open(&dir.peer_origin_file(), first, end)?;
    let _ = link.peer.set(std::sync::Arc::new(legacy));
    Ok(())
}

/// `STATE/peer-origin` as versions before the record frame's origin flag kept it: the seqs of
/// our records that came from the peer, each a u64 LE, appended in order (a torn last one is
/// cut). Read once at the mount, for the records its journal still holds (`first..=end`);
/// never written again: those records' frames say nothing of their origin, so the file is
/// honoured until the peer acknowledged them durable, then removed (durably).
pub struct LegacyOrigins {
    path: PathBuf,
    live: Mutex<BTreeSet<u64>>,
}

/// Largest `STATE/peer-origin` read (it held at most twice its live seqs + 4,096).
const LEGACY_BYTES_MAX: u64 = 1 << 30;

impl LegacyOrigins {
    /// Reads `STATE/peer-origin`, if any, for a journal that holds records `first_held..=end`.
    pub fn open(path: &Path, first_held: u64, end: u64) -> Result<LegacyOrigins> {
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(f) => {
                f.take(LEGACY_BYTES_MAX)
                    .read_to_end(&mut bytes)
                    .with_context(|| format!("cannot read {}", path.display()))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        }
        // Seqs past the journal's end were lost with their records (the seqs are reused).
        let live: BTreeSet<u64> = bytes
            .chunks_exact(8)
            .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
            .filter(|s| (first_held..=end).contains(s))
            .collect();
        if live.is_empty() {
            statefile::remove_durable(path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        } else {
            tracing::info!(
                "{}: {} records of an older version's peer origins, honoured until the peer holds them",
                path.display(),
                live.len()
            );
        }
        Ok(LegacyOrigins {
            path: path.to_path_buf(),
            live: Mutex::new(live),
        })
    }

    /// Whether our record `seq` came from the peer as the file says.
    pub fn contains(&self, seq: u64) -> bool {
        lock(&self.live).contains(&seq)
    }

    /// The peer holds our records through `seq` durably: the file's seqs up to it are not
    /// needed any more; once none is left, the file goes.
    pub fn forget_through(&self, seq: u64) {
        let mut live = lock(&self.live);
        if live.is_empty() {
            return;
        }
        *live = live.split_off(&(seq.saturating_add(1)));
        if live.is_empty() {
            if let Err(e) = statefile::remove_durable(&self.path) {
                // Harmless: read again at the next mount, its seqs then before the journal's
                // first held record or acknowledged, it is removed then.
                tracing::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }

    /// Seqs remembered now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.live).len()
    }
}

/// `STATE/peer-applied`'s size (32 before reconciliation: read as `seen = point = 0`).
const POSITION_BYTES: usize = 64;
const POSITION_BYTES_V2: usize = 48;
const POSITION_BYTES_V1: usize = 32;
const POSITION_MAGIC: [u8; 4] = *b"MFPA";

/// An absent inode in the intent's layout.
const NO_INO: u64 = u64::MAX;

/// `STATE/peer-applied`: whose journal this site follows, and how far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerPosition {
    /// The peer's volume (`None` before the first connection).
    pub volume: Option<VolumeId>,
    /// The peer's records through this are applied here and durable.
    pub applied: u64,
    /// `--partition reconcile`: the largest of our seqs the peer had considered as of its record
    /// `applied` (`core::reconcile`; our data records after it are replayed after a restart).
    pub seen: u64,
    /// `--partition reconcile`: our records from this seq on were journaled after `applied`
    /// (the last change point of our stream).
    pub point: u64,
    /// The peer's record `applied + 1`, a barrier here (an exchange), as noted before it was
    /// applied (`core::applier::Intent`: its seq and its source's inode): when it comes again
    /// after a crash, whether it was done (`net::peer`). `None` once `applied` covers it.
    pub intent: Option<Intent>,
}

impl PeerPosition {
    pub fn load(path: &Path) -> Result<PeerPosition> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(PeerPosition::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        if !matches!(
            bytes.len(),
            POSITION_BYTES | POSITION_BYTES_V2 | POSITION_BYTES_V1
        ) || bytes[..4] != POSITION_MAGIC
            || bytes[4..8] != [0; 4]
        {
            bail!(
                "{} is damaged (it is replaced atomically, so this is not a crash): move it away to take the peer's stream from its first record again",
                path.display()
            );
        }
        let mut volume = [0u8; 16];
        volume.copy_from_slice(&bytes[8..24]);
        let at = |i: usize| {
            bytes
                .get(i..i + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        let applied = at(24);
        // Intent seq 0: none (peer seqs start at 1); a stale one (not the next record) too.
        let intent = match (at(48), at(56)) {
            (0, _) => None,
            (seq, _) if seq != applied + 1 => None,
            (seq, ino) => Some(Intent {
                seq,
                src_ino: (ino != NO_INO).then_some(ino),
            }),
        };
        Ok(PeerPosition {
            volume: Some(volume),
            applied,
            seen: at(32),
            point: at(40),
            intent,
        })
    }

    /// Replaces the file durably.
    pub fn store(&self, path: &Path) -> io::Result<()> {
        let mut b = Vec::with_capacity(POSITION_BYTES);
        b.extend_from_slice(&POSITION_MAGIC);
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&self.volume.unwrap_or_default());
        b.extend_from_slice(&self.applied.to_le_bytes());
        b.extend_from_slice(&self.seen.to_le_bytes());
        b.extend_from_slice(&self.point.to_le_bytes());
        let (iseq, iino) = self
            .intent
            .map_or((0, NO_INO), |i| (i.seq, i.src_ino.unwrap_or(NO_INO)));
        b.extend_from_slice(&iseq.to_le_bytes());
        b.extend_from_slice(&iino.to_le_bytes());
        // The fsync of the file and of its directory (`replace_durable`) is what the intent's
        // guarantee rests on: the barrier is applied only after it returned.
        statefile::replace_durable(path, &b, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `STATE/peer-origin` of an older version is honoured for the records the journal
    /// still holds, until the peer acknowledged them durable; then it is removed.
    #[test]
    fn an_older_versions_origins_are_honoured_until_the_peer_holds_them() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("peer-origin");
        let mut bytes: Vec<u8> = [3u64, 5, 9].iter().flat_map(|s| s.to_le_bytes()).collect();
        // A torn last seq (a crash while it was written) is cut.
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&p, &bytes).expect("write");
        // The journal lost record 9 in a power loss; it holds 4..=8 now.
        let o = LegacyOrigins::open(&p, 4, 8).expect("open");
        assert!(!o.contains(3), "before the journal's first record");
        assert!(o.contains(5));
        assert!(!o.contains(9), "past the journal's end: that seq is reused");
        assert_eq!(o.len(), 1);
        o.forget_through(4);
        assert!(o.contains(5) && p.exists(), "not acknowledged yet");
        o.forget_through(5);
        assert!(!o.contains(5));
        assert!(!p.exists(), "removed once the peer holds its records");
        // A file with nothing the journal holds goes at once; no file is no origin.
        std::fs::write(&p, 2u64.to_le_bytes()).expect("write");
        let o = LegacyOrigins::open(&p, 4, 8).expect("open");
        assert_eq!(o.len(), 0);
        assert!(!p.exists());
        let o = LegacyOrigins::open(&p, 1, 8).expect("open without a file");
        assert_eq!(o.len(), 0);
        assert!(!p.exists(), "not made");
    }

    /// A primary volume over the journal in `dir/journal`, its backing `dir/backing`.
    fn volume(dir: &Path) -> std::sync::Arc<crate::site::volume::Volume> {
        use crate::site::volume::{AckMode, FsyncWaits, Volume};
        use mirrorfs_core::journal::{Journal, JournalConfig};
        let store = crate::site::store::FileStore::open(&dir.join("journal")).expect("store");
        let (j, _) = Journal::open(store, JournalConfig::default()).expect("journal");
        let role = crate::site::engine::Role::Primary {
            backing: dir.join("backing"),
            ack: AckMode::Async,
            quorum: 0,
            fsync_waits: FsyncWaits::Mode,
        };
        std::sync::Arc::new(Volume::new(j, None, Vec::new(), &role))
    }

    fn peer_link() -> crate::site::volume::MirrorShared {
        crate::site::volume::MirrorShared::new(
            "peer".into(),
            PathBuf::new(),
            PathBuf::new(),
            Some("peer.example:7000".into()),
        )
    }

    fn mkdir(name: &str) -> mirrorfs_core::op::Op {
        mirrorfs_core::op::Op::Mkdir {
            path: mirrorfs_core::path::RelPath::new(name).expect("path"),
            mode: 0o755,
            uid: 0,
            gid: 0,
        }
    }

    /// Issue 7, "No echo": the flusher may make the journal durable at any time, so a power
    /// loss can keep a record the peer receiver journaled while losing everything else written
    /// since the last sync of the receiver's batch. After the restart the link to the peer
    /// must still send that record as a placeholder: sent back, it would put the peer's old
    /// change over what the peer wrote since.
    #[test]
    fn a_peer_record_durable_in_the_journal_is_not_sent_back_after_a_power_loss() {
        let d = tempfile::tempdir().expect("tempdir");
        let state = d.path().join("state");
        std::fs::create_dir_all(&state).expect("state");
        std::fs::create_dir_all(d.path().join("journal")).expect("journal dir");
        let dir = crate::site::state_dir::StateDir::at(&state);
        let origin_file = dir.peer_origin_file();
        {
            let vol = volume(d.path());
            let link = peer_link();
            attach_link(&vol, &dir, &link).expect("attach");
            // What of the origin file is durable now (absent: nothing).
            let durable_len = std::fs::metadata(&origin_file).map_or(None, |m| Some(m.len()));
            let ours = vol.mutate_beneath_unsettled(mkdir("ours"), |_| Ok(()));
            assert_eq!(ours.map(|(_, s)| s), Ok(1));
            // The peer receiver's journaling of the peer's record.
            let theirs = vol.mutate_from_peer(&mkdir("theirs"), |_| Ok(()));
            assert_eq!(theirs.map(|(_, s)| s), Ok(2));
            // The flusher's round: the journal is durable through both records.
            assert_eq!(vol.sync_journal().expect("sync"), 2);
            // The power loss, before the receiver's batch ended: every other file keeps only
            // what was durable.
            match durable_len {
                Some(n) => std::fs::OpenOptions::new()
                    .write(true)
                    .open(&origin_file)
                    .and_then(|f| f.set_len(n))
                    .expect("cut the unsynced tail"),
                None => match std::fs::remove_file(&origin_file) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => panic!("cannot remove {}: {e}", origin_file.display()),
                },
            }
        }
        // The restart, as the mount does it.
        let vol = volume(d.path());
        let link = peer_link();
        attach_link(&vol, &dir, &link).expect("attach again");
        let mut reader = mirrorfs_core::journal::Reader::new(1);
        let mut sent = Vec::new();
        while let Some(r) =
            crate::net::remote::next_for_link(&vol, &link, &mut reader, 2).expect("read")
        {
            sent.push(r);
        }
        assert_eq!(
            sent,
            vec![
                mirrorfs_core::op::Record {
                    seq: 1,
                    op: mkdir("ours")
                },
                mirrorfs_core::op::Record {
                    seq: 2,
                    op: mirrorfs_core::op::Op::Abort { seq: 2 }
                },
            ],
            "our own record goes as itself, the peer's as a placeholder"
        );
    }

    #[test]
    fn the_position_round_trips_and_damage_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("peer-applied");
        assert_eq!(
            PeerPosition::load(&p).expect("absent"),
            PeerPosition::default()
        );
        let pos = PeerPosition {
            volume: Some([7; 16]),
            applied: 42,
            seen: 17,
            point: 99,
            intent: Some(Intent {
                seq: 43,
                src_ino: Some(5),
            }),
        };
        pos.store(&p).expect("store");
        assert_eq!(PeerPosition::load(&p).expect("load"), pos);
        // An intent the position has passed is not read back.
        let passed = PeerPosition { applied: 43, ..pos };
        passed.store(&p).expect("store");
        assert_eq!(
            PeerPosition::load(&p).expect("load"),
            PeerPosition {
                intent: None,
                ..passed
            }
        );
        pos.store(&p).expect("store");
        // A file of the former layout (32 bytes) reads with no watermark and no point.
        let old = std::fs::read(&p).expect("read");
        std::fs::write(&p, &old[..32]).expect("write");
        assert_eq!(
            PeerPosition::load(&p).expect("load v1"),
            PeerPosition {
                seen: 0,
                point: 0,
                intent: None,
                ..pos
            }
        );
        std::fs::write(&p, b"garbage").expect("write");
        let e = PeerPosition::load(&p).expect_err("damaged");
        assert!(format!("{e:#}").contains("damaged"), "{e:#}");
    }

    #[test]
    fn the_copy_file_round_trips_is_removed_and_damage_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let c = CopyFile::at(d.path().join("peer-copy"));
        assert_eq!(c.load().expect("absent"), None);
        c.store(0x0102_0304).expect("store");
        assert_eq!(c.load().expect("load"), Some(0x0102_0304));
        c.remove().expect("remove");
        assert_eq!(c.load().expect("removed"), None);
        c.remove().expect("a missing file is removed already");
        std::fs::write(d.path().join("peer-copy"), b"MFPC").expect("write");
        let e = c.load().expect_err("short");
        assert!(format!("{e:#}").contains("damaged"), "{e:#}");
    }

    #[test]
    fn born_empty_only_for_an_empty_journal_on_an_empty_tree_and_then_for_good() {
        let d = tempfile::tempdir().expect("tempdir");
        let tree = d.path().join("tree");
        std::fs::create_dir_all(tree.join(".mirrorfs")).expect("state dir");
        let marker = d.path().join("pair-born-empty");
        // Records journaled already: not born empty.
        assert!(!born_empty(&marker, 3, &tree, b".mirrorfs").expect("journal"));
        std::fs::write(tree.join("f"), b"x").expect("file");
        // Data in the tree: not born empty.
        assert!(!born_empty(&marker, 0, &tree, b".mirrorfs").expect("data"));
        assert!(!marker.exists());
        std::fs::remove_file(tree.join("f")).expect("rm");
        assert!(tree_is_empty(&tree, b".mirrorfs").expect("empty"));
        assert!(born_empty(&marker, 0, &tree, b".mirrorfs").expect("born"));
        // Once made, it stays whatever the tree and journal hold later.
        std::fs::write(tree.join("f"), b"x").expect("file");
        assert!(born_empty(&marker, 9, &tree, b".mirrorfs").expect("kept"));
    }
}
