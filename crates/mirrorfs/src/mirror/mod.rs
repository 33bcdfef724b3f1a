//! Mirror workers (one thread per mirror) and the initial copy of a new mirror.

pub mod checkpoint;
pub mod drain;
pub mod mark;
pub mod operator;
pub mod resync;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use mirrorfs_core::applier::Applier;
use mirrorfs_core::feed::FeedReadError;
use mirrorfs_core::journal::Journal;
use mirrorfs_core::op::Op;
use mirrorfs_core::path::RelPath;
use mirrorfs_core::track::NameTracker;

use mirrorfs_core::worker::{Turn, Worker};

use crate::mirror::checkpoint::Checkpointer;
use crate::site::state_dir::MirrorStateDir;
use crate::site::store::{FileCursor, FileStore};
use crate::site::volume::{
    lock, open_cursor, MirrorPhase, MirrorShared, Ordered, RecordFeed, Volume,
};
use crate::sys;
use crate::tree::dirtree::{tree_err, DirTree};
use crate::tree::walk::Visit;

/// Applies the journal to one mirror until the volume stops: the thread around the core's
/// [`Worker`] (which decides when to checkpoint, what to retry and when the mirror diverged).
/// This shell reads the feed under the volume's locks, keeps the identity mark checked, publishes
/// positions and the phase for `status`, and sleeps when told to.
pub fn run_worker(vol: Arc<Volume>, m: Arc<MirrorShared>, applier: Applier) {
    let Some((mut tree, mut cursor)) = open_tree_and_cursor(&m) else {
        return;
    };
    let mut feed = RecordFeed::new(applier.next_seq());
    let clock = Instant::now();
    let idle = m.checkpoint_when_idle.load(Ordering::Relaxed);
    let ckpt = match spawn_checkpointer(&vol, &m) {
        Ok(c) => c,
        Err(e) => {
            set_retrying(&m, format!("cannot start the checkpoint thread: {e}"));
            return;
        }
    };
    let mut worker = Worker::new(applier, clock.elapsed(), idle).offload_checkpoints();
    let mut mark_checked: Option<Instant> = None;
    loop {
        if m.detached() || m.end_worker.load(Ordering::Acquire) {
            return;
        }
        if lock(&vol.progress).stopping {
            // Stopping: the shutdown already waited for what it wanted applied (an initial copy
            // still running is abandoned; the next mount copies again). Records left are
            // applied after the restart, from the cursor.
            drop(ckpt);
            return stop_worker(&vol, &m, &mut worker, &mut tree, &mut cursor);
        }
        if mark_checked.is_none_or(|t| t.elapsed() >= MARK_CHECK_EVERY) {
            mark_checked = Some(Instant::now());
            match recheck_mark(&vol, &m, &mut tree) {
                Flow::Go => {}
                Flow::Again => {
                    mark_checked = None;
                    continue;
                }
                Flow::End => return,
            }
        }
        crate::mirror::operator::take_request(&m, worker.applier_mut());
        let turn = match ckpt.take_result() {
            // The checkpoint thread's sync ended: the cursor moves to what it made durable.
            Some(r) => Ok(worker.synced(&mut cursor, r)),
            None => {
                let want = m.want_durable.load(Ordering::Acquire);
                worker.turn(&mut tree, &mut cursor, clock.elapsed(), want, || {
                    feed.next(&vol)
                })
            }
        };
        let turn = match turn {
            Ok(Turn::SyncStart { .. }) => match tree.sync_handle() {
                Ok(fd) => match ckpt.start(fd) {
                    Ok(()) => continue,
                    Err(e) => Ok(worker.synced(&mut cursor, Err(e))),
                },
                Err(e) => Ok(worker.synced(&mut cursor, Err(tree_err(&RelPath::root(), e)))),
            },
            other => other,
        };
        if let Flow::End = publish(&vol, &m, &feed, &ckpt, turn) {
            return;
        }
    }
}

/// The worker's checkpoint thread; it wakes the worker (sleeping on the volume's `changed`)
/// when a sync ends.
fn spawn_checkpointer(vol: &Arc<Volume>, m: &MirrorShared) -> io::Result<Checkpointer> {
    let v = vol.clone();
    Checkpointer::spawn(&m.name, move || {
        let _p = lock(&v.progress);
        v.changed.notify_all();
    })
}

/// What the worker's loop does next.
enum Flow {
    Go,
    Again,
    End,
}

