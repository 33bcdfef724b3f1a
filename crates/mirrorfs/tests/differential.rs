//! Differential test: random sequences of file-system operations run on a plain directory and
//! through a mirrorfs mount must give the same results (return values and errno values) and the
//! same final trees; afterwards the mirror must equal the backing directory.
//!
//! One mount serves every case (its work directory is emptied between cases). `PROPTEST_CASES`
//! sets the number of cases (default 64); a failure prints the minimal operation list.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{sys, tree_diff, wait_until, Cmp, Layout, Mount};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

/// The name space: depth ≤ 2 over three names.
const PATHS: &[&str] = &[
    "a", "b", "c", "a/a", "a/b", "a/c", "b/a", "b/b", "b/c", "c/a", "c/b", "c/c",
];
/// Symlink targets (relative, so they resolve the same way in both trees; some dangle, "self"
/// loops).
const TARGETS: &[&str] = &["a", "b/a", "zz", "self"];
const XATTR_NAMES: &[&str] = &["user.x", "user.y"];
const MODES: &[u32] = &[0o644, 0o600, 0o755, 0o700, 0o000, 0o4755, 0o2755, 0o1777];

#[derive(Debug, Clone)]
enum Op {
    /// open(path, flags, mode), then optionally a write at an offset (`pwrite`; plain `write` if
    /// O_APPEND), then close.
    Open {
        p: usize,
        flags: i32,
        mode: u32,
        write: Option<(u64, usize, u64)>,
    },
    /// open(O_RDONLY) + read the whole file.
    Read(usize),
    Stat(usize),
    Truncate(usize, u64),
    Rename(usize, usize, u32),
    Unlink(usize),
    Mkdir(usize, u32),
    Rmdir(usize),
    Link(usize, usize),
    Symlink(usize, usize),
    Readlink(usize),
    Chmod(usize, u32),
    Utimens {
        p: usize,
        atime: (i64, i64),
        mtime: (i64, i64),
        nofollow: bool,
    },
    SetXattr {
        p: usize,
        name: usize,
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr(usize, usize),
    GetXattr(usize, usize),
    Fsync(usize),
}

/// What a caller sees.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Res {
    Ok,
    /// Bytes written by a write after a successful open (or the write's errno).
    Wrote(Result<usize, i32>),
    Data(Vec<u8>),
    /// kind bits, permissions, size (regular files and symlinks), link count.
    Stat(u32, u32, u64, u64),
    Err(i32),
}

fn path() -> impl Strategy<Value = usize> {
    // Top-level names more often: they exist more often.
    prop_oneof![5 => 0..3usize, 2 => 3..PATHS.len()]
}

fn time() -> impl Strategy<Value = (i64, i64)> {
    prop_oneof![
        4 => (1_000_000i64..2_000_000_000, 0i64..1_000_000_000),
        1 => Just((0, sys::UTIME_OMIT)),
    ]
}

fn open_flags() -> impl Strategy<Value = i32> {
    (
        prop_oneof![
            Just(libc::O_RDONLY),
            Just(libc::O_WRONLY),
            Just(libc::O_RDWR)
        ],
        prop::sample::subsequence(
            vec![
                libc::O_CREAT,
                libc::O_EXCL,
                libc::O_TRUNC,
                libc::O_APPEND,
                libc::O_DIRECTORY,
                libc::O_NOFOLLOW,
            ],
            0..=3,
        ),
    )
        .prop_map(|(acc, extra)| extra.iter().fold(acc, |a, b| a | b))
}

