//! Every change to the backing tree stays beneath the backing directory (issue 6, finding 1),
//! whatever symlinks a local user plants while the change is on its way; paths longer than
//! `PATH_MAX` from the backing root work as on ext4 (finding 12); `O_DIRECT` works (finding 13).

mod common;

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sys::{self, errname};
use common::{finish, mkdir755, pattern, Layout, Mount};

/// A fresh layout with one mirror and the state directory outside the backing directory
/// (`BASE/state`), so that the tree comparison's count of the root's links matches.
fn mount(tag: &str) -> Mount {
    let layout = Layout::new(tag, 1);
    let state = layout.base.join("state");
    let state = state.to_str().expect("UTF-8 temp path").to_string();
    Mount::start(layout, &["--state", &state])
}

// ---------------------------------------------------------------------------------------------
// Finding 1: no escape from the backing root

/// What an escape would change on a root-owned file or directory outside the backing tree.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
    xattrs: Vec<Vec<u8>>,
}

fn fingerprint(p: &Path) -> Fingerprint {
    let st = sys::lstat(p).unwrap_or_else(|e| panic!("lstat {}: {}", p.display(), errname(e)));
    Fingerprint {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        ctime: (st.st_ctime, st.st_ctime_nsec),
        mtime: (st.st_mtime, st.st_mtime_nsec),
        xattrs: sys::llistxattr(p).unwrap_or_default(),
    }
}

/// Root-owned places outside the backing tree: `OUT/`, `OUT/t/`, `OUT/t/target` (what a
/// directory swapped for a symlink to `OUT` leads to) and `OUT/file2` (what a file swapped for a
/// symlink leads to).
struct Outside {
    dir: PathBuf,
    watched: Vec<(PathBuf, Fingerprint)>,
}