/// Every `MARK_CHECK_EVERY`: the mirror's identity mark is still right (else the worker waits as
/// `refused`); if the right tree came back at the path, it is applied to, not what the old
/// descriptor still points at.
fn recheck_mark(vol: &Volume, m: &MirrorShared, tree: &mut DirTree) -> Flow {
    match wait_for_mark(vol, m) {
        MarkWait::Stop => Flow::End,
        MarkWait::Ok => Flow::Go,
        MarkWait::Back => match DirTree::open(&m.path) {
            Ok(t) => {
                *tree = t;
                Flow::Go
            }
            Err(e) => {
                set_retrying(m, format!("cannot open {}: {e}", m.path.display()));
                std::thread::sleep(Duration::from_secs(1));
                Flow::Again
            }
        },
    }
}

/// Publishes what one turn of the worker did (positions, phase, wake-ups for waiters) and does
/// what it asks of the thread (wait, sleep before a retry, stop on a divergence).
fn publish(
    vol: &Volume,
    m: &MirrorShared,
    feed: &RecordFeed,
    ckpt: &Checkpointer,
    turn: Result<Turn, FeedReadError>,
) -> Flow {
    match turn {
        Ok(Turn::Checkpointed { checkpoint }) => {
            vol.publish_mirror_positions(|| m.checkpoint.store(checkpoint, Ordering::Release));
        }
        Ok(Turn::Applied {
            seq,
            data_bytes,
            checkpoint,
            copying,
            copy_done,
        }) => {
            if let Some(done) = copy_done {
                copy_complete(m, done);
            }
            crate::trace::event("applied", format_args!("{seq}"));
            m.applied_bytes.fetch_add(data_bytes, Ordering::Relaxed);
            m.records_applied.fetch_add(1, Ordering::Relaxed);
            // Every record applied wakes the waiters, not only a moved checkpoint: a local
            // mirror's writers with `--ack received` or `network` wait for `applied`, and a
            // daemon's acks carry it.
            vol.publish_mirror_positions(|| {
                m.applied.store(seq, Ordering::Release);
                m.checkpoint.store(checkpoint, Ordering::Release);
            });
            set_applying(m, copying);
        }
        Ok(Turn::Skipped { seq }) => {
            vol.publish_mirror_positions(|| m.applied.store(seq, Ordering::Release));
        }
        Ok(Turn::Idle) => {
            let p = lock(&vol.progress);
            // A sync that ended is checked under the lock its thread takes to wake us.
            if !p.stopping && !feed.moved(&p) && !ckpt.ended() {
                let _ = vol.changed.wait_timeout(p, Duration::from_millis(100));
            }
        }
        Ok(Turn::Retry {
            after,
            error,
            no_space,
        }) => {
            tracing::warn!(
                "mirror {}: {error}; retrying in {:.1} s",
                m.name,
                after.as_secs_f64()
            );
            m.count_error("apply");
            set_retrying(m, error);
            if no_space {
                give_journal_space_back(vol, m);
            }
            std::thread::sleep(after);
        }
        // Started by the loop; never handed here.
        Ok(Turn::SyncStart { .. }) => {}
        Ok(Turn::Diverged { reason }) => {
            m.count_error("diverged");
            tracing::error!("mirror {}: {reason}", m.name);
            m.mark_needs_resync(&reason);
            vol.changed.notify_all();
            return Flow::End;
        }
        Err(e) => {
            let reason = format!("cannot read the journal: {e}");
            m.count_error("journal_read");
            tracing::error!("mirror {}: {reason}", m.name);
            m.mark_needs_resync(&reason);
            return Flow::End;
        }
    }
    Flow::Go
}

/// The mirror tree is out of space. If it shares its file system with the journal (a daemon's
/// mirror directory and its state directory, or a local mirror on the primary's disk), the
/// journal gives back the space it reserved ahead of its end: else it could hold the very space
/// the mirror needs to apply the records the journal keeps for it, and the mirror would never
/// catch up, even after space was freed.
fn give_journal_space_back(vol: &Volume, m: &MirrorShared) {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &std::path::Path| std::fs::metadata(p).map(|md| md.dev()).ok();
    let tree = dev(&m.path);
    if tree.is_none() || tree != dev(&m.state_dir) {
        return;
    }
    match lock(&vol.order).journal.release_spare() {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            "mirror {}: the journal gave back {} KiB it had reserved on the same file system",
            m.name,
            n >> 10
        ),
        Err(e) => tracing::warn!(
            "mirror {}: the journal could not give back its reserved space: {e}",
            m.name
        ),
    }
}