fn op() -> impl Strategy<Value = Op> {
    let write = proptest::option::weighted(0.8, (0u64..70_000, 1usize..6_000, any::<u64>()));
    prop_oneof![
        // Creating and writing files: most common, so the other operations have work to do.
        6 => (path(), open_flags(), prop::sample::select(MODES), write).prop_map(
            |(p, flags, mode, write)| Op::Open { p, flags, mode, write }
        ),
        4 => (path(), prop::sample::select(MODES), any::<u64>(), 1usize..5_000, 0u64..20_000)
            .prop_map(|(p, mode, seed, len, off)| Op::Open {
                p,
                flags: libc::O_CREAT | libc::O_WRONLY,
                mode,
                write: Some((off, len, seed)),
            }),
        2 => path().prop_map(Op::Read),
        1 => path().prop_map(Op::Stat),
        2 => (path(), 0u64..100_000).prop_map(|(p, s)| Op::Truncate(p, s)),
        4 => (
            path(),
            path(),
            prop_oneof![
                3 => Just(0u32),
                1 => Just(libc::RENAME_NOREPLACE),
                1 => Just(libc::RENAME_EXCHANGE),
                1 => Just(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE),
            ]
        )
            .prop_map(|(a, b, f)| Op::Rename(a, b, f)),
        2 => path().prop_map(Op::Unlink),
        3 => (path(), prop::sample::select(MODES)).prop_map(|(p, m)| Op::Mkdir(p, m)),
        2 => path().prop_map(Op::Rmdir),
        2 => (path(), path()).prop_map(|(a, b)| Op::Link(a, b)),
        1 => (path(), 0..TARGETS.len()).prop_map(|(p, t)| Op::Symlink(p, t)),
        1 => path().prop_map(Op::Readlink),
        2 => (path(), prop::sample::select(MODES)).prop_map(|(p, m)| Op::Chmod(p, m)),
        1 => (path(), time(), time(), any::<bool>()).prop_map(|(p, atime, mtime, nofollow)| {
            Op::Utimens { p, atime, mtime, nofollow }
        }),
        2 => (
            path(),
            0..XATTR_NAMES.len(),
            prop::collection::vec(any::<u8>(), 0..40),
            prop_oneof![
                2 => Just(0),
                1 => Just(libc::XATTR_CREATE),
                1 => Just(libc::XATTR_REPLACE)
            ]
        )
            .prop_map(|(p, name, value, flags)| Op::SetXattr { p, name, value, flags }),
        1 => (path(), 0..XATTR_NAMES.len()).prop_map(|(p, n)| Op::RemoveXattr(p, n)),
        1 => (path(), 0..XATTR_NAMES.len()).prop_map(|(p, n)| Op::GetXattr(p, n)),
        1 => path().prop_map(Op::Fsync),
    ]
}

fn res(r: sys::Res<()>) -> Res {
    match r {
        Ok(()) => Res::Ok,
        Err(e) => Res::Err(e),
    }
}

impl Op {
    fn run(&self, root: &Path) -> Res {
        let at = |i: usize| root.join(PATHS[i]);
        match self {
            Op::Open {
                p,
                flags,
                mode,
                write,
            } => match sys::open(&at(*p), *flags, *mode) {
                Err(e) => Res::Err(e),
                Ok(f) => match write {
                    None => Res::Ok,
                    Some((off, len, seed)) => {
                        let data = common::pattern(*seed, *len);
                        Res::Wrote(if flags & libc::O_APPEND != 0 {
                            sys::write(&f, &data)
                        } else {
                            sys::pwrite(&f, &data, *off)
                        })
                    }
                },
            },
            Op::Read(p) => match sys::open(&at(*p), libc::O_RDONLY, 0) {
                Err(e) => Res::Err(e),
                Ok(mut f) => {
                    use std::io::Read;
                    let mut v = Vec::new();
                    match f.read_to_end(&mut v) {
                        Ok(_) => Res::Data(v),
                        Err(e) => Res::Err(sys::io_errno(&e)),
                    }
                }
            },
            Op::Stat(p) => match sys::lstat(&at(*p)) {
                Err(e) => Res::Err(e),
                Ok(st) => {
                    let kind = st.st_mode & libc::S_IFMT;
                    let size = if kind == libc::S_IFDIR {
                        0
                    } else {
                        st.st_size as u64
                    };
                    Res::Stat(kind, st.st_mode & 0o7777, size, st.st_nlink)
                }
            },
            Op::Truncate(p, size) => res(sys::truncate(&at(*p), *size)),
            Op::Rename(a, b, flags) => res(sys::rename2(&at(*a), &at(*b), *flags)),
            Op::Unlink(p) => res(sys::unlink(&at(*p))),
            Op::Mkdir(p, mode) => res(sys::mkdir(&at(*p), *mode)),
            Op::Rmdir(p) => res(sys::rmdir(&at(*p))),
            Op::Link(a, b) => res(sys::link(&at(*a), &at(*b))),
            Op::Symlink(p, t) => {
                let target = if TARGETS[*t] == "self" {
                    PATHS[*p].rsplit('/').next().unwrap_or("self")
                } else {
                    TARGETS[*t]
                };
                res(sys::symlink(target.as_bytes(), &at(*p)))
            }
            Op::Readlink(p) => match sys::readlink(&at(*p)) {
                Ok(t) => Res::Data(t),
                Err(e) => Res::Err(e),
            },
            Op::Chmod(p, mode) => res(sys::chmod(&at(*p), *mode)),
            Op::Utimens {
                p,
                atime,
                mtime,
                nofollow,
            } => res(sys::utimens(
                &at(*p),
                *atime,
                *mtime,
                if *nofollow {
                    libc::AT_SYMLINK_NOFOLLOW
                } else {
                    0
                },
            )),
            Op::SetXattr {
                p,
                name,
                value,
                flags,
            } => res(sys::lsetxattr(&at(*p), XATTR_NAMES[*name], value, *flags)),
            Op::RemoveXattr(p, n) => res(sys::lremovexattr(&at(*p), XATTR_NAMES[*n])),
            Op::GetXattr(p, n) => match sys::lgetxattr(&at(*p), XATTR_NAMES[*n].as_bytes()) {
                Ok(v) => Res::Data(v),
                Err(e) => Res::Err(e),
            },
            Op::Fsync(p) => match sys::open(&at(*p), libc::O_RDONLY | libc::O_NOFOLLOW, 0) {
                Err(e) => Res::Err(e),
                Ok(f) => res(sys::fsync(&f)),
            },
        }
    }
}

