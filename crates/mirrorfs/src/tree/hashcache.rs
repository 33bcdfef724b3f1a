//! The hash cache of `mirrorfs verify`: the blake3 hash of each regular file's data, keyed by
//! what changes whenever the data can have changed (inode, size, mtime, ctime), so that a
//! verify of an unchanged tree reads no file data again. One cache per tree verified, in the
//! mount's state directory (`STATE/verify/TREE-ID.cache`).
//!
//! On disk (little-endian), written whole with `statefile::replace` (temp file + rename) after
//! each verify:
//!
//! | bytes | field |
//! |-------|-------|
//! | 8     | magic `MFSHC001` |
//! | 8     | entry count N (at most [`MAX_ENTRIES`]) |
//! | N×80  | entries: ino u64, size u64, mtime sec i64, nsec i64, ctime sec i64, nsec i64, blake3 [u8; 32] |
//! | 4     | crc32c of everything before it |
//!
//! A file that is missing, short, of another version or whose checksum does not match is
//! ignored (the verify reads everything, and writes a good cache): the cache only ever saves
//! reads, it never decides an answer on its own. Not fsynced: losing it costs a full read.
//!
//! Entries whose ctime is less than [`SETTLE_SECS`] old are not kept: a file changed twice
//! within the file system's timestamp granularity could otherwise keep a stale key (as git's
//! "racy" index entries).

use std::collections::HashMap;
use std::io;
use std::path::Path;

/// The most entries kept (80 bytes each on disk, about 120 in memory): 4 Mi entries, 320 MiB
/// at most on disk. Beyond it the cache keeps the first ones seen and the rest are read every
/// time.
pub const MAX_ENTRIES: usize = 4 << 20;
/// How old a change must be before its hash is kept.
pub const SETTLE_SECS: i64 = 2;

const MAGIC: &[u8; 8] = b"MFSHC001";
const ENTRY_BYTES: usize = 80;

/// What identifies one version of a file's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Key {
    pub fn of(st: &libc::stat) -> Key {
        Key {
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// The cache of one tree: what was loaded, and what this verify saw (only that is saved).
#[derive(Default)]
pub struct HashCache {
    old: HashMap<Key, [u8; 32]>,
    new: HashMap<Key, [u8; 32]>,
    /// Hashes taken from the cache / computed, and the bytes read to compute them.
    pub hits: u64,
    pub misses: u64,
    pub bytes_read: u64,
}

impl HashCache {
    /// Loads the cache at `path`; an absent or damaged file gives an empty cache (and the reason,
    /// for a damaged one).
    pub fn load(path: &Path) -> (HashCache, Option<String>) {
        let mut c = HashCache::default();
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return (c, None),
            Err(e) => return (c, Some(format!("cannot read {}: {e}", path.display()))),
        };
        match decode(&bytes) {
            Ok(m) => c.old = m,
            Err(why) => return (c, Some(format!("{}: {why}; ignored", path.display()))),
        }
        (c, None)
    }

    /// The cached hash of the data that `key` names, if any (and counts a hit).
    pub fn get(&mut self, key: &Key) -> Option<[u8; 32]> {
        let h = *self.old.get(key)?;
        self.hits += 1;
        self.keep(*key, h, i64::MAX);
        Some(h)
    }

    /// Records a hash computed now (`now_sec`: the time, for the settle rule) from `bytes` read.
    pub fn put(&mut self, key: Key, hash: [u8; 32], bytes: u64, now_sec: i64) {
        self.misses += 1;
        self.bytes_read += bytes;
        self.keep(key, hash, now_sec);
    }

    fn keep(&mut self, key: Key, hash: [u8; 32], now_sec: i64) {
        let settled = now_sec == i64::MAX
            || (key.ctime.0 + SETTLE_SECS <= now_sec && key.mtime.0 + SETTLE_SECS <= now_sec);
        if settled && self.new.len() < MAX_ENTRIES {
            self.new.insert(key, hash);
        }
    }

    /// Keeps the loaded entries this verify did not see as well (within the bound): after a scan
    /// of part of the tree (an incremental verify), the rest of the tree is still there.
    pub fn keep_unseen(&mut self) {
        for (k, h) in &self.old {
            if self.new.len() >= MAX_ENTRIES {
                break;
            }
            self.new.entry(*k).or_insert(*h);
        }
    }

    /// Writes what this verify saw to `path` (atomically: temp file, rename).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::site::statefile::replace(path, &encode(&self.new), 0o600)
    }
}

fn encode(m: &HashMap<Key, [u8; 32]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + m.len() * ENTRY_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(m.len() as u64).to_le_bytes());
    for (k, h) in m {
        for v in [k.ino, k.size] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [k.mtime.0, k.mtime.1, k.ctime.0, k.ctime.1] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(h);
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode(b: &[u8]) -> Result<HashMap<Key, [u8; 32]>, String> {
    if b.len() < 20 || &b[..8] != MAGIC {
        return Err("not a mirrorfs hash cache of this version".into());
    }
    let (body, tail) = b.split_at(b.len() - 4);
    let crc = u32::from_le_bytes(tail.try_into().map_err(|_| "short")?);
    if crc32c::crc32c(body) != crc {
        return Err("checksum mismatch".into());
    }
    let n = u64::from_le_bytes(body[8..16].try_into().map_err(|_| "short")?);
    let n = usize::try_from(n).map_err(|_| "count too large")?;
    if n > MAX_ENTRIES || body.len() != 16 + n * ENTRY_BYTES {
        return Err(format!("{n} entries do not match its length"));
    }
    let u =
        |s: &[u8], i: usize| u64::from_le_bytes(s[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    let mut m = HashMap::with_capacity(n);
    for e in body[16..].chunks_exact(ENTRY_BYTES) {
        let mut h = [0u8; 32];
        h.copy_from_slice(&e[48..80]);
        let key = Key {
            ino: u(e, 0),
            size: u(e, 1),
            mtime: (u(e, 2) as i64, u(e, 3) as i64),
            ctime: (u(e, 4) as i64, u(e, 5) as i64),
        };
        m.insert(key, h);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ino: u64) -> Key {
        Key {
            ino,
            size: 10,
            mtime: (100, 1),
            ctime: (100, 2),
        }
    }

    #[test]
    fn saved_entries_load_back_and_damage_is_ignored() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("v/x.cache");
        let mut c = HashCache::default();
        c.put(key(1), [1; 32], 10, 1000);
        c.put(key(2), [2; 32], 10, 101); // changed too recently: not kept
        assert_eq!(c.bytes_read, 20);
        c.save(&p).expect("save");
        let (mut l, err) = HashCache::load(&p);
        assert!(err.is_none());
        assert_eq!(l.get(&key(1)), Some([1; 32]));
        assert_eq!(l.get(&key(2)), None);
        assert_eq!(l.get(&Key { size: 11, ..key(1) }), None);
        assert_eq!(l.hits, 1);
        // Only what this run saw is saved again.
        l.save(&p).expect("save");
        assert_eq!(HashCache::load(&p).0.old.len(), 1);
        let mut b = std::fs::read(&p).expect("read");
        b[30] ^= 1;
        std::fs::write(&p, &b).expect("write");
        let (d, err) = HashCache::load(&p);
        assert!(err.is_some_and(|e| e.contains("checksum")));
        assert!(d.old.is_empty());
        std::fs::write(&p, b"MFSHC001").expect("write");
        assert!(HashCache::load(&p).1.is_some());
    }
}