fn open_tree_and_cursor(m: &MirrorShared) -> Option<(DirTree, FileCursor)> {
    let tree = DirTree::open(&m.path).map_err(|e| {
        set_retrying(m, format!("cannot open {}: {e}", m.path.display()));
    });
    let cursor = open_cursor(m).map_err(|e| set_retrying(m, format!("cannot open cursor: {e}")));
    Some((tree.ok()?, cursor.ok()?))
}

/// The worker's last checkpoint, then `stopped`.
fn stop_worker(
    vol: &Volume,
    m: &MirrorShared,
    worker: &mut Worker,
    tree: &mut DirTree,
    cursor: &mut FileCursor,
) {
    match worker.stop(tree, cursor) {
        Ok(checkpoint) => m.checkpoint.store(checkpoint, Ordering::Release),
        Err(e) => tracing::warn!(
            "mirror {}: the last checkpoint before stopping failed ({e}); the next start replays from the one before",
            m.name
        ),
    }
    *lock(&m.phase) = MirrorPhase::Stopped;
    vol.changed.notify_all();
}

/// The mirror's initial copy reached its `SyncDone`. Once that is durable (`done` is `Ok`), the
/// `SYNCING` marker goes, so a restart resumes from the cursor instead of copying again; if the
/// checkpoint failed, the marker stays and the next mount copies again (safe).
fn copy_complete(m: &MirrorShared, done: Result<(), String>) {
    crate::mirror::operator::copy_done(m, done.as_ref().err().map(String::as_str));
    match done {
        Ok(()) => {
            if let Err(e) = MirrorStateDir::at(&m.state_dir).clear_syncing() {
                tracing::warn!(
                    "mirror {}: cannot remove the copy's marker: {e}; the next mount copies it again",
                    m.name
                );
            }
        }
        Err(e) => tracing::warn!(
            "mirror {}: checkpoint after the initial sync failed: {e}; the next mount copies it again",
            m.name
        ),
    }
}

/// After a record was applied: `live` means the copy is complete on the mirror, from then on a
/// consistent prefix. While an initial copy is still being applied the mirror is a mix and stays
/// `syncing` (a retry that succeeds returns to it).
fn set_applying(m: &MirrorShared, copying: bool) {
    let mut phase = lock(&m.phase);
    if !copying {
        if !matches!(*phase, MirrorPhase::Live) {
            *phase = MirrorPhase::Live;
        }
    } else if matches!(*phase, MirrorPhase::Retrying { .. }) {
        *phase = MirrorPhase::Syncing {
            done_bytes: 0,
            total_bytes: 0,
        };
    }
}

fn set_retrying(m: &MirrorShared, error: String) {
    *lock(&m.phase) = MirrorPhase::Retrying {
        error,
        since_unix: sys::now().sec as u64,
    };
}

/// How often a running mirror's identity mark is read again.
const MARK_CHECK_EVERY: Duration = Duration::from_secs(5);

/// While the mirror's tree does not carry its identity mark (`mark.rs`): `refused` with the
/// reason, nothing applied, re-checked every second. Returns false if the volume stops first.
enum MarkWait {
    Ok,
    /// It was missing or foreign and is back.
    Back,
    Stop,
}

fn wait_for_mark(vol: &Volume, m: &MirrorShared) -> MarkWait {
    let mut reported = false;
    while let Some(why) = crate::mirror::mark::problem(m) {
        if !reported {
            tracing::error!("mirror {}: {why}", m.name);
            *lock(&m.phase) = MirrorPhase::Refused {
                reason: why,
                since_unix: sys::now().sec as u64,
            };
            vol.changed.notify_all();
            reported = true;
        }
        let p = lock(&vol.progress);
        if p.stopping {
            drop(p);
            *lock(&m.phase) = MirrorPhase::Stopped;
            vol.changed.notify_all();
            return MarkWait::Stop;
        }
        if m.detached() || m.end_worker.load(Ordering::Acquire) {
            return MarkWait::Stop;
        }
        let _ = vol.changed.wait_timeout(p, Duration::from_secs(1));
    }
    if !reported {
        return MarkWait::Ok;
    }
    tracing::info!("mirror {}: its identity mark is back; resuming", m.name);
    *lock(&m.phase) = MirrorPhase::Live;
    vol.changed.notify_all();
    MarkWait::Back
}

/// The id a mirror's `Sync` records carry.
pub fn sync_id(m: &MirrorShared) -> u32 {
    crc32c::crc32c(m.path.as_os_str().as_bytes()) | 1
}