impl Outside {
    fn new(base: &Path) -> Outside {
        let dir = base.join("outside");
        mkdir755(&dir.join("t"));
        for f in [dir.join("t/target"), dir.join("file2")] {
            fs::write(&f, pattern(7, 100)).expect("write an outside file");
            fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        let watched = [
            dir.clone(),
            dir.join("t"),
            dir.join("t/target"),
            dir.join("file2"),
        ]
        .into_iter()
        .map(|p| {
            let f = fingerprint(&p);
            (p, f)
        })
        .collect();
        Outside { dir, watched }
    }

    /// The places that changed since [`Outside::new`], with before and after.
    fn changed(&self) -> Vec<String> {
        self.watched
            .iter()
            .filter_map(|(p, before)| {
                let now = fingerprint(p);
                (now != *before).then(|| format!("{}: {before:?} -> {now:?}", p.display()))
            })
            .collect()
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// Deterministic form of the race: the backing tree is changed behind the mount's back (an
/// ancestor of an open file replaced by a symlink to a root-owned place) so that the path the
/// mount holds for the file now leads outside; requests about the open file must not follow it.
#[test]
fn changes_through_an_open_file_never_follow_a_symlink_planted_in_an_ancestor() {
    let mut m = mount("confine-det");
    let out = Outside::new(&m.layout.base);
    fs::create_dir_all(m.p("p/t")).expect("mkdir p/t");
    let f = sys::open(&m.p("p/t/target"), libc::O_CREAT | libc::O_RDWR, 0o644)
        .expect("create p/t/target");
    sys::write_all(&f, b"inside").expect("write");
    let dir_fd = sys::open(&m.p("p/t"), libc::O_RDONLY | libc::O_DIRECTORY, 0).expect("open p/t");

    // Behind the mount's back: p moves away, and p becomes a symlink to the outside directory.
    fs::rename(m.backing().join("p"), m.backing().join("q")).expect("rename p q in the backing");
    std::os::unix::fs::symlink(&out.dir, m.backing().join("p")).expect("plant the symlink");

    let fd = f.as_raw_fd();
    let name = CString::new("user.escape").expect("name");
    let times = [
        libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 0,
        },
    ];
    let mut results = Vec::new();
    let mut record = |what: &str, r: libc::c_int| {
        let e = if r < 0 { sys::errno() } else { 0 };
        results.push(format!(
            "{what}: {}",
            if r < 0 { errname(e) } else { "ok".into() }
        ));
    };
    // SAFETY (all the calls below): plain system calls on descriptors this test owns, with valid
    // C strings and buffers.
    record("fchmod", unsafe { libc::fchmod(fd, 0o600) });
    record("fchown", unsafe { libc::fchown(fd, 1234, 1234) });
    record("futimens", unsafe { libc::futimens(fd, times.as_ptr()) });
    record("fsetxattr", unsafe {
        libc::fsetxattr(fd, name.as_ptr(), b"1".as_ptr().cast(), 1, 0)
    });
    record("fchmod dir", unsafe {
        libc::fchmod(dir_fd.as_raw_fd(), 0o700)
    });
    record("fsetxattr dir", unsafe {
        libc::fsetxattr(
            dir_fd.as_raw_fd(),
            name.as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    });
    // Within the kernel's entry cache (1 s) a path still reaches the old inode.
    let path = cstr(&m.p("p/t/target"));
    record("truncate", unsafe { libc::truncate(path.as_ptr(), 3) });
    record("chmod", unsafe { libc::chmod(path.as_ptr(), 0o640) });
    record("setxattr", unsafe {
        libc::setxattr(path.as_ptr(), name.as_ptr(), b"2".as_ptr().cast(), 1, 0)
    });
    drop(f);
    drop(dir_fd);

    let changed = out.changed();
    assert!(
        changed.is_empty(),
        "requests through the mount changed root-owned files outside the backing directory \
         ({results:?}):\n{}",
        changed.join("\n")
    );
    // Put the tree back the way the mount knows it, then check backing and mirror agree.
    fs::remove_file(m.backing().join("p")).expect("remove the planted symlink");
    fs::rename(m.backing().join("q"), m.backing().join("p")).expect("rename q p back");
    m.unmount();
}

/// Environment of [`race_helper`]: the world-writable directory on the mount, the outside
/// directory, and how long to race.
const RACE_DIR: &str = "MIRRORFS_RACE_DIR";
const RACE_OUT: &str = "MIRRORFS_RACE_OUT";
const RACE_SECS: &str = "MIRRORFS_RACE_SECS";

/// The racing local user (run as `nobody` by [`an_unprivileged_user_cannot_make_the_mount_change_files_outside_the_backing`]).
#[test]
#[ignore = "helper: run as user nobody by the symlink race test"]
fn race_helper() {
    let (Ok(w), Ok(out), Ok(secs)) = (
        std::env::var(RACE_DIR),
        std::env::var(RACE_OUT),
        std::env::var(RACE_SECS),
    ) else {
        return;
    };
    let w = PathBuf::from(w);
    let out = PathBuf::from(out);
    let secs: u64 = secs.parse().expect("seconds");
    fs::create_dir_all(w.join("p/t")).expect("mkdir p/t as nobody");
    fs::write(w.join("p/t/target"), pattern(1, 50)).expect("create p/t/target as nobody");
    fs::write(w.join("f"), pattern(2, 50)).expect("create f as nobody");
    let held = File::open(w.join("p/t/target")).expect("open p/t/target");
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut threads = Vec::new();
    // Two swappers: the directory p and the file f become symlinks to outside places for a
    // moment, again and again.
    for (name, tmp, target) in [("p", "q", out.clone()), ("f", "g", out.join("file2"))] {
        let (a, b, stop) = (cstr(&w.join(name)), cstr(&w.join(tmp)), stop.clone());
        let t = cstr(&target);
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                // SAFETY: valid C strings; failures are part of the race. The symlink stays
                // for half the time; each rename is a checkpoint on the mirror, so the number of
                // swaps is bounded (about 1,500) to bound what the mirror drains at unmount.
                unsafe {
                    libc::rename(a.as_ptr(), b.as_ptr());
                    libc::symlink(t.as_ptr(), a.as_ptr());
                }
                std::thread::sleep(Duration::from_millis(5));
                unsafe {
                    libc::unlink(a.as_ptr());
                    libc::rename(b.as_ptr(), a.as_ptr());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    // Changes by path, on both names, and by descriptor on the held file.
    for p in [w.join("p/t/target"), w.join("f")] {
        for kind in 0..3 {
            let (p, stop) = (cstr(&p), stop.clone());
            threads.push(std::thread::spawn(move || {
                let name = CString::new("user.escape").expect("name");
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    i += 1;
                    // SAFETY: valid C strings and buffers; failures are part of the race.
                    unsafe {
                        match kind {
                            0 => libc::chmod(p.as_ptr(), 0o600 | (i & 0o40)),
                            1 => libc::truncate(p.as_ptr(), (i % 7) as libc::off_t),
                            _ => libc::setxattr(
                                p.as_ptr(),
                                name.as_ptr(),
                                b"1".as_ptr().cast(),
                                1,
                                0,
                            ),
                        };
                    }
                    // Bounds what the mirror has to drain at unmount.
                    std::thread::sleep(Duration::from_micros(100));
                }
            }));
        }
    }
    let fd = held.as_raw_fd();
    let stop2 = stop.clone();
    threads.push(std::thread::spawn(move || {
        let mut i = 0u32;
        while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
            i += 1;
            // SAFETY: a descriptor owned by `held`, alive until the threads are joined.
            unsafe { libc::fchmod(fd, 0o600 | (i & 0o40)) };
            std::thread::sleep(Duration::from_micros(100));
        }
    }));
    for t in threads {
        let _ = t.join();
    }
    stop.store(true, Ordering::Relaxed);
    drop(held);
}

/// The race of the issue, as the unprivileged user `nobody` on a world-writable directory of an
/// `allow_other` mount: swapping a directory or a file with a symlink to a root-owned place while
/// calling chmod, truncate, setxattr and fchmod must never change anything outside the backing.
#[test]
fn an_unprivileged_user_cannot_make_the_mount_change_files_outside_the_backing() {
    const RACE: Duration = Duration::from_secs(15);
    let mut m = mount("confine-race");
    let out = Outside::new(&m.layout.base);
    let w = m.p("w");
    fs::create_dir(&w).expect("mkdir w");
    fs::set_permissions(&w, fs::Permissions::from_mode(0o777)).expect("chmod 0777 w");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--ignored", "--exact", "race_helper", "--test-threads=1"])
        .env(RACE_DIR, &w)
        .env(RACE_OUT, &out.dir)
        .env(RACE_SECS, RACE.as_secs().to_string())
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the racer as nobody");
    let t0 = Instant::now();
    let mut changed = Vec::new();
    let mut exited = None;
    while t0.elapsed() < RACE + Duration::from_secs(5) {
        changed = out.changed();
        if !changed.is_empty() {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            exited = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let raced = t0.elapsed();
    if exited.is_none() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().expect("wait for the racer");
    assert!(
        changed.is_empty(),
        "after {raced:?} of racing as nobody, root-owned places outside the backing directory \
         changed:\n{}",
        changed.join("\n")
    );
    if let Some(st) = exited {
        assert!(
            st.success(),
            "the racer failed ({st}); its stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(
        w.join("p/t/target").exists() && w.join("f").exists(),
        "the racer's files are in place"
    );
    finish(&mut m);
}

// ---------------------------------------------------------------------------------------------
// Finding 12: long relative paths

/// Directory names that bring a relative path to exactly `PATH_MAX - 1` bytes.
const LONG_DIRS: usize = 16;
const LONG_DIR_LEN: usize = 250;
/// `LONG_DIRS` directories of `LONG_DIR_LEN` bytes, each followed by `/`, then the name.
const LONG_NAME_LEN: usize = 4095 - LONG_DIRS * (LONG_DIR_LEN + 1);

fn long_name(c: char) -> String {
    std::iter::repeat_n(c, LONG_NAME_LEN).collect()
}

/// A shell script that, from `start`, goes three 200-byte directories deep, then makes each
/// operation of finding 12 on a relative path of 4,095 bytes and prints its exit status.
fn long_path_script(start: &Path) -> String {
    let deep: String = (0..3)
        .map(|i| {
            let d: String = std::iter::repeat_n(char::from(b'a' + i), 200).collect();
            format!("mkdir {d} && cd {d} || exit 97\n")
        })
        .collect();
    let mut dirs = String::new();
    let mut prefix = String::new();
    for i in 0..LONG_DIRS {
        let d: String = std::iter::repeat_n(char::from(b'A' + i as u8), LONG_DIR_LEN).collect();
        prefix.push_str(&d);
        dirs.push_str(&format!("mkdir {prefix} || exit 98\n"));
        prefix.push('/');
    }
    let p = |c: char| format!("{prefix}{}", long_name(c));
    assert_eq!(p('c').len(), 4095);
    format!(
        "cd '{start}' || exit 96\n{deep}{dirs}\
         op() {{ l=$1; shift; \"$@\" 2>/dev/null; echo \"$l $?\"; }}\n\
         op create touch {c}\n\
         op chmod chmod 600 {c}\n\
         op chown chown 1234:5678 {c}\n\
         op truncate truncate -s 12345 {c}\n\
         op link ln {c} {l}\n\
         op mkdir mkdir {d}\n\
         op mknod mknod {n} p\n\
         op rename mv -T {c} {r}\n\
         op mkdir2 mkdir {e}\n\
         op rmdir rmdir {e}\n\
         op unlink unlink {l}\n\
         op symlink ln -s some/target {s}\n",
        start = start.display(),
        c = p('c'),
        l = p('l'),
        d = p('d'),
        n = p('n'),
        r = p('r'),
        e = p('e'),
        s = p('s'),
    )
}

/// Lists the deepest directory the script made under `start` (name, type, mode, owner, size,
/// links, symlink target), one line per entry, sorted.
fn long_path_listing(start: &Path) -> String {
    let mut cd = format!("cd '{}' || exit 96\n", start.display());
    for i in 0..3 {
        let d: String = std::iter::repeat_n(char::from(b'a' + i), 200).collect();
        cd.push_str(&format!("cd {d} || exit 95\n"));
    }
    for i in 0..LONG_DIRS {
        let d: String = std::iter::repeat_n(char::from(b'A' + i as u8), LONG_DIR_LEN).collect();
        cd.push_str(&format!("cd {d} || exit 94\n"));
    }
    cd.push_str(
        "for f in *; do echo \"${f:0:1} $(stat -c '%F %a %u %g %s %h' \"$f\") \
         $(if [ -L \"$f\" ]; then readlink \"$f\"; fi)\"; done | sort\n",
    );
    let o = Command::new("bash")
        .arg("-c")
        .arg(cd)
        .output()
        .expect("run bash");
    assert!(
        o.status.success(),
        "listing {} failed: {}",
        start.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn run_script(script: &str) -> String {
    let o = Command::new("bash")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run bash");
    assert!(
        o.status.success(),
        "the script failed to set up ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn operations_on_relative_paths_of_path_max_minus_one_bytes_work_as_on_ext4_and_reach_the_mirror() {
    let mut m = mount("confine-long");
    let reference = m.layout.base.join("ref");
    mkdir755(&reference);
    let want = run_script(&long_path_script(&reference));
    assert!(
        want.lines().all(|l| l.ends_with(" 0")) && want.lines().count() == 12,
        "on the reference directory every operation succeeds:\n{want}"
    );
    let got = run_script(&long_path_script(m.mnt()));
    assert_eq!(
        got, want,
        "through the mount, as on the reference directory"
    );
    let want_list = long_path_listing(&reference);
    assert_eq!(long_path_listing(m.mnt()), want_list, "the mount's entries");
    assert_eq!(
        want_list.lines().count(),
        4,
        "d, n, r (c renamed) and s: {want_list}"
    );
    m.unmount();
    assert_eq!(
        long_path_listing(m.backing()),
        want_list,
        "the backing's entries"
    );
    assert_eq!(
        long_path_listing(m.mirror()),
        want_list,
        "the mirror's entries"
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 13: O_DIRECT

/// An 8 KiB buffer aligned to 4 KiB, inside `raw`.
fn aligned(raw: &mut Vec<u8>) -> &mut [u8] {
    raw.resize(8192 + 4096, 0);
    let off = raw.as_ptr().align_offset(4096);
    &mut raw[off..off + 8192]
}

#[test]
fn o_direct_reads_and_writes_of_aligned_buffers_work_and_reach_the_mirror() {
    let mut m = mount("confine-direct");
    let data = pattern(13, 8192);
    let (mut wraw, mut rraw) = (Vec::new(), Vec::new());
    let wbuf = aligned(&mut wraw);
    wbuf.copy_from_slice(&data);
    // A file created with O_DIRECT, and an existing one opened read-write with O_DIRECT.
    fs::write(m.p("existing"), pattern(1, 100)).expect("create existing");
    for (name, flags) in [
        (
            "created",
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_DIRECT,
        ),
        ("existing", libc::O_RDWR | libc::O_DIRECT),
    ] {
        let f = sys::open(&m.p(name), flags, 0o644)
            .unwrap_or_else(|e| panic!("open {name} with O_DIRECT: {}", errname(e)));
        assert_eq!(
            sys::pwrite(&f, wbuf, 0).map_err(errname),
            Ok(8192),
            "{name}: O_DIRECT write of an aligned 8 KiB buffer at offset 0"
        );
        let rbuf = aligned(&mut rraw);
        rbuf.fill(0);
        assert_eq!(
            sys::pread(&f, rbuf, 0).map_err(errname),
            Ok(8192),
            "{name}: O_DIRECT read of an aligned 8 KiB buffer at offset 0"
        );
        assert!(rbuf[..] == data[..], "{name}: read back what was written");
        drop(f);
        let on_backing = fs::read(m.backing().join(name)).expect("read the backing file");
        assert!(
            on_backing[..8192] == data[..],
            "{name}: content on the backing"
        );
        assert_eq!(
            fs::metadata(m.backing().join(name)).expect("stat").size(),
            8192
        );
    }
    finish(&mut m);
}
