//! The narrow storage trait the journal is written against, and an in-memory implementation with a
//! crash model for the simulation.
//!
//! Durability contract the journal relies on (named fsync points, see `docs/journal.md`):
//! - `SegmentStore::create` returns only once the new, empty file and its directory entry are
//!   durable (file fsync + directory fsync: **F1**).
//! - `SegmentFile::sync` makes every byte written before it durable (fdatasync: **F2**).
//! - `SegmentStore::remove` need not be durable: a segment that reappears after a crash is
//!   recognised as already applied and removed again.
//! - Bytes written but not synced may, after a crash, be found in any mix: each page either as
//!   written, or as before (zeros past the synced length), and the file length anywhere between
//!   the synced length and the written length.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

/// One segment file. Methods take `&self` so one thread can `sync` while another appends.
pub trait SegmentFile: Send + Sync + 'static {
    /// Writes all of `bufs`, in order, at `offset`.
    fn write_all_at(&self, offset: u64, bufs: &[&[u8]]) -> io::Result<()>;
    /// **F2**: makes every byte written so far durable.
    fn sync(&self) -> io::Result<()>;
    /// Reads up to `buf.len()` bytes at `offset`; returns how many (0 at the end).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file holds no bytes at all.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Cuts the file to `len` and makes the cut durable (used to drop a torn tail, and the
    /// part of a frame a failed append left behind).
    fn truncate(&self, len: u64) -> io::Result<()>;
    /// Makes sure the bytes `[from, to)` have space allocated on disk (the bytes before `from`
    /// are written or reserved already), without changing the
    /// file's length (`fallocate(FALLOC_FL_KEEP_SIZE)`), so a later write into them cannot fail
    /// for lack of space. `ENOSPC`/`EDQUOT` when the space is not there; `EOPNOTSUPP` where the
    /// file system cannot reserve (the journal then writes without a reservation).
    fn reserve(&self, from: u64, to: u64) -> io::Result<()> {
        let _ = (from, to);
        Ok(())
    }
    /// Gives back the space reserved past `len`, the file's length (what `reserve` allocated
    /// beyond it); the file's bytes do not change.
    fn release_reserve(&self, len: u64) -> io::Result<()> {
        let _ = len;
        Ok(())
    }
}

/// The directory of segments, named by their first seq.
pub trait SegmentStore: Send + Sync + 'static {
    type File: SegmentFile;
    /// The ids (first seqs) of the segments present, in any order.
    fn list(&self) -> io::Result<Vec<u64>>;
    /// **F1**: creates an empty segment, durably.
    fn create(&self, id: u64) -> io::Result<Self::File>;
    fn open(&self, id: u64) -> io::Result<Self::File>;
    fn remove(&self, id: u64) -> io::Result<()>;
}