/// Live initial copy of a new mirror through the journal (see `Op::Sync`):
/// 1. under one hold of the order lock, the whole namespace (directories, empty files with their
///    final mode and owner, symlinks, special files, hard links, xattrs, directory times);
/// 2. file data, one chunk (≤ 1 MiB of a data extent, holes skipped) per hold of the order lock,
///    read from the file's current name, so each chunk is ordered against live writes;
/// 3. `SyncDone`. Until then the mirror applies everything idempotently and reports `syncing`.
pub fn live_sync(
    vol: Arc<Volume>,
    backing: &Path,
    m: Arc<MirrorShared>,
    hidden: Option<Vec<u8>>,
) -> io::Result<()> {
    let id = sync_id(&m);
    let root: std::os::fd::OwnedFd = fs::File::open(backing)?.into();
    let copy = TrackedCopy::new(&vol, id);
    m.copy_journaled.store(0, Ordering::Release);
    let (files, total) = {
        let mut guard = lock(&vol.order);
        let (files, total, last) = {
            let Ordered {
                journal, copies, ..
            } = &mut *guard;
            NamespaceCopy {
                journal,
                tracker: copies.entry(id).or_default(),
                root: root.as_fd(),
                id,
                links: HashMap::new(),
                files: Vec::new(),
                total: 0,
            }
            .run(hidden.as_deref())?
        };
        vol.settle(guard, last, 0);
        (files, total)
    };
    tracing::info!(
        "mirror {}: namespace copied ({} files, {} bytes of data to copy)",
        m.name,
        files.len(),
        total
    );
    let message = format!("initial sync of {}", m.path.display());
    let mut data = DataPass::new(&copy, &m, root.as_fd(), total, message, 1 << 20);
    for ino in files {
        data.copy_file(ino)?;
        copy.done_with(ino);
    }
    let seq = copy.finish(&data.pb)?;
    m.copy_journaled.store(seq, Ordering::Release);
    tracing::info!("mirror {}: initial sync streamed ({} bytes); it is consistent once it applies record {seq}", m.name, data.done);
    Ok(())
}

/// Step 1 of an initial copy, under one hold of the order lock: journals every entry walked and
/// notes the regular files whose data step 2 copies.
struct NamespaceCopy<'a> {
    journal: &'a mut Journal<FileStore>,
    tracker: &'a mut NameTracker,
    root: BorrowedFd<'a>,
    id: u32,
    /// The first name walked of each file with several links.
    links: HashMap<u64, RelPath>,
    /// The regular files (by inode) and their bytes.
    files: Vec<u64>,
    total: u64,
}

impl NamespaceCopy<'_> {
    /// Journals `op` as one of the copy's `Sync` records.
    fn emit(&mut self, op: Op) -> io::Result<()> {
        append_sync(self.journal, self.id, op).map(drop)
    }

    /// Walks the tree (but `hidden`), then the root's mode, owner and xattrs; returns the files
    /// to copy, their bytes and the last record journaled.
    fn run(mut self, hidden: Option<&[u8]>) -> io::Result<(Vec<u64>, u64, u64)> {
        let root = self.root;
        crate::tree::walk::walk(root, hidden, |v| self.visit(v))?;
        for op in root_meta(root, &[])? {
            self.emit(op)?;
        }
        Ok((self.files, self.total, self.journal.next_seq() - 1))
    }

    /// One entry: what creates it, its xattrs and (but a directory's) its mtime; a directory's
    /// mtime once everything below it is done.
    fn visit(&mut self, v: Visit<'_>) -> io::Result<()> {
        let (path, name, st, dfd) = match v {
            Visit::DirDone { path, st } => return self.emit(mtime_of(path, st)),
            Visit::Entry {
                path,
                name,
                st,
                dir,
            } => (path, name, st, dir),
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            if self.regular_file(path, st)? {
                return Ok(());
            }
            // A regular file's mtime comes with the end of its data (step 2), which sets it
            // anyway: only its xattrs here.
            for op in xattr_ops(self.root, path, &[]) {
                self.emit(op)?;
            }
            return Ok(());
        }
        // A symlink's xattrs (security.*, trusted.*) and times follow below.
        self.emit(creation_op(path, name, st, dfd)?)?;
        for op in entry_meta(self.root, path, st, &[]) {
            self.emit(op)?;
        }
        Ok(())
    }

    /// A regular file: a further name of a file already walked is a link to its first (and
    /// true is returned: nothing else to send); else an empty file whose data step 2 copies.
    fn regular_file(&mut self, path: &RelPath, st: &libc::stat) -> io::Result<bool> {
        self.tracker.add(st.st_ino, path.clone());
        if st.st_nlink > 1 {
            if let Some(first) = self.links.get(&st.st_ino) {
                let op = Op::Link {
                    from: first.clone(),
                    to: path.clone(),
                };
                self.emit(op)?;
                return Ok(true);
            }
            self.links.insert(st.st_ino, path.clone());
        }
        self.emit(Op::Create {
            path: path.clone(),
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        })?;
        self.total += st.st_size as u64;
        self.files.push(st.st_ino);
        Ok(false)
    }
}

