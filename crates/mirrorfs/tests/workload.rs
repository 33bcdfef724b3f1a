//! A random multi-process workload through a mount, then a full comparison of the backing
//! directory and the mirror: type, content, size, holes, mode, owner, links, symlink targets,
//! xattrs and the mtime of every entry (issue 6, finding 14: times are part of the state).
//!
//! The workers are separate processes (this test binary run again with `--ignored --exact
//! workload_worker_process`), all working on one shared name space, so their changes race the
//! way independent programs' do. `MIRRORFS_WORKLOAD_OPS` sets the operations per process
//! (default 4000) and `MIRRORFS_WORKLOAD_SEED` replays a run (the test prints its seed).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{sys, tail, tree_diff, wait_until, Cmp, Layout, Mount};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const PROCESSES: usize = 4;
const DEFAULT_OPS: u64 = 4000;
/// Names shared by every worker: 12 at the top, 8 in each directory (depth ≤ 2).
fn names() -> Vec<String> {
    let mut v: Vec<String> = (0..12).map(|i| format!("n{i}")).collect();
    for d in DIRS {
        v.extend((0..8).map(|i| format!("{d}/n{i}")));
    }
    v
}
const DIRS: &[&str] = &["d1", "d2", "d3"];
const XATTRS: &[&str] = &["user.x", "user.y", "trusted.t"];
const ENV_ROOT: &str = "MIRRORFS_WORKLOAD_ROOT";
const ENV_SEED: &str = "MIRRORFS_WORKLOAD_SEED";
const ENV_OPS: &str = "MIRRORFS_WORKLOAD_OPS";

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// A page-aligned buffer (for the aligned `O_DIRECT` writes).
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Aligned {
        let mut ptr: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: posix_memalign writes a pointer to `len` bytes aligned to 4096, or fails.
        let r = unsafe { libc::posix_memalign(&mut ptr, 4096, len) };
        assert_eq!(r, 0, "posix_memalign");
        // SAFETY: `ptr` points to `len` writable bytes.
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), fill, len) };
        Aligned {
            ptr: ptr.cast(),
            len,
        }
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated by posix_memalign, freed once.
        unsafe { libc::free(self.ptr.cast()) };
    }
}

/// open(2) that never blocks on a FIFO the workload made (`O_NONBLOCK` changes nothing else for
/// regular files).
fn open(p: &Path, flags: i32, mode: u32) -> sys::Res<std::fs::File> {
    sys::open(p, flags | libc::O_NONBLOCK, mode)
}

