//! `--targets fuse-transport`: what FUSE over io_uring buys per request on this machine,
//! measured with a minimal FUSE server of our own (`server.rs`, written from the kernel's
//! ABI, `abi.rs`) mounted twice side by side in one run:
//! - classic: `read`/`writev` on `/dev/fuse`, one thread per CPU (cloned descriptors);
//! - io_uring: one queue per CPU (`IORING_OP_URING_CMD`, REGISTER then COMMIT_AND_FETCH),
//!   `FUSE_OVER_IO_URING` negotiated at INIT.
//!
//! Both serve the same flat in-memory directory (no data kept, sizes tracked), with entry
//! and attribute timeouts of 0 and no writeback cache (as mirrorfs), mounted with
//! `default_permissions,allow_other` (as mirrorfs). Workloads, each on both mounts
//! alternately (the order swapped every repetition), `REPS` repetitions, median:
//! - stat: `lstat` of the server's `--quick` 1,000 / 10,000 files, 1 and 2 threads;
//! - pwrite 4k: 4 KiB `pwrite`s (100,000; 10,000 with `--quick`) into one open file at
//!   offsets cycling through 16 MiB, 1 thread, and 2 threads each with its own file;
//! - create: open(O_CREAT) + 4 KiB write + close of 5,000 (500) new files.
//!
//! The server counts requests by opcode and by the path they came in on (ring or
//! `/dev/fuse`), so each row also says how many FUSE requests an operation cost and that
//! the io_uring mount really served them through the ring.
//!
//! Needs root, `/dev/fuse`, and for the io_uring half the module parameter
//! `/sys/module/fuse/parameters/enable_uring`: set to `Y` for the run and put back to its
//! previous value afterwards (`UringParamGuard`, also on error and on panic). If the
//! io_uring half cannot be set up, the classic half still runs and the table says why.

pub mod abi;
pub mod server;

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::report::{fmt_num, render_markdown, render_plain};
use server::{RingSetup, Server, Transport};

pub const REPS: usize = 3;
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";
/// pwrite offsets cycle through this many bytes (bounds the page cache the run fills).
const PWRITE_SPAN: u64 = 16 << 20;

/// Sets `enable_uring` to `Y` and puts the previous value back when dropped.
pub struct UringParamGuard {
    previous: Option<String>,
}

impl UringParamGuard {
    pub fn enable() -> Result<UringParamGuard> {
        let previous = std::fs::read_to_string(ENABLE_URING)
            .with_context(|| format!("read {ENABLE_URING} (kernel without CONFIG_FUSE_IO_URING?)"))?
            .trim()
            .to_string();
        let g = UringParamGuard {
            previous: Some(previous),
        };
        std::fs::write(ENABLE_URING, "Y").with_context(|| format!("write Y to {ENABLE_URING}"))?;
        Ok(g)
    }
    pub fn previous(&self) -> &str {
        self.previous.as_deref().unwrap_or("?")
    }
}

impl Drop for UringParamGuard {
    fn drop(&mut self) {
        if let Some(p) = self.previous.take() {
            if let Err(e) = std::fs::write(ENABLE_URING, &p) {
                eprintln!("fuse-transport: cannot restore {ENABLE_URING} to {p}: {e}");
            }
        }
    }
}

/// A mount of our server; unmounted with `umount2(MNT_DETACH)` when dropped, which aborts the
/// connection and ends the server's threads.
pub struct Mounted {
    pub path: PathBuf,
    server: Option<Server>,
}