/// Step 2 of a live copy: the files' data, one chunk per hold of the order lock, read from each
/// file's current name; and the progress so far, on a progress bar and in `status`.
pub(crate) struct DataPass<'a> {
    copy: &'a TrackedCopy<'a>,
    m: &'a MirrorShared,
    root: BorrowedFd<'a>,
    pb: indicatif::ProgressBar,
    buf: Vec<u8>,
    /// Bytes of data done, of `total`.
    done: u64,
    total: u64,
}

impl<'a> DataPass<'a> {
    /// A data pass of `total` bytes, read `buf_len` bytes at most at a time; `message` labels
    /// its progress bar.
    pub(crate) fn new(
        copy: &'a TrackedCopy<'a>,
        m: &'a MirrorShared,
        root: BorrowedFd<'a>,
        total: u64,
        message: String,
        buf_len: usize,
    ) -> Self {
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_message(message);
        DataPass {
            copy,
            m,
            root,
            pb,
            buf: vec![0u8; buf_len],
            done: 0,
            total,
        }
    }

    /// Copies the data extents of the file walked as `ino` (holes skipped), then its size and
    /// mtime; nothing more once it has no name left.
    fn copy_file(&mut self, ino: u64) -> io::Result<()> {
        let (vol, id) = (self.copy.vol, self.copy.id);
        let mut off = 0u64;
        loop {
            let Some((mut o, path, f, st)) = self.copy.next_chunk(self.m, self.root, ino)? else {
                return Ok(());
            };
            let size = st.st_size as u64;
            let data = match sys::lseek(f.as_fd(), off as i64, libc::SEEK_DATA) {
                Ok(d) if (d as u64) < size => Some(d as u64),
                _ => None,
            };
            let Some(data) = data else {
                let last = append_end(&mut o.journal, id, &path, &st)?;
                vol.settle(o, last, 0);
                return Ok(());
            };
            let hole = sys::lseek(f.as_fd(), data as i64, libc::SEEK_HOLE)
                .map(|h| h as u64)
                .unwrap_or(size)
                .min(size);
            let want = ((hole - data) as usize).min(self.buf.len());
            let n = sys::pread(f.as_fd(), &mut self.buf[..want], data)?;
            if n == 0 {
                off = hole.max(data + 1);
                continue;
            }
            let end = data + n as u64;
            let op = Op::Write {
                path: path.clone(),
                offset: data,
                data: self.buf[..n].to_vec(),
            };
            let mut seq = append_sync(&mut o.journal, id, op)?;
            // The chunk reached the end of the file: no data after it, so its size and mtime
            // follow under the same hold of the order lock (the next turn would find just that,
            // after one more open, fstat and lseek).
            let at_end = end >= size;
            if at_end {
                seq = append_end(&mut o.journal, id, &path, &st)?;
            }
            vol.settle(o, seq, n as u64);
            self.done += n as u64;
            self.copy.progress(self.m, &self.pb, self.done, self.total);
            if at_end {
                return Ok(());
            }
            off = end;
        }
    }
}

/// The end of a file's data in a copy: its size (`Truncate`, for a file that ends in a hole)
/// and mtime, as `st` has them; returns the last record's seq.
fn append_end(
    journal: &mut Journal<FileStore>,
    id: u32,
    path: &RelPath,
    st: &libc::stat,
) -> io::Result<u64> {
    let size = st.st_size as u64;
    append_sync(
        journal,
        id,
        Op::Truncate {
            path: path.clone(),
            size,
        },
    )?;
    append_sync(journal, id, mtime_of(path, st))
}

/// A live copy's entry in `Ordered::copies`: the current names of the files it still has to read.
/// Removed when the copy ends, however it ends.
pub(crate) struct TrackedCopy<'a> {
    vol: &'a Volume,
    id: u32,
}

impl<'a> TrackedCopy<'a> {
    pub(crate) fn new(vol: &'a Volume, id: u32) -> Self {
        // A restarted copy of the same mirror starts from a fresh walk.
        lock(&vol.order).copies.remove(&id);
        TrackedCopy { vol, id }
    }