/// Removes everything in `dir` (making directories writable first) and gives it mode 0755.
fn clear_dir(dir: &Path) {
    let _ = sys::chmod(dir, 0o755);
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
        let p = e.expect("readdir entry").path();
        let md = fs::symlink_metadata(&p).expect("lstat");
        if md.is_dir() {
            clear_dir(&p);
            fs::remove_dir(&p).unwrap_or_else(|e| panic!("rmdir {}: {e}", p.display()));
        } else {
            fs::remove_file(&p).unwrap_or_else(|e| panic!("unlink {}: {e}", p.display()));
        }
    }
    for n in XATTR_NAMES {
        let _ = sys::lremovexattr(dir, n);
    }
}

struct Env {
    m: Mount,
    /// `PLAIN/w`: the reference directory.
    plain: PathBuf,
    /// `MNT/w`
    mnt: PathBuf,
}

/// Set once a case failed (proptest is shrinking from then on).
static SHRINKING: AtomicBool = AtomicBool::new(false);

fn run_case(env: &Env, ops: &[Op]) -> Result<(), TestCaseError> {
    let r = check_case(env, ops);
    if r.is_err() {
        SHRINKING.store(true, Ordering::Relaxed);
    }
    r
}

fn check_case(env: &Env, ops: &[Op]) -> Result<(), TestCaseError> {
    clear_dir(&env.plain);
    clear_dir(&env.mnt);
    let mut trace = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let want = op.run(&env.plain);
        let got = op.run(&env.mnt);
        trace.push(format!("{i:2}: {op:?} -> {want:?}"));
        if want != got {
            return Err(TestCaseError::fail(format!(
                "operation {i} ({op:?}) gave {} on a plain directory but {} through mirrorfs\n{}",
                show(&want),
                show(&got),
                trace.join("\n")
            )));
        }
    }
    let d = tree_diff(&env.plain, &env.mnt, &Cmp::NO_TIMES);
    if !d.is_empty() {
        return Err(TestCaseError::fail(format!(
            "final trees differ (plain vs mount):\n{}\n{}",
            common::summarize(&d),
            trace.join("\n")
        )));
    }
    // The mirror follows: everything, mtimes included.
    let (backing, mirror) = (env.m.backing(), env.m.mirror());
    let mut last = Vec::new();
    // Generous at first; once a case failed, shrinking retries many cases, so a mirror that
    // diverged is given up on sooner.
    let patience = if SHRINKING.load(Ordering::Relaxed) {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(60)
    };
    let ok = wait_until(patience, || {
        last = tree_diff(backing, mirror, &Cmp::FULL);
        last.is_empty()
    });
    if !ok {
        return Err(TestCaseError::fail(format!(
            "the mirror did not become equal to the backing directory:\n{}\n{}\nmirrorfs log (tail):\n{}",
            common::summarize(&last),
            trace.join("\n"),
            common::tail(&env.m.log(), 40)
        )));
    }
    Ok(())
}

fn show(r: &Res) -> String {
    match r {
        Res::Err(e) => format!("Err({})", sys::errname(*e)),
        Res::Wrote(Err(e)) => format!("Wrote(Err({}))", sys::errname(*e)),
        Res::Data(d) if d.len() > 64 => format!("Data({} bytes)", d.len()),
        other => format!("{other:?}"),
    }
}

#[test]
fn differential_against_a_plain_directory() {
    let t0 = std::time::Instant::now();
    let layout = Layout::new("diff", 1);
    // State outside the backing directory: the backing root then has the same link count as
    // the mirror's.
    let state = layout.base.join("state").display().to_string();
    let plain = layout.base.join("plain").join("w");
    common::mkdir755(&plain);
    let m = Mount::start(layout, &["--state", &state]);
    let mnt = m.p("w");
    sys::mkdir(&mnt, 0o755).expect("mkdir MNT/w");
    let env = Env { m, plain, mnt };

    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    });
    let strategy = prop::collection::vec(op(), 1..40);
    let result = runner.run(&strategy, |ops| run_case(&env, &ops));
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, ops)) => {
            let list: Vec<String> = ops.iter().map(|o| format!("{o:?}")).collect();
            panic!(
                "differential test failed; minimal operation list ({} operations):\n  {}\n\n{reason}",
                list.len(),
                list.join("\n  ")
            );
        }
        Err(e) => panic!("differential test: {e}"),
    }
    let mut m = env.m;
    common::finish(&mut m);
    eprintln!(
        "differential: {cases} cases in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
