//! The workloads. Each one works in its own, fresh directory and returns
//! wall-clock durations of the timed part only; setup (creating files to be
//! overwritten, `sync`) is not timed.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::check_interrupted;

pub const MIB: u64 = 1024 * 1024;
const CHUNK: usize = 1024 * 1024;
const PAGE: usize = 4096;
/// Longest we wait for one thing to show up on the mirror.
pub const MIRROR_WAIT: Duration = Duration::from_secs(30);
/// Poll interval while waiting for the mirror.
const POLL: Duration = Duration::from_micros(50);

/// `sync(2)`: flush everything dirty so a workload does not pay for the
/// writeback of the previous one. Not timed.
pub fn sync_all() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches` (needs root).
pub fn drop_caches() -> Result<()> {
    sync_all();
    fs::write("/proc/sys/vm/drop_caches", "3")
        .context("cannot write 3 to /proc/sys/vm/drop_caches (are you root?)")
}

/// Buffer of non-zero, pseudo-random bytes (no sparse-file or compression shortcuts).
pub fn random_buf(len: usize, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut buf);
    buf
}

fn open_new(path: &Path) -> Result<File> {
    // O_WRONLY | O_CREAT | O_TRUNC
    File::create(path).with_context(|| format!("cannot create {}", path.display()))
}

/// Write `size` bytes in 1 MiB writes, optionally fsync, close. Timed: open to close.
pub fn seq_write(path: &Path, size: u64, fsync: bool, seed: u64) -> Result<Duration> {
    let buf = random_buf(CHUNK, seed);
    sync_all();
    let t0 = Instant::now();
    let mut f = open_new(path)?;
    let mut left = size;
    while left > 0 {
        check_interrupted()?;
        let n = usize::try_from(left.min(CHUNK as u64)).context("chunk size")?;
        f.write_all(&buf[..n])
            .with_context(|| format!("write to {} failed", path.display()))?;
        left -= n as u64;
    }
    if fsync {
        f.sync_all()
            .with_context(|| format!("fsync of {} failed", path.display()))?;
    }
    drop(f);
    Ok(t0.elapsed())
}

/// Read the whole file in 1 MiB reads. Timed: open to close.
pub fn seq_read(path: &Path, expect: u64) -> Result<Duration> {
    let mut buf = vec![0u8; CHUNK];
    let t0 = Instant::now();
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut total = 0u64;
    loop {
        check_interrupted()?;
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("read of {} failed", path.display())),
        };
        total += n as u64;
    }
    drop(f);
    let d = t0.elapsed();
    if total != expect {
        bail!(
            "read {total} bytes from {}, expected {expect}",
            path.display()
        );
    }
    Ok(d)
}

/// Fill a `file_mib` file with zeros (not timed), then `count` pwrites of
/// 4 KiB at random 4 KiB-aligned offsets, then close (timed).
pub fn rand_write(path: &Path, file_mib: u64, count: u64, seed: u64) -> Result<Duration> {
    {
        let zeros = vec![0u8; CHUNK];
        let mut f = open_new(path)?;
        for _ in 0..file_mib {
            check_interrupted()?;
            f.write_all(&zeros)
                .with_context(|| format!("write to {} failed", path.display()))?;
        }
    }
    sync_all();
    let slots = file_mib * MIB / PAGE as u64;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = random_buf(PAGE, seed ^ 0xabcd);
    let t0 = Instant::now();
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    for i in 0..count {
        check_interrupted()?;
        let off = rng.gen_range(0..slots) * PAGE as u64;
        buf[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all_at(&buf, off)
            .with_context(|| format!("pwrite to {} at {off} failed", path.display()))?;
    }
    drop(f);
    Ok(t0.elapsed())
}

/// [`rand_write`] with `threads` writers, each with its own descriptor, `count / threads`
/// pwrites each (offsets from per-thread seeded RNGs); timed from the first open to the last
/// close. The file is filled with zeros first (not timed).
pub fn rand_write_threads(
    path: &Path,
    file_mib: u64,
    count: u64,
    threads: u64,
    seed: u64,
) -> Result<Duration> {
    {
        let zeros = vec![0u8; CHUNK];
        let mut f = open_new(path)?;
        for _ in 0..file_mib {
            check_interrupted()?;
            f.write_all(&zeros)
                .with_context(|| format!("write to {} failed", path.display()))?;
        }
    }
    sync_all();
    let slots = file_mib * MIB / PAGE as u64;
    let each = count / threads.max(1);
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<()> {
                    let mut rng = SmallRng::seed_from_u64(seed ^ (t << 32));
                    let mut buf = random_buf(PAGE, seed ^ t ^ 0xabcd);
                    let f = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .with_context(|| format!("cannot open {}", path.display()))?;
                    for i in 0..each {
                        check_interrupted()?;
                        let off = rng.gen_range(0..slots) * PAGE as u64;
                        buf[..8].copy_from_slice(&i.to_le_bytes());
                        f.write_all_at(&buf, off).with_context(|| {
                            format!("pwrite to {} at {off} failed", path.display())
                        })?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a writer thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(t0.elapsed())
}

/// A source-like tree for the build-like workload, made once per run on the native disk (not
/// timed): `files` files of 1–16 KiB of text-like bytes, 20 to a directory, directories 10 to
/// a parent; then `tar cf TAR -C DIR .`.
pub fn make_source_tarball(dir: &Path, tar: &Path, files: u64, seed: u64) -> Result<()> {
    let mut rng = SmallRng::seed_from_u64(seed);
    const ALPHABET: &[u8] = b"abcdefghij klmnopqrst;\n(){}";
    let text: Vec<u8> = (0..16384usize)
        .map(|i| ALPHABET[(i * 7 + i / 13) % ALPHABET.len()])
        .collect();
    for i in 0..files {
        check_interrupted()?;
        let d = i / 20;
        let sub = dir.join(format!("m{:03}", d / 10)).join(format!("p{d:04}"));
        if i % 20 == 0 {
            fs::create_dir_all(&sub).with_context(|| format!("cannot create {}", sub.display()))?;
        }
        let len = rng.gen_range(1024..=16384);
        fs::write(sub.join(format!("f{i:05}.c")), &text[..len])
            .with_context(|| format!("cannot write into {}", sub.display()))?;
    }
    run_cmd(
        std::process::Command::new("tar")
            .arg("cf")
            .arg(tar)
            .arg("-C")
            .arg(dir)
            .arg("."),
    )
}

fn run_cmd(cmd: &mut std::process::Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The build-like workload: `tar xf TAR -C DIR` (timed), then `rm -r DIR` (timed).
pub fn untar_and_delete(tar: &Path, dir: &Path) -> Result<(Duration, Duration)> {
    fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    sync_all();
    let t0 = Instant::now();
    run_cmd(
        std::process::Command::new("tar")
            .arg("xf")
            .arg(tar)
            .arg("-C")
            .arg(dir),
    )?;
    let untar = t0.elapsed();
    sync_all();
    let t0 = Instant::now();
    run_cmd(std::process::Command::new("rm").arg("-r").arg(dir))?;
    Ok((untar, t0.elapsed()))
}

pub fn small_file_names(dir: &Path, count: u64) -> Vec<PathBuf> {
    (0..count).map(|i| dir.join(format!("f{i:06}"))).collect()
}

/// Create each file (`open(O_CREAT|O_WRONLY)`, one 4 KiB write, close). Timed.
pub fn small_files(paths: &[PathBuf], seed: u64) -> Result<Duration> {
    let buf = random_buf(PAGE, seed);
    sync_all();
    let t0 = Instant::now();
    for p in paths {
        check_interrupted()?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .with_context(|| format!("cannot create {}", p.display()))?;
        f.write_all(&buf)
            .with_context(|| format!("write to {} failed", p.display()))?;
    }
    Ok(t0.elapsed())
}

/// `lstat` every path. Timed.
pub fn stat_files(paths: &[PathBuf]) -> Result<Duration> {
    let cpaths = paths
        .iter()
        .map(|p| CString::new(p.as_os_str().as_bytes()).context("path contains NUL"))
        .collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    for (c, p) in cpaths.iter().zip(paths) {
        check_interrupted()?;
        // SAFETY: `c` is a valid NUL-terminated string and `st` is a properly
        // sized, writable stat buffer that lives across the call.
        let rc = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::lstat(c.as_ptr(), &mut st)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("lstat {} failed", p.display()));
        }
    }
    Ok(t0.elapsed())
}

// ---------------------------------------------------------------------------
// Mirror checks (mirrorfs only)

/// What a tree walk records per entry: kind and, for files, size.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Entry {
    Dir,
    File(u64),
    Other,
}

fn walk(base: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Entry>) -> Result<()> {
    let dir = base.join(rel);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for de in rd {
        let de = de.with_context(|| format!("cannot list {}", dir.display()))?;
        let rel_child = rel.join(de.file_name());
        let md = match fs::symlink_metadata(base.join(&rel_child)) {
            Ok(md) => md,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e).context("lstat failed during tree walk"),
        };
        if md.is_dir() {
            out.insert(rel_child.clone(), Entry::Dir);
            walk(base, &rel_child, out)?;
        } else if md.is_file() {
            out.insert(rel_child, Entry::File(md.len()));
        } else {
            out.insert(rel_child, Entry::Other);
        }
    }
    Ok(())
}

fn snapshot(base: &Path, subdirs: &[&str]) -> Result<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    for s in subdirs {
        walk(base, Path::new(s), &mut out)?;
    }
    Ok(out)
}

/// First entry of `want` that `have` lacks or has differently, described.
fn first_difference(
    want: &BTreeMap<PathBuf, Entry>,
    have: &BTreeMap<PathBuf, Entry>,
) -> Option<String> {
    want.iter().find_map(|(p, e)| match have.get(p) {
        None => Some(format!("{} missing on the mirror", p.display())),
        Some(h) if h != e => Some(format!(
            "{}: {e:?} on the backing dir, {h:?} on the mirror",
            p.display()
        )),
        Some(_) => None,
    })
}

pub fn files_identical(a: &Path, b: &Path) -> Result<bool> {
    let mut fa = File::open(a).with_context(|| format!("cannot open {}", a.display()))?;
    let mut fb = match File::open(b) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", b.display())),
    };
    let mut ba = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("read failed"),
        }
    }
    Ok(n)
}

/// Wait until every entry under `subdirs` of `backing` exists on `mirror` with
/// the same type and size, then verify file contents byte for byte. Returns
/// the time from the call until the mirror was seen complete.
pub fn mirror_catch_up(
    backing: &Path,
    mirror: &Path,
    subdirs: &[&str],
    timeout: Duration,
) -> Result<Duration> {
    let want = snapshot(backing, subdirs)?;
    let t0 = Instant::now();
    loop {
        check_interrupted()?;
        let have = snapshot(mirror, subdirs)?;
        let seen = t0.elapsed();
        let diff = match first_difference(&want, &have) {
            Some(d) => Some(d),
            None => want.iter().find_map(|(p, e)| match e {
                Entry::File(_) => match files_identical(&backing.join(p), &mirror.join(p)) {
                    Ok(true) => None,
                    Ok(false) => Some(format!("{}: contents differ", p.display())),
                    Err(e) => Some(format!("{}: {e:#}", p.display())),
                },
                _ => None,
            }),
        };
        match diff {
            None => return Ok(seen),
            Some(d) if t0.elapsed() > timeout => bail!(
                "mirror {} not caught up with {} after {} s: {d}",
                mirror.display(),
                backing.display(),
                timeout.as_secs()
            ),
            Some(_) => sleep(Duration::from_millis(5)),
        }
    }
}

pub fn identical(path: &Path, want: &[u8]) -> bool {
    matches!(fs::read(path), Ok(have) if have == want)
}

/// Spin (50 µs sleeps) until `cond` holds; error after [`MIRROR_WAIT`].
pub fn wait_until(what: impl Fn() -> String, mut cond: impl FnMut() -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if cond() {
            return Ok(t0.elapsed());
        }
        check_interrupted()?;
        if t0.elapsed() > MIRROR_WAIT {
            bail!(
                "timed out after {} s waiting for {}",
                MIRROR_WAIT.as_secs(),
                what()
            );
        }
        sleep(POLL);
    }
}

/// Create `dir` through the mount and wait (untimed) for it on the mirror.
pub fn make_dir_mirrored(dir: &Path, mirror_dir: &Path) -> Result<()> {
    fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    wait_until(
        || format!("directory {} to appear on the mirror", mirror_dir.display()),
        || mirror_dir.is_dir(),
    )?;
    Ok(())
}

/// `count` times: create a file with 100 random bytes, close, then wait until
/// the mirror copy is identical. Returns the close→identical times.
pub fn lag_single(dir: &Path, mirror_dir: &Path, count: u64, seed: u64) -> Result<Vec<Duration>> {
    make_dir_mirrored(dir, mirror_dir)?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for i in 0..count {
        check_interrupted()?;
        let name = format!("lag{i:05}");
        let mut content = [0u8; 100];
        rng.fill_bytes(&mut content);
        let path = dir.join(&name);
        let mut f = open_new(&path)?;
        f.write_all(&content)
            .with_context(|| format!("write to {} failed", path.display()))?;
        drop(f);
        let m = mirror_dir.join(&name);
        out.push(wait_until(
            || format!("{} to become identical to {}", m.display(), path.display()),
            || identical(&m, &content),
        )?);
    }
    Ok(out)
}

/// What [`lag_burst`] measured.
pub struct Burst {
    /// Time to write (create, write, close) all the files.
    pub write: Duration,
    /// From the last close until every file was identical on the mirror.
    pub all: Duration,
    /// Per file: from its close until it was seen identical on the mirror (sorted).
    pub per_file: Vec<Duration>,
}

/// Write `count` 1 KiB files as fast as possible while a second thread polls
/// the mirror (50 µs sleeps) for each file closed so far. Per file: close →
/// identical; and last close → all identical.
pub fn lag_burst(dir: &Path, mirror_dir: &Path, count: u64, seed: u64) -> Result<Burst> {
    make_dir_mirrored(dir, mirror_dir)?;
    let n = usize::try_from(count).context("count")?;
    let data = random_buf(n * 1024, seed);
    let names: Vec<String> = (0..n).map(|i| format!("b{i:05}")).collect();
    let closed: Vec<OnceLock<Instant>> = (0..n).map(|_| OnceLock::new()).collect();
    let writer_failed = AtomicBool::new(false);
    let content = |i: usize| &data[i * 1024..][..1024];
    std::thread::scope(|s| -> Result<Burst> {
        let poller = s.spawn(|| -> Result<Vec<Instant>> {
            let mut seen: Vec<Option<Instant>> = vec![None; n];
            // Files closed but not yet seen identical, in index order.
            let mut next_closed = 0;
            let mut pending: Vec<usize> = Vec::new();
            let mut last_progress = Instant::now();
            loop {
                while next_closed < n && closed[next_closed].get().is_some() {
                    pending.push(next_closed);
                    next_closed += 1;
                }
                let before = pending.len();
                pending.retain(|&i| {
                    if identical(&mirror_dir.join(&names[i]), content(i)) {
                        seen[i] = Some(Instant::now());
                        false
                    } else {
                        true
                    }
                });
                if next_closed == n && pending.is_empty() {
                    break;
                }
                if pending.len() != before || pending.is_empty() {
                    last_progress = Instant::now();
                }
                if writer_failed.load(Ordering::Relaxed) {
                    bail!("the writer failed");
                }
                check_interrupted()?;
                if last_progress.elapsed() > MIRROR_WAIT {
                    bail!(
                        "timed out after {} s waiting for {} of {count} burst files to become \
                         identical on the mirror (e.g. {})",
                        MIRROR_WAIT.as_secs(),
                        pending.len(),
                        pending
                            .first()
                            .map(|&i| mirror_dir.join(&names[i]).display().to_string())
                            .unwrap_or_default()
                    );
                }
                sleep(POLL);
            }
            seen.into_iter()
                .map(|t| t.context("file never seen"))
                .collect()
        });
        let t0 = Instant::now();
        let written = (|| -> Result<()> {
            for (i, name) in names.iter().enumerate() {
                check_interrupted()?;
                let path = dir.join(name);
                let mut f = open_new(&path)?;
                f.write_all(content(i))
                    .with_context(|| format!("write to {} failed", path.display()))?;
                drop(f);
                // Set once, by this thread only.
                let _ = closed[i].set(Instant::now());
            }
            Ok(())
        })();
        let write = t0.elapsed();
        if written.is_err() {
            writer_failed.store(true, Ordering::Relaxed);
        }
        let seen = poller
            .join()
            .map_err(|_| anyhow::anyhow!("the mirror poller panicked"))?;
        written?;
        let seen = seen?;
        let last_close = closed
            .iter()
            .filter_map(|c| c.get().copied())
            .max()
            .context("no files")?;
        let all_seen = seen.iter().copied().max().context("no files")?;
        let mut per_file: Vec<Duration> = seen
            .iter()
            .zip(&closed)
            .map(|(s, c)| {
                c.get()
                    .map_or(Duration::ZERO, |c| s.saturating_duration_since(*c))
            })
            .collect();
        per_file.sort();
        Ok(Burst {
            write,
            all: all_seen.saturating_duration_since(last_close),
            per_file,
        })
    })
}

/// p in [0, 1], nearest-rank on a sorted slice.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `MemAvailable` from /proc/meminfo, in MiB.
pub fn mem_available_mib() -> Result<u64> {
    let text = fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .context("no MemAvailable in /proc/meminfo")?;
    let kib: u64 = line["MemAvailable:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("cannot parse {line:?}"))?;
    Ok(kib / 1024)
}

/// Fault in `mib` MiB of anonymous memory at once, then release it. On VMs
/// whose guest RAM is backed lazily by the host (e.g. Firecracker), the first
/// touch of a guest page is several times slower than later ones; without
/// this, whichever target runs first pays that cost in its page-cache figures.
pub fn warm_up_ram(mib: u64) -> Result<()> {
    let len = usize::try_from(mib * MIB).context("warm-up size")?;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: anonymous private mapping, no file descriptor; the pointer is
    // only passed back to munmap with the same length.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot map {mib} MiB for the RAM warm-up"));
        }
        libc::munmap(p, len);
    }
    Ok(())
}

/// VmHWM and VmRSS of a process, in KiB.
pub fn vm_hwm_rss(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |key: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("no {key} in {path}"))?;
        line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("cannot parse {line:?}"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// `VmRSS` of a process in KiB, or None if it is gone.
fn vm_rss(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The largest `mirrors[i].lag_bytes` in a mirrorfs `STATE/status.json`
/// (what `mirrorfs status --json` prints; refreshed every 250 ms).
pub fn status_backlog(status_json: &Path) -> Option<u64> {
    let bytes = fs::read(status_json).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("mirrors")?
        .as_array()?
        .iter()
        .filter_map(|m| m.get("lag_bytes").and_then(serde_json::Value::as_u64))
        .max()
}

/// What a [`Sampler`] saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Samples {
    pub peak_rss_kib: u64,
    pub peak_backlog_bytes: u64,
    pub count: u64,
}

/// Samples a process's VmRSS and, optionally, the mirror backlog in its
/// status file, every 20 ms in a background thread, until [`Sampler::finish`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Samples>>,
}

impl Sampler {
    pub fn start(pid: u32, status_json: Option<PathBuf>) -> Result<Sampler> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || {
                let mut s = Samples::default();
                loop {
                    if let Some(rss) = vm_rss(pid) {
                        s.peak_rss_kib = s.peak_rss_kib.max(rss);
                    }
                    if let Some(b) = status_json.as_deref().and_then(status_backlog) {
                        s.peak_backlog_bytes = s.peak_backlog_bytes.max(b);
                    }
                    s.count += 1;
                    if flag.load(Ordering::Relaxed) {
                        return s;
                    }
                    sleep(Duration::from_millis(20));
                }
            })
            .context("cannot start the sampler thread")?;
        Ok(Sampler {
            stop,
            handle: Some(handle),
        })
    }

    pub fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=200).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(100));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(198));
        assert_eq!(percentile(&v, 1.0), Duration::from_millis(200));
        assert_eq!(percentile(&v[..1], 0.5), Duration::from_millis(1));
    }

    #[test]
    fn the_source_tarball_holds_every_file() -> Result<()> {
        let d = tempfile::tempdir()?;
        let tar = d.path().join("t.tar");
        make_source_tarball(&d.path().join("src"), &tar, 45, 3)?;
        let out = d.path().join("out");
        let (untar, rm) = untar_and_delete(&tar, &out)?;
        assert!(untar > Duration::ZERO && rm > Duration::ZERO);
        assert!(!out.exists(), "rm -r removed the tree");
        let listed = std::process::Command::new("tar")
            .arg("tf")
            .arg(&tar)
            .output()?;
        let files = String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter(|l| l.ends_with(".c"))
            .count();
        assert_eq!(files, 45);
        Ok(())
    }

    #[test]
    fn own_memory() -> Result<()> {
        let (hwm, rss) = vm_hwm_rss(std::process::id())?;
        assert!(hwm >= rss && rss > 0);
        Ok(())
    }
}