    /// The start of each chunk of a file's data: waits while the mirror is far behind
    /// (`throttle`), stops if the copy was cancelled, then takes the order lock and opens the file
    /// walked as `ino` under its current name, so no change can come between the read and the
    /// record the caller journals. `None` when the file has no name left (its removal is journaled
    /// already).
    #[allow(clippy::type_complexity)]
    pub(crate) fn next_chunk(
        &self,
        m: &MirrorShared,
        root: BorrowedFd<'_>,
        ino: u64,
    ) -> io::Result<Option<(MutexGuard<'a, Ordered>, RelPath, OwnedFd, libc::stat)>> {
        throttle(self.vol, m);
        if m.copy_cancelled() {
            return Err(io::Error::other(
                "copy stopped (mirror detached or copy restarted)",
            ));
        }
        let o = lock(&self.vol.order);
        Ok(self
            .open_current(&o, root, ino)
            .map(|(path, f, st)| (o, path, f, st)))
    }

    fn open_current(
        &self,
        o: &Ordered,
        root: BorrowedFd<'_>,
        ino: u64,
    ) -> Option<(RelPath, OwnedFd, libc::stat)> {
        let names = o.copies.get(&self.id)?.names(ino);
        names.iter().find_map(|path| {
            let f = crate::tree::dirtree::open_in(root, path, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
                .ok()?;
            let st = sys::fstat(f.as_fd()).ok()?;
            (st.st_ino == ino && st.st_mode & libc::S_IFMT == libc::S_IFREG)
                .then(|| (path.clone(), f, st))
        })
    }

    /// The copy is done with `ino`.
    pub(crate) fn done_with(&self, ino: u64) {
        if let Some(t) = lock(&self.vol.order).copies.get_mut(&self.id) {
            t.forget(ino);
        }
    }

    /// `done` of `total` bytes copied: the progress bar and `status`.
    pub(crate) fn progress(
        &self,
        m: &MirrorShared,
        pb: &indicatif::ProgressBar,
        done: u64,
        total: u64,
    ) {
        pb.set_position(done.min(total));
        *lock(&m.phase) = MirrorPhase::Syncing {
            done_bytes: done,
            total_bytes: total,
        };
    }

    /// Journals `SyncDone`: the mirror is consistent once it applies the returned record.
    pub(crate) fn finish(&self, pb: &indicatif::ProgressBar) -> io::Result<u64> {
        let mut o = lock(&self.vol.order);
        let seq = o
            .journal
            .append(&Op::SyncDone { mirror: self.id })
            .map_err(io::Error::other)?;
        self.vol.settle(o, seq, 0);
        pb.finish_and_clear();
        Ok(seq)
    }
}

impl Drop for TrackedCopy<'_> {
    fn drop(&mut self) {
        lock(&self.vol.order).copies.remove(&self.id);
    }
}

/// Journals `op` as a `Sync` record of the copy `id` (only that copy's mirror applies it);
/// returns its seq.
pub(crate) fn append_sync(
    journal: &mut mirrorfs_core::journal::Journal<crate::site::store::FileStore>,
    id: u32,
    op: Op,
) -> io::Result<u64> {
    journal
        .append(&Op::Sync {
            mirror: id,
            op: Box::new(op),
        })
        .map_err(io::Error::other)
}

/// The modification time of `path`, as `st` has it, as a change a copy sends.
pub(crate) fn mtime_of(path: &RelPath, st: &libc::stat) -> Op {
    Op::SetTimes {
        path: path.clone(),
        atime: None,
        mtime: Some(ts(st.st_mtime, st.st_mtime_nsec)),
    }
}

/// What a copy (initial or resync) sends about the entry at `path` after the op that creates or
/// keeps it, `st` being its `lstat`: its xattrs ([`xattr_ops`]) and, but for a directory's (set
/// once everything below it is done), its mtime. The one description of an entry's metadata
/// both copies share.
pub(crate) fn entry_meta(
    root: BorrowedFd<'_>,
    path: &RelPath,
    st: &libc::stat,
    mirror_has: &[Vec<u8>],
) -> Vec<Op> {
    let mut ops = xattr_ops(root, path, mirror_has);
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        ops.push(mtime_of(path, st));
    }
    ops
}