impl Mounted {
    /// Opens `/dev/fuse`, mounts it at `path` (type `fuse.mirrorfs-ft`) and starts the server.
    pub fn new(path: &Path, transport: Transport, files: usize, threads: usize) -> Result<Mounted> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/fuse")
            .context("open /dev/fuse")?;
        let data = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other",
            dev.as_raw_fd()
        );
        let src = CString::new("mirrorfs-ft")?;
        let fstype = CString::new("fuse.mirrorfs-ft")?;
        let target = CString::new(path.as_os_str().as_bytes())?;
        let data_c = CString::new(data)?;
        // SAFETY: all pointers are valid NUL-terminated strings for the call.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data_c.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mount(2) fuse at {}", path.display()));
        }
        let mut m = Mounted {
            path: path.to_path_buf(),
            server: None,
        };
        m.server = Some(Server::start(dev, transport, files, threads)?);
        Ok(m)
    }

    pub fn server(&self) -> Option<&Server> {
        self.server.as_ref()
    }

    /// Unmounts and waits for the server's threads; the first error of either.
    pub fn close(mut self) -> Result<()> {
        let r = self.unmount();
        let j = match self.server.take() {
            Some(s) => s.join(Duration::from_secs(10)),
            None => Ok(()),
        };
        r.and(j)
    }

    fn unmount(&mut self) -> Result<()> {
        let target = CString::new(self.path.as_os_str().as_bytes())?;
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e).with_context(|| format!("umount2 {}", self.path.display()));
            }
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("fuse-transport: {e:#}");
        }
        if let Some(s) = self.server.take() {
            if let Err(e) = s.join(Duration::from_secs(10)) {
                eprintln!("fuse-transport: {e:#}");
            }
        }
    }
}

/// The workloads; `dir` is a mount's root.
pub mod work {
    use super::*;

    /// `lstat` of `s0`..`s{files-1}`, split between `threads`.
    pub fn stat(dir: &Path, files: usize, threads: usize) -> Result<Duration> {
        let t0 = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || -> Result<()> {
                        for i in (t..files).step_by(threads) {
                            let p = dir.join(format!("s{i}"));
                            let m = std::fs::symlink_metadata(&p)
                                .with_context(|| format!("lstat {}", p.display()))?;
                            if !m.is_file() {
                                bail!("{} is not a file", p.display());
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                h.join()
                    .map_err(|_| anyhow::anyhow!("stat thread panicked"))??;
            }
            Ok(())
        })?;
        Ok(t0.elapsed())
    }