/// One random operation on the shared name space. Failures (ENOENT, EEXIST, EISDIR, EINVAL of a
/// misaligned `O_DIRECT` write, ...) are expected and ignored: only the trees are compared.
fn one_op(root: &Path, names: &[String], rng: &mut SmallRng, n: u64) {
    let name = |rng: &mut SmallRng| root.join(&names[rng.gen_range(0..names.len())]);
    let p = name(rng);
    let data = common::pattern(n, rng.gen_range(1..6000));
    let _ = match rng.gen_range(0..100) {
        0..=11 => open(&p, libc::O_CREAT | libc::O_WRONLY, 0o644)
            .and_then(|f| sys::pwrite(&f, &data, rng.gen_range(0..64 << 10)).map(|_| ())),
        12..=16 => open(&p, libc::O_WRONLY | libc::O_APPEND, 0)
            .and_then(|f| sys::write(&f, &data).map(|_| ())),
        17..=20 => open(&p, libc::O_WRONLY, 0).and_then(|f| {
            // A sparse write far out: a hole in between.
            sys::pwrite(&f, &data, 1 << 20).map(|_| ())
        }),
        21..=24 => sys::truncate(&p, rng.gen_range(0..100 << 10)),
        25..=27 => open(&p, libc::O_WRONLY, 0).and_then(|f| {
            sys::fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                8192,
            )
        }),
        28..=32 => {
            // O_DIRECT: a misaligned write (ext4 moves the mtime, then rejects it with EINVAL)
            // and, now and then, an aligned one.
            open(&p, libc::O_WRONLY | libc::O_DIRECT, 0).and_then(|f| {
                if rng.gen_bool(0.3) {
                    let buf = Aligned::new(8192, n as u8);
                    sys::pwrite(&f, buf.as_slice(), 0).map(|_| ())
                } else {
                    sys::pwrite(&f, &data[..data.len().min(511)], 1).map(|_| ())
                }
            })
        }
        33..=40 => {
            let flags = match rng.gen_range(0..8) {
                0 | 1 => libc::RENAME_WHITEOUT,
                2 => libc::RENAME_EXCHANGE,
                3 => libc::RENAME_NOREPLACE,
                _ => 0,
            };
            sys::rename2(&p, &name(rng), flags)
        }
        41..=45 => sys::unlink(&p),
        46..=49 => sys::mkdir(&root.join(DIRS[rng.gen_range(0..DIRS.len())]), 0o755),
        50..=51 => sys::rmdir(&root.join(DIRS[rng.gen_range(0..DIRS.len())])),
        52..=56 => sys::link(&p, &name(rng)),
        57..=60 => sys::symlink(names[rng.gen_range(0..names.len())].as_bytes(), &p),
        61..=62 => sys::mknod(&p, libc::S_IFIFO | 0o644, 0),
        63..=67 => sys::chmod(&p, [0o644, 0o600, 0o755, 0o640][rng.gen_range(0..4)]),
        68..=70 => sys::lchown(&p, rng.gen_range(0..3), rng.gen_range(0..3)),
        71..=77 => sys::lsetxattr(
            &p,
            XATTRS[rng.gen_range(0..XATTRS.len())],
            &data[..data.len().min(40)],
            0,
        ),
        78..=80 => sys::lremovexattr(&p, XATTRS[rng.gen_range(0..XATTRS.len())]),
        81..=84 => sys::utimens(
            &p,
            (sys::UTIME_OMIT, sys::UTIME_OMIT),
            (
                rng.gen_range(1..2_000_000_000),
                rng.gen_range(0..1_000_000_000),
            ),
            libc::AT_SYMLINK_NOFOLLOW,
        ),
        85..=87 => sys::utimens(
            &p,
            (sys::UTIME_NOW, 0),
            (0, sys::UTIME_NOW),
            libc::AT_SYMLINK_NOFOLLOW,
        ),
        88..=92 => open(&p, libc::O_RDWR, 0).and_then(|f| {
            // Two writes and an fsync on one handle, as an editor saving would.
            sys::pwrite(&f, &data, 0)?;
            sys::ftruncate(&f, data.len() as u64)?;
            sys::fsync(&f)
        }),
        93..=95 => open(&p, libc::O_WRONLY | libc::O_TRUNC, 0).map(|_| ()),
        _ => open(&p, libc::O_RDONLY, 0).and_then(|f| {
            let mut buf = vec![0u8; 4096];
            sys::pread(&f, &mut buf, 0).map(|_| ())
        }),
    };
}

/// The entry point of a worker process (see the module documentation); it does nothing when
/// run on its own.
#[test]
#[ignore = "a worker process of random_multi_process_workload_mirror_keeps_every_time"]
fn workload_worker_process() {
    let Ok(root) = std::env::var(ENV_ROOT) else {
        return;
    };
    let seed = env_u64(ENV_SEED).expect("worker seed");
    let ops = env_u64(ENV_OPS).unwrap_or(DEFAULT_OPS);
    let mut rng = SmallRng::seed_from_u64(seed);
    let root = PathBuf::from(root);
    let names = names();
    for n in 0..ops {
        one_op(&root, &names, &mut rng, seed.wrapping_add(n));
    }
}

/// A mount with one mirror and its state directory outside the backing directory (so the
/// backing root's link count equals the mirror's).
fn mount(tag: &str) -> Mount {
    let layout = Layout::new(tag, 1);
    let state = layout.base.join("state").display().to_string();
    Mount::start(layout, &["--state", &state])
}