/// What a copy sends about the root directory once everything below it is done (its mtime came
/// with the walk's last step): its mode, owner and xattrs ([`xattr_ops`]).
pub(crate) fn root_meta(root: BorrowedFd<'_>, mirror_has: &[Vec<u8>]) -> io::Result<Vec<Op>> {
    let st = sys::fstat(root)?;
    let mut ops = vec![
        Op::SetMode {
            path: RelPath::root(),
            mode: st.st_mode & 0o7777,
        },
        Op::SetOwner {
            path: RelPath::root(),
            uid: Some(st.st_uid),
            gid: Some(st.st_gid),
        },
    ];
    ops.extend(xattr_ops(root, &RelPath::root(), mirror_has));
    Ok(ops)
}

/// The ops that give the mirror's entry at `path` the xattrs of the primary's: the removal of
/// each of `mirror_has` (the names the mirror's entry carries, if the copy keeps it) that the
/// primary's entry lacks, then each attribute it has. Nothing is removed if the primary's names
/// cannot be listed, nor `security.selinux`: the mirror's own policy labels its entries (an
/// initial copy leaves that label too).
pub(crate) fn xattr_ops(root: BorrowedFd<'_>, path: &RelPath, mirror_has: &[Vec<u8>]) -> Vec<Op> {
    let have = list_xattrs(root, path);
    let mut ops = Vec::new();
    if let Some(have) = &have {
        for name in mirror_has {
            if name.as_slice() != b"security.selinux" && !have.iter().any(|(n, _)| n == name) {
                ops.push(Op::RemoveXattr {
                    path: path.clone(),
                    name: name.clone(),
                });
            }
        }
    }
    for (name, value) in have.unwrap_or_default() {
        ops.push(Op::SetXattr {
            path: path.clone(),
            name,
            value,
            flags: 0,
        });
    }
    ops
}