/// Reads as much as fits in `buf` at `offset`, looping over short reads.
pub fn read_full_at<F: SegmentFile + ?Sized>(
    f: &F,
    mut offset: u64,
    mut buf: &mut [u8],
) -> io::Result<usize> {
    let mut total = 0;
    while !buf.is_empty() {
        let n = f.read_at(offset, buf)?;
        if n == 0 {
            break;
        }
        total += n;
        offset += n as u64;
        buf = &mut buf[n..];
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// In-memory store with a crash model.

#[derive(Default, Debug, Clone)]
struct MemFileState {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Set by the fault injector: the next write or sync fails.
    fail_next: bool,
    /// Bytes reserved (allocated without changing the length), see [`SegmentFile::reserve`].
    reserved: usize,
}

impl MemFileState {
    fn allocated(&self) -> usize {
        self.live.len().max(self.reserved)
    }
}

/// An in-memory segment file; clones share state. `space` is the store's free-space model.
#[derive(Clone, Debug)]
pub struct MemFile(Arc<Mutex<MemFileState>>, Space);

/// The free space of a [`MemStore`]'s file system: `None` is unlimited; `Some(n)`: `n` bytes may
/// still be allocated (by writes past the allocated end, or by reservations).
#[derive(Clone, Debug, Default)]
struct Space(Arc<Mutex<Option<u64>>>);

impl Space {
    /// Takes `bytes` of free space, or fails with `ENOSPC` leaving everything as it was.
    fn take(&self, bytes: usize) -> io::Result<()> {
        let mut free = lock(&self.0);
        match *free {
            Some(n) if (bytes as u64) > n => Err(io::Error::from_raw_os_error(28)),
            Some(n) => {
                *free = Some(n - bytes as u64);
                Ok(())
            }
            None => Ok(()),
        }
    }
    fn give(&self, bytes: usize) {
        if let Some(n) = lock(&self.0).as_mut() {
            *n += bytes as u64;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock is a test failure already; keep going to report it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SegmentFile for MemFile {
    fn write_all_at(&self, offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
        let mut s = lock(&self.0);
        if std::mem::take(&mut s.fail_next) {
            return Err(io::Error::other("injected write failure"));
        }
        let end = offset as usize + bufs.iter().map(|b| b.len()).sum::<usize>();
        let grow = end.saturating_sub(s.allocated());
        if grow > 0 {
            // A write that needs new space and does not get it writes nothing (as a `pwrite`
            // that fails at once with ENOSPC).
            self.1.take(grow)?;
        }
        let mut off = offset as usize;
        for b in bufs {
            if s.live.len() < off + b.len() {
                s.live.resize(off + b.len(), 0);
            }
            s.live[off..off + b.len()].copy_from_slice(b);
            off += b.len();
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut s = lock(&self.0);
        if std::mem::take(&mut s.fail_next) {
            return Err(io::Error::other("injected fsync failure"));
        }
        s.durable = s.live.clone();
        Ok(())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let s = lock(&self.0);
        let off = offset as usize;
        if off >= s.live.len() {
            return Ok(0);
        }
        let n = buf.len().min(s.live.len() - off);
        buf[..n].copy_from_slice(&s.live[off..off + n]);
        Ok(n)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.0).live.len() as u64)
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        let mut s = lock(&self.0);
        let before = s.allocated();
        s.live.truncate(len as usize);
        s.durable.truncate(len as usize);
        s.reserved = s.reserved.min(len as usize);
        self.1.give(before - s.allocated());
        Ok(())
    }
    fn release_reserve(&self, len: u64) -> io::Result<()> {
        let mut s = lock(&self.0);
        let before = s.allocated();
        s.reserved = s.reserved.min(len as usize);
        self.1.give(before - s.allocated());
        Ok(())
    }
    fn reserve(&self, _from: u64, to: u64) -> io::Result<()> {
        let mut s = lock(&self.0);
        let grow = (to as usize).saturating_sub(s.allocated());
        if grow > 0 {
            self.1.take(grow)?;
            s.reserved = to as usize;
        }
        Ok(())
    }
}

/// An in-memory segment directory; clones share state, so a test can keep a handle, "crash" the
/// journal, and open a new one on what survived.
#[derive(Clone, Default, Debug)]
pub struct MemStore {
    files: Arc<Mutex<BTreeMap<u64, MemFile>>>,
    space: Space,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a power loss: every file keeps its synced bytes, and of the unsynced bytes a
    /// random length survives, each 4 KiB page of it either as written or as zeros.
    /// `rand` returns uniformly distributed `u64`s (the caller's seeded generator).
    pub fn crash(&self, rand: &mut dyn FnMut() -> u64) {
        let files = lock(&self.files);
        for f in files.values() {
            let mut s = lock(&f.0);
            let durable_len = s.durable.len();
            let live_len = s.live.len();
            let mut image = s.durable.clone();
            if live_len > durable_len {
                let keep = durable_len + (rand() as usize % (live_len - durable_len + 1));
                image.resize(keep, 0);
                let mut page = durable_len & !4095;
                while page < keep {
                    let end = (page + 4096).min(keep);
                    let start = page.max(durable_len);
                    if rand().is_multiple_of(2) {
                        image[start..end].copy_from_slice(&s.live[start..end]);
                    }
                    page += 4096;
                }
            } else {
                image.truncate(live_len.max(durable_len).min(image.len()));
            }
            s.live = image.clone();
            s.durable = image;
            s.fail_next = false;
        }
    }

    /// Limits the free space of the store's file system to `bytes` from now on (`None`:
    /// unlimited): allocations beyond it fail with `ENOSPC`.
    pub fn set_free_space(&self, bytes: Option<u64>) {
        *lock(&self.space.0) = bytes;
    }

    /// Free space left (`None`: unlimited).
    pub fn free_space(&self) -> Option<u64> {
        *lock(&self.space.0)
    }

    /// Makes the next write or sync of segment `id` fail.
    pub fn fail_next(&self, id: u64) {
        if let Some(f) = lock(&self.files).get(&id) {
            lock(&f.0).fail_next = true;
        }
    }

    /// Flips one bit of the durable and live image of segment `id` at `offset`.
    pub fn flip_bit(&self, id: u64, offset: usize, bit: u8) {
        if let Some(f) = lock(&self.files).get(&id) {
            let mut s = lock(&f.0);
            if offset < s.live.len() {
                s.live[offset] ^= 1 << (bit % 8);
            }
            if offset < s.durable.len() {
                s.durable[offset] ^= 1 << (bit % 8);
            }
        }
    }

    pub fn total_bytes(&self) -> u64 {
        lock(&self.files)
            .values()
            .map(|f| lock(&f.0).live.len() as u64)
            .sum()
    }
}

impl SegmentStore for MemStore {
    type File = MemFile;
    fn list(&self) -> io::Result<Vec<u64>> {
        Ok(lock(&self.files).keys().copied().collect())
    }
    fn create(&self, id: u64) -> io::Result<MemFile> {
        let mut files = lock(&self.files);
        if files.contains_key(&id) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("segment {id} exists"),
            ));
        }
        let f = MemFile(Arc::default(), self.space.clone());
        files.insert(id, f.clone());
        Ok(f)
    }
    fn open(&self, id: u64) -> io::Result<MemFile> {
        lock(&self.files).get(&id).cloned().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("segment {id} not found"))
        })
    }
    fn remove(&self, id: u64) -> io::Result<()> {
        if let Some(f) = lock(&self.files).remove(&id) {
            let freed = lock(&f.0).allocated();
            self.space.give(freed);
        }
        Ok(())
    }
}
