//! File-backed implementations of the core's storage traits: journal segments and mirror cursors.
//! The fsync points named in `docs/journal.md` (F1, F2, B2) are marked where they happen.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mirrorfs_core::applier::{CursorStore, CURSOR_SLOT_BYTES};
use mirrorfs_core::journal::storage::{SegmentFile, SegmentStore};

use crate::sys;

pub struct FileSegment(File);

impl SegmentFile for FileSegment {
    fn write_all_at(&self, offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
        sys::pwritev_all(self.0.as_fd(), bufs, offset)
    }
    fn sync(&self) -> io::Result<()> {
        // F2: the journal's durability rests on this fdatasync.
        sys::fdatasync(self.0.as_fd())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)?;
        sys::fsync(self.0.as_fd())
    }
    fn release_reserve(&self, _len: u64) -> io::Result<()> {
        // A truncate to the file's own length cuts no byte but frees the blocks `reserve`
        // allocated past the end (ext4 and tmpfs drop `FALLOC_FL_KEEP_SIZE` blocks on any
        // truncate). No fsync: what is on disk within the file does not change.
        let len = self.0.metadata()?.len();
        self.0.set_len(len)
    }
    fn reserve(&self, from: u64, to: u64) -> io::Result<()> {
        // Allocated, not written: the file's length (what recovery reads) does not change.
        sys::fallocate(
            self.0.as_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            from,
            to.saturating_sub(from),
        )
    }
}

/// Segments live in `DIR/NNNNNNNNNNNNNNNNNNNN.seg`, named by their first seq.
pub struct FileStore {
    dir: PathBuf,
    dir_fd: File,
}

impl FileStore {
    pub fn open(dir: &Path) -> io::Result<FileStore> {
        fs::create_dir_all(dir)?;
        let dir_fd = File::open(dir)?;
        Ok(FileStore {
            dir: dir.to_path_buf(),
            dir_fd,
        })
    }
    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.seg"))
    }
}

impl SegmentStore for FileStore {
    type File = FileSegment;
    fn list(&self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".seg") {
                if let Ok(id) = stem.parse::<u64>() {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }
    fn create(&self, id: u64) -> io::Result<FileSegment> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.path(id))?;
        // F1: the new segment's directory entry is durable before records go into it.
        sys::fsync(f.as_fd())?;
        sys::fsync(self.dir_fd.as_fd())?;
        Ok(FileSegment(f))
    }
    fn open(&self, id: u64) -> io::Result<FileSegment> {
        Ok(FileSegment(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.path(id))?,
        ))
    }
    fn remove(&self, id: u64) -> io::Result<()> {
        fs::remove_file(self.path(id))
    }
}

/// A mirror's cursor: one small file with two slots.
pub struct FileCursor(File);

impl FileCursor {
    pub fn open(path: &Path) -> io::Result<FileCursor> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        if let Some(parent) = path.parent() {
            sys::fsync(File::open(parent)?.as_fd())?;
        }
        Ok(FileCursor(f))
    }
}

impl CursorStore for FileCursor {
    fn read_slots(&mut self) -> io::Result<[u8; 2 * CURSOR_SLOT_BYTES]> {
        let mut buf = [0u8; 2 * CURSOR_SLOT_BYTES];
        let mut off = 0;
        while off < buf.len() {
            let n = self.0.read_at(&mut buf[off..], off as u64)?;
            if n == 0 {
                break;
            }
            off += n;
        }
        Ok(buf)
    }
    fn write_slot(
        &mut self,
        slot: usize,
        bytes: &[u8; CURSOR_SLOT_BYTES],
        durable: bool,
    ) -> io::Result<()> {
        self.0
            .write_all_at(bytes, (slot * CURSOR_SLOT_BYTES) as u64)?;
        if durable {
            // B2: the mirror's checkpoint is durable.
            sys::fdatasync(self.0.as_fd())?;
        }
        Ok(())
    }
}