/// Keeps the initial sync from filling the journal: waits while the mirror is far behind.
pub(crate) fn throttle(vol: &Volume, m: &MirrorShared) {
    loop {
        let (behind, bytes, max) = {
            let o = lock(&vol.order);
            (
                o.journal
                    .next_seq()
                    .saturating_sub(1 + m.applied.load(Ordering::Acquire)),
                o.journal.bytes(),
                o.journal.config().journal_bytes_max,
            )
        };
        // Leave the journal room for live writes: half of it, but never less than the segment
        // being written can take (it is never removed), or a small limit would stall the copy.
        let room = (max / 2).max(max.saturating_sub(32 << 20));
        if (behind < 4096 && bytes < room) || m.copy_cancelled() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ts(sec: i64, nsec: i64) -> mirrorfs_core::op::Timespec {
    mirrorfs_core::op::Timespec {
        sec,
        nsec: nsec as u32,
    }
}

/// The xattrs (names and values) of the entry at `path`; `None` if its names cannot be listed.
fn list_xattrs(root: BorrowedFd<'_>, path: &RelPath) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let fd = crate::tree::dirtree::open_in(root, path, libc::O_PATH | libc::O_NOFOLLOW, 0).ok()?;
    let mut out = Vec::new();
    for name in xattr_names(fd.as_fd()).ok()? {
        let mut val = vec![0u8; 65536];
        if let Ok(vn) = sys::lgetxattr_fd(fd.as_fd(), &name, &mut val) {
            val.truncate(vn);
            out.push((name, val));
        }
    }
    Some(out)
}

/// The names of the xattrs of the entry `fd` (opened with `O_PATH | O_NOFOLLOW`, or any way);
/// none where the file system has no xattrs.
pub(crate) fn xattr_names(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut names = vec![0u8; 65536];
    let n = match sys::llistxattr_fd(fd, &mut names) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => 0,
        Err(e) => return Err(e),
    };
    Ok(names[..n]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// The ops that recreate the entry at `path` (`st` its `lstat`, `name` its name in the directory
/// `dfd`, beneath `root`) under the name `as_path`, but for a regular file's data, which the
/// caller streams in between: first the op that creates it (a regular file: an empty `Create`;
/// otherwise [`creation_op`]), then its attributes: its xattrs (as [`xattr_ops`] lists them),
/// owner, mode (not a symlink's: it has none of its own) and mtime, a directory's included (its
/// entries are not part of it). A reintegration's `Fetch` (`net/serve/reintegration.rs`) sends
/// these; the copies build theirs from the same [`creation_op`], [`xattr_ops`] and
/// [`mtime_of`].
pub(crate) fn entry_ops(
    root: BorrowedFd<'_>,
    path: &RelPath,
    as_path: &RelPath,
    name: &[u8],
    st: &libc::stat,
    dfd: BorrowedFd<'_>,
) -> io::Result<(Op, Vec<Op>)> {
    let (uid, gid) = (st.st_uid, st.st_gid);
    let create = if st.st_mode & libc::S_IFMT == libc::S_IFREG {
        Op::Create {
            path: as_path.clone(),
            mode: st.st_mode & 0o7777,
            uid,
            gid,
        }
    } else {
        creation_op(as_path, name, st, dfd)?
    };
    let mut attrs: Vec<Op> = xattr_ops(root, path, &[])
        .into_iter()
        .filter_map(|op| match op {
            Op::SetXattr {
                name, value, flags, ..
            } => Some(Op::SetXattr {
                path: as_path.clone(),
                name,
                value,
                flags,
            }),
            _ => None,
        })
        .collect();
    attrs.push(Op::SetOwner {
        path: as_path.clone(),
        uid: Some(uid),
        gid: Some(gid),
    });
    if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
        attrs.push(Op::SetMode {
            path: as_path.clone(),
            mode: st.st_mode & 0o7777,
        });
    }
    attrs.push(mtime_of(as_path, st));
    Ok((create, attrs))
}

/// The op that makes a directory, a symlink (its target read beneath `dfd`) or a special file
/// as the primary has it: one description for the initial copy and the resync. A regular file
/// is copied through its own steps, never made here.
pub(crate) fn creation_op(
    path: &RelPath,
    name: &[u8],
    st: &libc::stat,
    dfd: std::os::fd::BorrowedFd<'_>,
) -> io::Result<Op> {
    let (uid, gid, mode) = (st.st_uid, st.st_gid, st.st_mode);
    Ok(match mode & libc::S_IFMT {
        libc::S_IFDIR => Op::Mkdir {
            path: path.clone(),
            mode: mode & 0o7777,
            uid,
            gid,
        },
        libc::S_IFLNK => Op::Symlink {
            path: path.clone(),
            target: sys::readlinkat(dfd, OsStr::from_bytes(name))?,
            uid,
            gid,
        },
        _ => Op::Mknod {
            path: path.clone(),
            mode,
            rdev: st.st_rdev,
            uid,
            gid,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every record the worker applies wakes whoever waits for the mirror's positions (a local
    /// mirror's writers with `--ack received` or `network`, a mirror daemon's ack sender), at
    /// once. Each waiter here checks `applied` under the progress lock and then sleeps for up
    /// to five seconds where those sleep for 50 ms: a missing wake-up (`applied` used to be
    /// stored without one) or one lost between the check and the wait shows as a five-second
    /// wait. Half the records are published at once (the race), half after the waiter had a
    /// millisecond to fall asleep (the missing wake-up).
    #[test]
    fn every_applied_record_wakes_those_waiting_for_it() {
        let d = tempfile::tempdir().expect("tempdir");
        let journal_dir = d.path().join("journal");
        fs::create_dir(&journal_dir).expect("journal dir");
        let store = FileStore::open(&journal_dir).expect("store");
        let (j, _) =
            Journal::open(store, mirrorfs_core::journal::JournalConfig::default()).expect("open");
        let role = crate::site::engine::Role::Mirror {
            former_primary: false,
        };
        let vol = Arc::new(Volume::new(j, None, Vec::new(), &role));
        let m = Arc::new(MirrorShared::new(
            "m".into(),
            d.path().join("tree"),
            d.path().join("state"),
            None,
        ));
        let feed = RecordFeed::new(1);
        let ckpt = Checkpointer::spawn("test", || {}).expect("checkpoint thread");
        let patience = Duration::from_secs(5);
        for seq in 1..=100u64 {
            let waiter = {
                let (v, m) = (vol.clone(), m.clone());
                std::thread::spawn(move || {
                    let t0 = Instant::now();
                    let mut p = lock(&v.progress);
                    while m.applied.load(Ordering::Acquire) < seq && t0.elapsed() < patience {
                        p = v
                            .changed
                            .wait_timeout(p, patience)
                            .map(|r| r.0)
                            .unwrap_or_else(|e| e.into_inner().0);
                    }
                    t0.elapsed()
                })
            };
            if seq % 2 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let turn = Turn::Applied {
                seq,
                data_bytes: 0,
                checkpoint: 0,
                copying: false,
                copy_done: None,
            };
            assert!(matches!(
                publish(&vol, &m, &feed, &ckpt, Ok(turn)),
                Flow::Go
            ));
            let waited = waiter.join().expect("waiter");
            assert_eq!(m.applied.load(Ordering::Acquire), seq);
            assert!(
                waited < Duration::from_secs(1),
                "record {seq} applied, but its waiter slept {waited:?}: no wake-up"
            );
        }
    }
}