fn entries(root: &Path) -> usize {
    fn count(p: &Path) -> usize {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|de| {
                        let is_dir = de.file_type().map(|t| t.is_dir()).unwrap_or(false);
                        1 + if is_dir { count(&de.path()) } else { 0 }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    count(root)
}

#[test]
fn random_multi_process_workload_mirror_keeps_every_time() {
    let t0 = Instant::now();
    let seed = env_u64(ENV_SEED).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    eprintln!("workload: seed {seed} (replay with {ENV_SEED}={seed})");
    let ops = env_u64(ENV_OPS).unwrap_or(DEFAULT_OPS);
    let mut m = mount("workload");
    for d in DIRS {
        sys::mkdir(&m.p(d), 0o755).expect("mkdir");
    }
    let exe = std::env::current_exe().expect("the test binary");
    let mut workers: Vec<_> = (0..PROCESSES as u64)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "workload_worker_process",
                    "--test-threads=1",
                ])
                .env(ENV_ROOT, m.mnt())
                .env(ENV_SEED, seed.wrapping_mul(31).wrapping_add(i).to_string())
                .env(ENV_OPS, ops.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn a worker process")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut failed = None;
    for w in &mut workers {
        loop {
            match w.try_wait() {
                Ok(Some(st)) if st.success() => break,
                Ok(Some(st)) => failed = Some(format!("a worker process failed: {st}")),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Ok(None) => failed = Some("the workers did not finish within 120 s".into()),
                Err(e) => failed = Some(format!("waiting for a worker: {e}")),
            }
            break;
        }
        if failed.is_some() {
            break;
        }
    }
    if let Some(why) = failed {
        for w in &mut workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        panic!(
            "seed {seed}: {why}\nmirrorfs log (tail):\n{}",
            tail(&m.log(), 30)
        );
    }
    let worked = t0.elapsed();
    let mut last = Vec::new();
    let equal = wait_until(Duration::from_secs(30), || {
        last = tree_diff(m.backing(), m.mirror(), &Cmp::FULL);
        last.is_empty()
    });
    let n = entries(m.backing());
    assert!(
        equal,
        "seed {seed}: after {PROCESSES} processes × {ops} operations the mirror differs from the backing directory in {} ways ({n} entries):\n{}\nmirrorfs log (tail):\n{}",
        last.len(),
        common::summarize(&last),
        tail(&m.log(), 30)
    );
    common::finish(&mut m);
    eprintln!(
        "workload: seed {seed}: {PROCESSES} processes × {ops} operations in {:.1} s, {n} entries equal (mtimes too), {:.1} s in all",
        worked.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// Finding 14, first cause: the whiteout `renameat2(RENAME_WHITEOUT)` leaves at the source name
/// must carry the backing's mtime to the mirror, not the mirror's own clock.
#[test]
fn rename_whiteout_source_has_the_backings_mtime_on_the_mirror() {
    let mut m = mount("whiteout");
    for i in 0..5 {
        let (a, b) = (m.p(format!("a{i}")), m.p(format!("b{i}")));
        std::fs::write(&a, b"x").expect("write");
        // Let the clocks of the backing's change and the mirror's application differ.
        std::thread::sleep(Duration::from_millis(20));
        sys::rename2(&a, &b, libc::RENAME_WHITEOUT).expect("renameat2(RENAME_WHITEOUT)");
    }
    let kind = sys::lstat(&m.backing().join("a0"))
        .expect("whiteout")
        .st_mode
        & libc::S_IFMT;
    assert_eq!(kind, libc::S_IFCHR, "a whiteout is a character device");
    m.wait_mirror_equal(Duration::from_secs(20));
    common::finish(&mut m);
}

/// Finding 14, second cause: a write that fails may still move the backing's mtime (ext4 sets
/// it before it rejects a misaligned `O_DIRECT` write); the mirror must get that time too.
#[test]
fn failed_o_direct_write_moves_the_mirrors_mtime_with_the_backings() {
    let mut m = mount("odirect");
    let p = m.p("f");
    std::fs::write(&p, vec![7u8; 8192]).expect("write");
    sys::utimens(
        &p,
        (sys::UTIME_OMIT, sys::UTIME_OMIT),
        (1_000_000_000, 0),
        0,
    )
    .expect("utimens");
    m.wait_mirror_equal(Duration::from_secs(20));
    let before = sys::lstat(&m.backing().join("f")).expect("lstat").st_mtime;
    let f = sys::open(&p, libc::O_WRONLY | libc::O_DIRECT, 0).expect("open O_DIRECT");
    // Misaligned buffer, offset and length.
    let r = sys::pwrite(&f, &[1u8; 100], 1);
    drop(f);
    let after = sys::lstat(&m.backing().join("f")).expect("lstat").st_mtime;
    eprintln!("odirect: misaligned O_DIRECT write gave {r:?}; backing mtime {before} -> {after}");
    m.wait_mirror_equal(Duration::from_secs(20));
    common::finish(&mut m);
}