    /// `ops` 4 KiB pwrites split between `threads`, each into its own file `{tag}-{t}`.
    pub fn pwrite(dir: &Path, tag: &str, ops: usize, threads: usize) -> Result<Duration> {
        let files: Vec<File> = (0..threads)
            .map(|t| {
                let p = dir.join(format!("{tag}-{t}"));
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p)
                    .with_context(|| format!("create {}", p.display()))
            })
            .collect::<Result<_>>()?;
        let block = [0x5au8; 4096];
        let t0 = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let hs: Vec<_> = files
                .iter()
                .enumerate()
                .map(|(t, f)| {
                    let n = ops / threads + usize::from(t < ops % threads);
                    s.spawn(move || -> Result<()> {
                        for i in 0..n as u64 {
                            let off = (i * 4096) % PWRITE_SPAN;
                            f.write_all_at(&block, off).context("pwrite")?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                h.join()
                    .map_err(|_| anyhow::anyhow!("pwrite thread panicked"))??;
            }
            Ok(())
        })?;
        let d = t0.elapsed();
        for (t, f) in files.iter().enumerate() {
            let len = f.metadata().context("fstat")?.len();
            let want = ((ops / threads) as u64 * 4096).min(PWRITE_SPAN);
            if len < want {
                bail!("file {tag}-{t} is {len} bytes after the writes, expected ≥ {want}");
            }
        }
        Ok(d)
    }

    /// `n` new files `{tag}-{i}`: open(O_CREAT|O_EXCL|O_WRONLY), 4 KiB write, close.
    pub fn create(dir: &Path, tag: &str, n: usize) -> Result<Duration> {
        let block = [0xa5u8; 4096];
        let t0 = Instant::now();
        for i in 0..n {
            let p = dir.join(format!("{tag}-{i}"));
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
                .with_context(|| format!("create {}", p.display()))?;
            f.write_all_at(&block, 0).context("write")?;
            drop(f);
        }
        Ok(t0.elapsed())
    }
}

#[derive(Clone, Copy)]
enum Load {
    Stat { threads: usize },
    Pwrite { threads: usize },
    Create,
}

impl Load {
    fn label(self, sz: &Sizes) -> String {
        match self {
            Load::Stat { threads } => format!("stat {} files, {threads} thr", sz.files),
            Load::Pwrite { threads } => format!("pwrite 4k x{}, {threads} thr", sz.pwrites),
            Load::Create => format!("create+4k+close x{}", sz.creates),
        }
    }
    fn ops(self, sz: &Sizes) -> usize {
        match self {
            Load::Stat { .. } => sz.files,
            Load::Pwrite { .. } => sz.pwrites,
            Load::Create => sz.creates,
        }
    }
    fn run(self, dir: &Path, sz: &Sizes, rep: usize) -> Result<Duration> {
        match self {
            Load::Stat { threads } => work::stat(dir, sz.files, threads),
            Load::Pwrite { threads } => {
                work::pwrite(dir, &format!("w{rep}t{threads}"), sz.pwrites, threads)
            }
            Load::Create => work::create(dir, &format!("c{rep}"), sz.creates),
        }
    }
}

pub struct Sizes {
    pub files: usize,
    pub pwrites: usize,
    pub creates: usize,
}

impl Sizes {
    pub fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                files: 1_000,
                pwrites: 10_000,
                creates: 500,
            }
        } else {
            Sizes {
                files: 10_000,
                pwrites: 100_000,
                creates: 5_000,
            }
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One transport's figures for one workload.
#[derive(Default)]
struct Cell {
    secs: Vec<f64>,
    /// CPU seconds (user + system) of this whole process, which holds both the workload's
    /// threads and the server's: both ends of every round trip.
    cpu: Vec<f64>,
    requests: u64,
    via_ring: u64,
    /// Requests by opcode over all repetitions.
    by_op: Vec<(u32, u64)>,
}

fn measure(m: &Mounted, load: Load, sz: &Sizes, rep: usize, cell: &mut Cell) -> Result<()> {
    let Some(srv) = m.server() else {
        bail!("no server");
    };
    let (b_op, b_ring, b_dev) = srv.fs.counts.snapshot();
    let cpu0 = process_cpu_secs()?;
    let d = load.run(&m.path, sz, rep)?;
    let cpu1 = process_cpu_secs()?;
    let (a_op, a_ring, a_dev) = srv.fs.counts.snapshot();
    cell.secs.push(d.as_secs_f64());
    cell.cpu.push(cpu1 - cpu0);
    cell.requests += (a_ring + a_dev) - (b_ring + b_dev);
    cell.via_ring += a_ring - b_ring;
    for (o, (a, b)) in a_op.iter().zip(b_op.iter()).enumerate() {
        if a > b {
            match cell.by_op.iter_mut().find(|(x, _)| *x as usize == o) {
                Some(e) => e.1 += a - b,
                None => cell.by_op.push((o as u32, a - b)),
            }
        }
    }
    Ok(())
}

/// User + system CPU seconds of this process so far (all threads).
fn process_cpu_secs() -> Result<f64> {
    // SAFETY: rusage is plain data, filled by the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage");
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    Ok(t(ru.ru_utime) + t(ru.ru_stime))
}

fn ops_mix(cell: &Cell, ops: usize) -> String {
    let mut v = cell.by_op.clone();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    let total_ops = (ops * cell.secs.len()).max(1) as f64;
    v.iter()
        .filter(|(_, n)| *n as f64 / total_ops >= 0.01)
        .map(|(o, n)| format!("{} {:.2}", abi::op::name(*o), *n as f64 / total_ops))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the comparison. `variants`: also io_uring unpinned and with DEFER_TASKRUN.
pub fn run(markdown: bool, quick: bool, variants: bool, workdir: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("fuse-transport needs root (mount(2))");
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("fuse-transport needs /dev/fuse");
    }
    let sz = Sizes::new(quick);
    std::fs::create_dir_all(workdir).with_context(|| format!("create {}", workdir.display()))?;
    let base =
        crate::mounts::DirGuard::new(tempdir_in(workdir).context("temp dir for the mount points")?);
    let cpus = server::possible_cpus()?;
    let load_before = loadavg();
    eprintln!(
        "fuse-transport: load average {load_before}; {cpus} CPUs; sizes: {} files, {} pwrites, {} creates",
        sz.files, sz.pwrites, sz.creates
    );

    let mut transports = vec![Transport::Uring(RingSetup {
        pinned: true,
        defer_taskrun: false,
    })];
    if variants {
        transports.push(Transport::Uring(RingSetup {
            pinned: false,
            defer_taskrun: false,
        }));
        transports.push(Transport::Uring(RingSetup {
            pinned: true,
            defer_taskrun: true,
        }));
    }
    // Declared before the mounts so that it is dropped (the parameter put back) only after
    // they are unmounted, also when this function returns early or panics. The classic mount
    // does not ask for FUSE_OVER_IO_URING at INIT, so the parameter does not change it.
    let (guard, param_before) = match UringParamGuard::enable() {
        Ok(g) => {
            let p = g.previous().to_string();
            (Some(g), p)
        }
        Err(e) => {
            eprintln!("fuse-transport: {e:#}");
            (None, "?".into())
        }
    };
    let classic_dir = base.path().join("classic");
    std::fs::create_dir(&classic_dir)?;
    let classic = Mounted::new(&classic_dir, Transport::Classic, sz.files, cpus)
        .context("classic transport")?;
    let mut mounts: Vec<(Transport, Mounted)> = vec![(Transport::Classic, classic)];
    let mut uring_err = None;
    if guard.is_some() {
        for (i, t) in transports.iter().enumerate() {
            let dir = base.path().join(format!("uring{i}"));
            std::fs::create_dir(&dir)?;
            match Mounted::new(&dir, *t, sz.files, cpus) {
                Ok(m) => mounts.push((*t, m)),
                Err(e) => {
                    eprintln!("fuse-transport: {} not available: {e:#}", t.label());
                    uring_err = Some(format!("{}: {e:#}", t.label()));
                    break;
                }
            }
        }
    } else {
        uring_err = Some(format!("cannot set {ENABLE_URING}"));
    }

    let loads = [
        Load::Stat { threads: 1 },
        Load::Stat { threads: 2 },
        Load::Pwrite { threads: 1 },
        Load::Pwrite { threads: 2 },
        Load::Create,
    ];
    let mut head = vec!["workload".to_string()];
    for (i, (t, _)) in mounts.iter().enumerate() {
        head.push(format!("{} ops/s", t.label()));
        head.push(format!("{} µs/op", t.label()));
        head.push(format!("{} CPU µs/op", t.label()));
        if i > 0 {
            head.push(format!("{} / classic", t.label()));
            head.push(format!("{} CPU / classic", t.label()));
        }
    }
    head.push("FUSE requests per op (classic; io_uring)".into());
    let mut rows = vec![head];
    let mut ring_share = Vec::new();
    for load in loads {
        let mut cells: Vec<Cell> = mounts.iter().map(|_| Cell::default()).collect();
        for rep in 0..REPS {
            // Rotate the order every repetition, so that no mount always goes first.
            for k in 0..mounts.len() {
                crate::check_interrupted()?;
                let i = (k + rep) % mounts.len();
                measure(&mounts[i].1, load, &sz, rep, &mut cells[i])?;
            }
        }
        let ops = load.ops(&sz) as f64;
        let classic_median = median(&mut cells[0].secs.clone());
        let classic_cpu = median(&mut cells[0].cpu.clone());
        let mut row = vec![load.label(&sz)];
        for (i, c) in cells.iter().enumerate() {
            let m = median(&mut c.secs.clone());
            let cpu = median(&mut c.cpu.clone());
            row.push(fmt_num(ops / m));
            row.push(format!("{:.1}", m * 1e6 / ops));
            row.push(format!("{:.1}", cpu * 1e6 / ops));
            if i > 0 {
                row.push(format!("{:.2}x", classic_median / m));
                // Above 1: io_uring spends less CPU per operation.
                row.push(format!("{:.2}x", classic_cpu / cpu));
                ring_share.push((
                    format!("{}, {}", mounts[i].0.label(), load.label(&sz)),
                    c.via_ring,
                    c.requests,
                ));
            }
        }
        let mut mix = ops_mix(&cells[0], load.ops(&sz));
        if let Some(u) = cells.get(1) {
            mix = format!("{mix}; {}", ops_mix(u, load.ops(&sz)));
        }
        row.push(mix);
        rows.push(row);
    }
    let load_after = loadavg();

    let mut out = String::new();
    out.push_str(&format!(
        "\nFUSE transport: classic /dev/fuse ({cpus} threads, cloned fds) vs FUSE over io_uring ({cpus} queues x {} entries); our in-memory server; median of {REPS}, order rotated; timeouts 0, no writeback cache; ratios above 1 favour io_uring (wall: classic time / io_uring time; CPU: the same for the process's user+system CPU, both ends of the round trip)\n",
        server::RING_DEPTH
    ));
    if markdown {
        out.push_str(&render_markdown(&rows));
    } else {
        out.push_str(&render_plain(&rows));
    }
    let (ring, total) = ring_share
        .iter()
        .fold((0, 0), |(r, t), (_, a, b)| (r + a, t + b));
    if total > 0 {
        out.push_str(&format!(
            "io_uring mounts: {ring} of {total} requests through the ring (the rest through /dev/fuse)\n"
        ));
    }
    for (label, ring, total) in &ring_share {
        if ring != total {
            out.push_str(&format!("  {label}: {ring} of {total} through the ring\n"));
        }
    }
    if let Some(e) = &uring_err {
        out.push_str(&format!("io_uring transport not measured: {e}\n"));
    }
    out.push_str(&format!(
        "load average before {load_before}, after {load_after}; enable_uring was {param_before} and is put back\n"
    ));
    print!("{out}");

    let mut first = Ok(());
    for (t, m) in mounts {
        let r = m.close().with_context(|| format!("{} server", t.label()));
        if first.is_ok() {
            first = r;
        }
    }
    drop(guard);
    first
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("clock before 1970")?;
    let p = dir.join(format!("ft-{}-{}", std::process::id(), now.as_nanos()));
    std::fs::create_dir(&p).with_context(|| format!("create {}", p.display()))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Mutex};

    /// The tests that change `enable_uring` run one at a time.
    static PARAM: Mutex<()> = Mutex::new(());

    fn param() -> String {
        std::fs::read_to_string(ENABLE_URING)
            .expect("read enable_uring")
            .trim()
            .to_string()
    }

    fn can_mount() -> bool {
        // SAFETY: geteuid has no preconditions.
        let ok = Path::new("/dev/fuse").exists() && unsafe { libc::geteuid() } == 0;
        if !ok {
            eprintln!("skipped: needs /dev/fuse and root");
        }
        ok
    }

    /// stat, pwrite, create, readdir, read and a missing name through the mount at `dir`.
    fn file_ops(dir: &Path) -> Result<()> {
        work::stat(dir, 50, 2)?;
        work::pwrite(dir, "w", 10, 1)?;
        let data = std::fs::read(dir.join("w-0"))?;
        if data.len() != 10 * 4096 || data.iter().any(|&b| b != 0) {
            bail!("read back {} bytes, expected 40960 zeros", data.len());
        }
        work::create(dir, "c", 5)?;
        let n = std::fs::read_dir(dir)?.count();
        if n != 50 + 1 + 5 {
            bail!("readdir listed {n} entries, expected 56");
        }
        match std::fs::symlink_metadata(dir.join("nope")) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => bail!("a missing name gave {other:?}"),
        }
    }

    /// Runs `file_ops` on the mount in a thread, failing (never hanging) after 60 s: the
    /// mount's drop then aborts the connection, which ends the blocked calls.
    fn exercise(m: &Mounted) {
        let dir = m.path.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(file_ops(&dir).map_err(|e| format!("{e:#}")));
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(r) => r.expect("file operations"),
            Err(_) => panic!("file operations through the mount did not end within 60 s"),
        }
    }

    fn check_counts(m: &Mounted) -> (u64, u64) {
        let (by_op, ring, dev) = m.server().expect("server").fs.counts.snapshot();
        assert!(
            by_op[abi::op::GETATTR as usize] >= 50,
            "one GETATTR per lstat at timeout 0"
        );
        assert!(by_op[abi::op::LOOKUP as usize] >= 50);
        assert_eq!(
            by_op[abi::op::WRITE as usize],
            10 + 5,
            "one WRITE per 4 KiB pwrite"
        );
        assert_eq!(by_op[abi::op::CREATE as usize], 1 + 5);
        (ring, dev)
    }

    /// Mounts the classic transport and runs a stat pass, writes, creates and reads through
    /// it. Skips (passes with a message) without /dev/fuse or root.
    #[test]
    fn classic_transport_serves_stat_and_write() {
        if !can_mount() {
            return;
        }
        let base = crate::mounts::DirGuard::new(tempdir_in(&std::env::temp_dir()).expect("tmp"));
        let m = Mounted::new(base.path(), Transport::Classic, 50, 2).expect("mount");
        exercise(&m);
        let (ring, dev) = check_counts(&m);
        assert_eq!(ring, 0);
        assert!(dev >= 50 * 3);
        m.close().expect("unmount and join");
        assert!(!crate::mounts::is_mounted(base.path()).expect("mountinfo"));
    }

    /// The same through FUSE over io_uring: every request of the workload comes through the
    /// ring, and `enable_uring` is back to its value afterwards.
    #[test]
    fn uring_transport_serves_stat_and_write() {
        if !can_mount() || !Path::new(ENABLE_URING).exists() {
            eprintln!("skipped: needs {ENABLE_URING}");
            return;
        }
        let _one = PARAM.lock().unwrap_or_else(|e| e.into_inner());
        let before = param();
        {
            let _g = UringParamGuard::enable().expect("enable_uring");
            let base =
                crate::mounts::DirGuard::new(tempdir_in(&std::env::temp_dir()).expect("tmp"));
            let setup = RingSetup {
                pinned: true,
                defer_taskrun: false,
            };
            let m = Mounted::new(base.path(), Transport::Uring(setup), 50, 2).expect("mount");
            exercise(&m);
            let (ring, _dev) = check_counts(&m);
            assert!(
                ring >= 50 * 3 + 10 + 5 * 9,
                "{ring} requests through the ring"
            );
            let fs = m.server().expect("server").fs.clone();
            m.close().expect("unmount and join");
            assert_eq!(
                fs.queues_leaked.load(std::sync::atomic::Ordering::Relaxed),
                0,
                "every entry came back at the unmount"
            );
        }
        assert_eq!(param(), before);
    }

    /// The parameter guard puts the previous value back on panic too.
    #[test]
    fn uring_param_guard_restores_on_panic() {
        if unsafe { libc::geteuid() } != 0 || !Path::new(ENABLE_URING).exists() {
            eprintln!("skipped: needs root and {ENABLE_URING}");
            return;
        }
        let _one = PARAM.lock().unwrap_or_else(|e| e.into_inner());
        let before = param();
        let r = std::panic::catch_unwind(|| {
            let _g = UringParamGuard::enable().expect("enable_uring");
            assert_eq!(param(), "Y");
            panic!("on purpose");
        });
        assert!(r.is_err());
        assert_eq!(param(), before);
    }
}
