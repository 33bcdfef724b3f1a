//! The measurement server: one flat in-memory directory of regular files (attributes in
//! memory, data discarded, sizes tracked), served over either transport:
//! - classic: `read`/`writev` on `/dev/fuse`, one thread per descriptor (the first one, the
//!   others cloned with `FUSE_DEV_IOC_CLONE`);
//! - io_uring: one ring and one thread per kernel queue (one queue per possible CPU, the
//!   thread pinned to it), `IORING_OP_URING_CMD` with 128-byte SQEs: `REGISTER` of
//!   `RING_DEPTH` entries, then `COMMIT_AND_FETCH` per request. One classic thread stays on
//!   `/dev/fuse` for what the kernel never sends through the ring (INIT before the ring
//!   exists, FORGET, BATCH_FORGET, INTERRUPT).
//!
//! Buffers are fixed at start (`DEV_BUF`, `PAYLOAD_BUF` per ring entry); a request that does
//! not fit is refused by the kernel, never grown into. Timeouts are 0 (every `lstat` asks the
//! server), there is no writeback cache.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use super::abi::{self, op, Attr, InHeader, Out, Request};

/// `max_write` negotiated at INIT (the kernel's default `max_pages` of 32 allows 128 KiB).
pub const MAX_WRITE: u32 = 128 << 10;
/// A `/dev/fuse` read must hold the largest request: a WRITE of `MAX_WRITE` and its headers.
pub const DEV_BUF: usize = MAX_WRITE as usize + 4096;
/// A ring entry's payload buffer: the kernel refuses less than its `max_payload_sz`
/// (max of 8 KiB, `max_write`, `max_pages` × page size).
pub const PAYLOAD_BUF: usize = MAX_WRITE as usize;
/// Reply bodies are at most a READ or READDIR of `MAX_WRITE` (the kernel asks no more).
pub const REPLY_BUF: usize = MAX_WRITE as usize;
/// Entries registered per ring queue.
pub const RING_DEPTH: usize = 4;
/// The most files the server will hold: CREATE beyond it gets ENOSPC.
pub const MAX_FILES: usize = 1_000_000;
const ROOT: u64 = 1;

/// `FUSE_DEV_IOC_CLONE` = `_IOR(229, 0, uint32_t)`.
const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Classic,
    Uring(RingSetup),
}

/// How the io_uring queues are set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingSetup {
    /// Each queue's thread pinned to its CPU (the kernel picks the queue by the CPU of the
    /// task that makes the request; libfuse pins likewise).
    pub pinned: bool,
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN`: completions (the kernel's
    /// task work handing us a request) run only when the thread waits in `io_uring_enter`.
    pub defer_taskrun: bool,
}

impl Transport {
    pub fn label(self) -> String {
        match self {
            Transport::Classic => "classic".into(),
            Transport::Uring(s) => {
                let mut l = "io_uring".to_string();
                if !s.pinned {
                    l.push_str(" unpinned");
                }
                if s.defer_taskrun {
                    l.push_str(" defer_taskrun");
                }
                l
            }
        }
    }
}

struct Node {
    name: Box<[u8]>,
    size: AtomicU64,
}

struct Dir {
    by_name: HashMap<Box<[u8]>, u64>,
    /// Node `ino` is `nodes[ino - 2]`.
    nodes: Vec<Node>,
}

/// Request counters: by opcode, and by the path they came in on.
pub struct Counts {
    pub by_op: [AtomicU64; op::COUNTED],
    pub via_ring: AtomicU64,
    pub via_dev: AtomicU64,
}

impl Counts {
    fn new() -> Counts {
        Counts {
            by_op: std::array::from_fn(|_| AtomicU64::new(0)),
            via_ring: AtomicU64::new(0),
            via_dev: AtomicU64::new(0),
        }
    }
    /// (by opcode, ring, dev) now.
    pub fn snapshot(&self) -> ([u64; op::COUNTED], u64, u64) {
        (
            std::array::from_fn(|i| self.by_op[i].load(Ordering::Relaxed)),
            self.via_ring.load(Ordering::Relaxed),
            self.via_dev.load(Ordering::Relaxed),
        )
    }
}

pub struct Fs {
    dir: RwLock<Dir>,
    transport: Transport,
    pub counts: Counts,
    /// Set once the INIT reply has been written (the kernel then accepts ring commands).
    initialized: AtomicBool,
    /// Whether the kernel offered FUSE_OVER_IO_URING at INIT.
    pub kernel_offered_uring: AtomicBool,
    /// Ring queues that ended with entries the kernel had not given back (buffers leaked).
    pub queues_leaked: AtomicU64,
}

impl Fs {
    /// A directory with `files` empty files named `s0` … `s{files-1}`.
    pub fn new(transport: Transport, files: usize) -> Fs {
        let mut dir = Dir {
            by_name: HashMap::with_capacity(files),
            nodes: Vec::with_capacity(files),
        };
        for i in 0..files.min(MAX_FILES) {
            let name: Box<[u8]> = format!("s{i}").into_bytes().into_boxed_slice();
            dir.by_name.insert(name.clone(), dir.nodes.len() as u64 + 2);
            dir.nodes.push(Node {
                name,
                size: AtomicU64::new(0),
            });
        }
        Fs {
            dir: RwLock::new(dir),
            transport,
            counts: Counts::new(),
            initialized: AtomicBool::new(false),
            kernel_offered_uring: AtomicBool::new(false),
            queues_leaked: AtomicU64::new(0),
        }
    }

    fn root_attr() -> Attr {
        Attr {
            ino: ROOT,
            size: 4096,
            mode: libc::S_IFDIR | 0o755,
            nlink: 2,
            mtime: 0,
        }
    }

    fn file_attr(ino: u64, size: u64) -> Attr {
        Attr {
            ino,
            size,
            mode: libc::S_IFREG | 0o644,
            nlink: 1,
            mtime: 0,
        }
    }

    fn attr_of(&self, ino: u64) -> Option<Attr> {
        if ino == ROOT {
            return Some(Fs::root_attr());
        }
        let d = self.dir.read().ok()?;
        let n = d.nodes.get(usize::try_from(ino.checked_sub(2)?).ok()?)?;
        Some(Fs::file_attr(ino, n.size.load(Ordering::Relaxed)))
    }

    /// Handles one request; the reply body goes to `out`. Returns `None` for requests that
    /// take no reply, else `Some(0)` or `Some(-errno)`.
    pub fn handle(&self, h: &InHeader, r: &Request<'_>, out: &mut Out<'_>) -> Option<i32> {
        if let Some(c) = self.counts.by_op.get(h.opcode as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let e = |errno: i32| Some(-errno);
        let ok = |fits: bool| if fits { Some(0) } else { Some(-libc::EIO) };
        match *r {
            Request::Init {
                major,
                minor,
                flags,
                ..
            } => {
                if major != abi::FUSE_KERNEL_VERSION {
                    return e(libc::EPROTO);
                }
                let offered_uring = flags & abi::FUSE_OVER_IO_URING != 0;
                self.kernel_offered_uring
                    .store(offered_uring, Ordering::Relaxed);
                let mut want = abi::FUSE_ASYNC_READ
                    | abi::FUSE_BIG_WRITES
                    | abi::FUSE_PARALLEL_DIROPS
                    | abi::FUSE_INIT_EXT;
                if matches!(self.transport, Transport::Uring(_)) {
                    want |= abi::FUSE_OVER_IO_URING;
                }
                let minor = minor.min(abi::FUSE_KERNEL_MINOR_VERSION);
                ok(abi::init_out(out, minor, flags & want, MAX_WRITE, 32))
            }
            Request::Lookup { name } => {
                if h.nodeid != ROOT {
                    return e(libc::ENOTDIR);
                }
                let ino = match self.dir.read() {
                    Ok(d) => d.by_name.get(name).copied(),
                    Err(_) => return e(libc::EIO),
                };
                match ino.and_then(|i| self.attr_of(i)) {
                    Some(a) => ok(abi::entry_out(out, &a, 0)),
                    None => e(libc::ENOENT),
                }
            }
            Request::Forget | Request::BatchForget { .. } => None,
            Request::Getattr => match self.attr_of(h.nodeid) {
                Some(a) => ok(abi::attr_out(out, &a, 0)),
                None => e(libc::ENOENT),
            },
            Request::Setattr { valid, size } => {
                if valid & abi::FATTR_SIZE != 0 {
                    if h.nodeid == ROOT {
                        return e(libc::EISDIR);
                    }
                    if let Err(errno) = self.set_size(h.nodeid, |_| size) {
                        return e(errno);
                    }
                }
                match self.attr_of(h.nodeid) {
                    Some(a) => ok(abi::attr_out(out, &a, 0)),
                    None => e(libc::ENOENT),
                }
            }
            Request::Open { .. } => {
                if self.attr_of(h.nodeid).is_none() {
                    return e(libc::ENOENT);
                }
                ok(abi::open_out(out, h.nodeid))
            }
            Request::Create { name, .. } => {
                if h.nodeid != ROOT {
                    return e(libc::ENOTDIR);
                }
                if name.len() > 255 || name.contains(&b'/') {
                    return e(libc::EINVAL);
                }
                let ino = {
                    let Ok(mut d) = self.dir.write() else {
                        return e(libc::EIO);
                    };
                    if let Some(&ino) = d.by_name.get(name) {
                        ino
                    } else {
                        if d.nodes.len() >= MAX_FILES {
                            return e(libc::ENOSPC);
                        }
                        let ino = d.nodes.len() as u64 + 2;
                        let name: Box<[u8]> = name.into();
                        d.by_name.insert(name.clone(), ino);
                        d.nodes.push(Node {
                            name,
                            size: AtomicU64::new(0),
                        });
                        ino
                    }
                };
                match self.attr_of(ino) {
                    Some(a) => ok(abi::entry_out(out, &a, 0) && abi::open_out(out, ino)),
                    None => e(libc::EIO),
                }
            }
            Request::Write { offset, data, .. } => {
                let end = offset.saturating_add(data.len() as u64);
                match self.set_size(h.nodeid, |s| s.max(end)) {
                    Ok(()) => ok(abi::write_out(out, data.len() as u32)),
                    Err(errno) => e(errno),
                }
            }
            Request::Read { offset, size, .. } => {
                let Some(a) = self.attr_of(h.nodeid) else {
                    return e(libc::ENOENT);
                };
                let n = a.size.saturating_sub(offset).min(u64::from(size)) as usize;
                ok(out.zeros(n))
            }
            Request::Flush | Request::Release | Request::Releasedir | Request::Opendir => {
                if matches!(r, Request::Opendir) {
                    return ok(abi::open_out(out, 0));
                }
                Some(0)
            }
            Request::Statfs => {
                let files = self.dir.read().map(|d| d.nodes.len() as u64).unwrap_or(0);
                ok(abi::statfs_out(out, files))
            }
            Request::Readdir { offset, size } => {
                let Ok(d) = self.dir.read() else {
                    return e(libc::EIO);
                };
                let mut cap = vec![0u8; (size as usize).min(out.room())];
                let mut o = Out::new(&mut cap);
                // Offsets (each entry's own; the next one's goes in the dirent): 0 = ".",
                // 1 = "..", n >= 2 = the node with ino n (nodes[n - 2]).
                let mut off = offset;
                loop {
                    let (ino, name, dtype): (u64, &[u8], u32) = match off {
                        0 => (ROOT, b".", libc::DT_DIR.into()),
                        1 => (ROOT, b"..", libc::DT_DIR.into()),
                        n => match d.nodes.get((n - 2) as usize) {
                            Some(node) => (n, &node.name, libc::DT_REG.into()),
                            None => break,
                        },
                    };
                    if !abi::dirent(&mut o, ino, off + 1, dtype, name) {
                        break;
                    }
                    off += 1;
                }
                let n = o.len();
                ok(out.put(&cap[..n]))
            }
            Request::Getxattr => e(libc::ENODATA),
            Request::Interrupt => None,
            Request::Destroy => Some(0),
            Request::Other(_) => e(libc::ENOSYS),
        }
    }

    fn set_size(&self, ino: u64, f: impl Fn(u64) -> u64) -> Result<(), i32> {
        let d = self.dir.read().map_err(|_| libc::EIO)?;
        let i = ino
            .checked_sub(2)
            .and_then(|i| usize::try_from(i).ok())
            .ok_or(libc::ENOENT)?;
        let n = d.nodes.get(i).ok_or(libc::ENOENT)?;
        let _ = n
            .size
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(f(s)));
        Ok(())
    }
}

/// A running server: its threads end when the connection goes (unmount aborts it).
pub struct Server {
    pub fs: Arc<Fs>,
    threads: Vec<JoinHandle<Result<()>>>,
    /// Descriptors the threads use; closed after they end.
    _dev: Vec<Arc<File>>,
}

fn cvt(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn clone_dev(dev: &File) -> Result<File> {
    let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("open /dev/fuse for a clone");
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    let f = unsafe { File::from_raw_fd(fd) };
    let mut src: u32 = dev.as_raw_fd() as u32;
    if unsafe { libc::ioctl(f.as_raw_fd(), FUSE_DEV_IOC_CLONE, &mut src) } < 0 {
        return Err(io::Error::last_os_error()).context("FUSE_DEV_IOC_CLONE");
    }
    Ok(f)
}

/// Classic loop: read a request, handle it, `writev` header + body. Ends on ENODEV (the
/// connection is gone).
fn dev_loop(fs: &Fs, dev: &File, init_tx: Option<mpsc::Sender<()>>) -> Result<()> {
    let mut buf = vec![0u8; DEV_BUF];
    let mut reply = vec![0u8; REPLY_BUF];
    let fd: RawFd = dev.as_raw_fd();
    loop {
        let n = match cvt(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }) {
            Ok(n) => n,
            Err(e) => match e.raw_os_error() {
                Some(libc::ENODEV) => return Ok(()),
                // ENOENT: the request was interrupted before we read it.
                Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
                _ => return Err(e).context("read /dev/fuse"),
            },
        };
        let (h, r) = match abi::parse_dev(&buf[..n]) {
            Ok(x) => x,
            Err(pe) => {
                // Answer what has a header, so that the caller is not left waiting.
                if let Ok(h) = InHeader::parse(&buf[..n]) {
                    let hd = abi::out_header(h.unique, -libc::EIO, 0);
                    let _ = unsafe { libc::write(fd, hd.as_ptr().cast(), hd.len()) };
                }
                eprintln!("fuse-transport: refused a request: {pe}");
                continue;
            }
        };
        fs.counts.via_dev.fetch_add(1, Ordering::Relaxed);
        let is_init = matches!(r, Request::Init { .. });
        let mut out = Out::new(&mut reply);
        let Some(err) = fs.handle(&h, &r, &mut out) else {
            continue;
        };
        let len = if err == 0 { out.len() } else { 0 };
        let hd = abi::out_header(h.unique, err, len);
        let iov = [
            libc::iovec {
                iov_base: hd.as_ptr() as *mut libc::c_void,
                iov_len: hd.len(),
            },
            libc::iovec {
                iov_base: reply.as_mut_ptr().cast(),
                iov_len: len,
            },
        ];
        match cvt(unsafe { libc::writev(fd, iov.as_ptr(), 2) }) {
            Ok(_) => {}
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOENT) => {} // interrupted meanwhile
                Some(libc::ENODEV) => return Ok(()),
                _ => return Err(e).context("writev /dev/fuse"),
            },
        }
        if is_init && err == 0 {
            fs.initialized.store(true, Ordering::Release);
            if let Some(tx) = &init_tx {
                let _ = tx.send(());
            }
        }
    }
}

/// CPUs the kernel makes queues for (`num_possible_cpus()`), from
/// `/sys/devices/system/cpu/possible` ("0-1", "0", "0-3,5").
pub fn possible_cpus() -> Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .context("read /sys/devices/system/cpu/possible")?;
    let mut n = 0usize;
    for part in s.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.parse().context("cpu range")?;
                let b: usize = b.parse().context("cpu range")?;
                n += b.saturating_sub(a) + 1;
            }
            None => {
                let _: usize = part.parse().context("cpu number")?;
                n += 1;
            }
        }
    }
    Ok(n)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks against its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// One ring entry's buffers; their addresses are handed to the kernel at REGISTER and must
/// stay put until the ring is gone (boxed, never moved or resized).
struct RingEnt {
    hdr: Box<[u8; abi::URING_HEADER_LEN]>,
    payload: Box<[u8]>,
    iov: Box<[libc::iovec; 2]>,
}

/// The io-uring crate's `UringCmd80` has no `len`; REGISTER needs `sqe->len` = 2 (the iovec
/// count). `Entry128` is `repr(C)`: the kernel's `io_uring_sqe` (64 bytes, `len` at byte 24)
/// followed by the 64 extra command bytes.
fn with_sqe_len(mut e: io_uring::squeue::Entry128, len: u32) -> io_uring::squeue::Entry128 {
    const _: () = assert!(std::mem::size_of::<io_uring::squeue::Entry128>() == 128);
    let p = (&mut e as *mut io_uring::squeue::Entry128).cast::<u8>();
    // SAFETY: in bounds of a 128-byte repr(C) value we own; unaligned write.
    unsafe { p.add(24).cast::<u32>().write_unaligned(len) };
    e
}

/// One queue: register `RING_DEPTH` entries for `qid`, then serve: each completion carries a
/// request in the entry's buffers; the reply goes back in the same buffers with
/// COMMIT_AND_FETCH, which also hands the entry to the kernel for the next request.
/// Ends when the kernel completes entries with an error (connection aborted at unmount).
fn ring_loop(
    fs: &Fs,
    dev: &File,
    qid: u16,
    setup: RingSetup,
    ready_tx: mpsc::Sender<Result<(), String>>,
) -> Result<()> {
    use io_uring::{opcode, squeue, types, IoUring};
    if setup.pinned {
        pin_to_cpu(qid as usize);
    }
    let mut builder = IoUring::<squeue::Entry128>::builder();
    if setup.defer_taskrun {
        builder.setup_single_issuer().setup_defer_taskrun();
    }
    let mut ring: IoUring<squeue::Entry128> = match builder.build(2 * RING_DEPTH as u32) {
        Ok(r) => r,
        Err(e) => {
            let _ = ready_tx.send(Err(format!("io_uring_setup (SQE128): {e}")));
            return Err(e).context("io_uring_setup");
        }
    };
    // Never dropped while the kernel may still write into them: freed at the end only once
    // every entry has come back, otherwise leaked (bounded: RING_DEPTH x ~128 KiB a queue).
    let mut ents: std::mem::ManuallyDrop<Vec<RingEnt>> = std::mem::ManuallyDrop::new(
        (0..RING_DEPTH)
            .map(|_| {
                let mut hdr = Box::new([0u8; abi::URING_HEADER_LEN]);
                let mut payload = vec![0u8; PAYLOAD_BUF].into_boxed_slice();
                let iov = Box::new([
                    libc::iovec {
                        iov_base: hdr.as_mut_ptr().cast(),
                        iov_len: abi::URING_HEADER_LEN,
                    },
                    libc::iovec {
                        iov_base: payload.as_mut_ptr().cast(),
                        iov_len: PAYLOAD_BUF,
                    },
                ]);
                RingEnt { hdr, payload, iov }
            })
            .collect(),
    );
    let fd = types::Fd(dev.as_raw_fd());
    for (i, ent) in ents.iter().enumerate() {
        let sqe = opcode::UringCmd80::new(fd, abi::FUSE_IO_URING_CMD_REGISTER)
            .cmd(abi::uring_cmd_req(0, qid))
            .addr(Some(ent.iov.as_ptr() as u64))
            .build()
            .user_data(i as u64);
        let sqe = with_sqe_len(sqe, 2);
        // SAFETY: the buffers the SQE points at live in `ents` until the ring is dropped.
        if unsafe { ring.submission().push(&sqe) }.is_err() {
            let _ = ready_tx.send(Err("submission queue full".into()));
            bail!("submission queue full");
        }
    }
    if let Err(e) = ring.submit() {
        let _ = ready_tx.send(Err(format!("io_uring_enter (REGISTER): {e}")));
        return Err(e).context("io_uring_enter");
    }
    // A refused REGISTER completes at once with -errno; an accepted one only when a request
    // arrives. Give the kernel a moment to post refusals before calling the queue ready.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut done: Vec<(usize, i32)> = ring
        .completion()
        .map(|c| (c.user_data() as usize, c.result()))
        .collect();
    if let Some(&(_, res)) = done.iter().find(|d| d.1 < 0) {
        let err = io::Error::from_raw_os_error(-res);
        let _ = ready_tx.send(Err(format!(
            "FUSE_IO_URING_CMD_REGISTER (qid {qid}): {err}"
        )));
        bail!("REGISTER qid {qid}: {err}");
    }
    let _ = ready_tx.send(Ok(()));
    let mut reply = vec![0u8; REPLY_BUF];
    // Entries the kernel holds (registered or committed, not yet completed back to us).
    let mut live = RING_DEPTH;
    let result = 'serve: loop {
        let batch = std::mem::take(&mut done);
        for (k, &(i, res)) in batch.iter().enumerate() {
            if res < 0 {
                live -= 1 + batch[k + 1..].iter().filter(|d| d.1 < 0).count();
                // At teardown (unmount aborts the connection) the kernel completes every
                // entry it holds with one of these; anything else is a refused commit.
                break 'serve match -res {
                    libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV => Ok(()),
                    e => Err(io::Error::from_raw_os_error(e))
                        .with_context(|| format!("COMMIT_AND_FETCH on queue {qid}")),
                };
            }
            if let Err(e) = serve_one(fs, &mut ring, fd, &mut ents, qid, i, &mut reply) {
                break 'serve Err(e);
            }
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => break 'serve Err(e).context("io_uring_enter"),
        }
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
    };
    // The kernel may write into an entry's buffers until it completes the entry: wait (up to
    // 1 s) for the other entries' completions, and free the buffers only if all came back.
    let ts = types::Timespec::new().nsec(100_000_000);
    for _ in 0..10 {
        if live == 0 || result.is_err() {
            break;
        }
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.submitter().submit_with_args(1, &args);
        live -= ring
            .completion()
            .filter(|c| c.result() < 0)
            .count()
            .min(live);
    }
    if live == 0 {
        // SAFETY: the kernel holds none of the entries any more; `ents` is not used after.
        unsafe { std::mem::ManuallyDrop::drop(&mut ents) };
    } else {
        fs.queues_leaked.fetch_add(1, Ordering::Relaxed);
    }
    result
}

/// Answers the request in entry `i` and queues its COMMIT_AND_FETCH.
fn serve_one(
    fs: &Fs,
    ring: &mut io_uring::IoUring<io_uring::squeue::Entry128>,
    fd: io_uring::types::Fd,
    ents: &mut [RingEnt],
    qid: u16,
    i: usize,
    reply: &mut [u8],
) -> Result<()> {
    use io_uring::opcode;
    let Some(ent) = ents.get_mut(i) else {
        bail!("completion for unknown entry {i}");
    };
    let ring_io = abi::ring_ent_in_out(&ent.hdr[..]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let h =
        InHeader::parse(&ent.hdr[..abi::URING_IN_OUT_LEN]).map_err(|e| anyhow::anyhow!("{e}"))?;
    fs.counts.via_ring.fetch_add(1, Ordering::Relaxed);
    let op_len = abi::op_in_len(h.opcode);
    let payload_len = (ring_io.payload_sz as usize).min(ent.payload.len());
    let (err, body_len) = {
        let op_in = &ent.hdr[abi::URING_IN_OUT_LEN..abi::URING_IN_OUT_LEN + op_len];
        match abi::parse(&h, op_in, &ent.payload[..payload_len]) {
            Ok(r) => {
                let mut out = Out::new(reply);
                match fs.handle(&h, &r, &mut out) {
                    Some(0) => (0, out.len()),
                    Some(e) => (e, 0),
                    // Nothing the ring carries goes unanswered; answer anyway.
                    None => (0, 0),
                }
            }
            Err(pe) => {
                eprintln!("fuse-transport: refused a ring request: {pe}");
                (-libc::EIO, 0)
            }
        }
    };
    let body_len = body_len.min(ent.payload.len());
    ent.payload[..body_len].copy_from_slice(&reply[..body_len]);
    ent.hdr[..abi::OUT_HEADER_LEN].copy_from_slice(&abi::out_header(h.unique, err, body_len));
    let off = abi::URING_ENT_IN_OUT_OFF + 16;
    ent.hdr[off..off + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    let sqe = opcode::UringCmd80::new(fd, abi::FUSE_IO_URING_CMD_COMMIT_AND_FETCH)
        .cmd(abi::uring_cmd_req(ring_io.commit_id, qid))
        .build()
        .user_data(i as u64);
    // SAFETY: the entry's buffers live as long as the ring (see RingEnt).
    while unsafe { ring.submission().push(&sqe) }.is_err() {
        ring.submit().context("io_uring_enter")?;
    }
    Ok(())
}

impl Server {
    /// Starts serving `dev` (already mounted). Returns once INIT is answered and, for
    /// io_uring, every queue has registered its entries.
    pub fn start(dev: File, transport: Transport, files: usize, threads: usize) -> Result<Server> {
        let fs = Arc::new(Fs::new(transport, files));
        let dev = Arc::new(dev);
        let mut devs = vec![dev.clone()];
        let mut handles = Vec::new();
        let (init_tx, init_rx) = mpsc::channel();
        let dev_threads = match transport {
            Transport::Classic => threads.max(1),
            Transport::Uring(_) => 1,
        };
        for t in 0..dev_threads {
            let d = if t == 0 {
                dev.clone()
            } else {
                Arc::new(clone_dev(&dev)?)
            };
            devs.push(d.clone());
            let fs = fs.clone();
            let tx = (t == 0).then(|| init_tx.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("ft-dev{t}"))
                    .spawn(move || dev_loop(&fs, &d, tx))
                    .context("spawn")?,
            );
        }
        drop(init_tx);
        let server = Server {
            fs: fs.clone(),
            threads: handles,
            _dev: devs,
        };
        // Classic threads 1.. on clones may read INIT too; wait on the flag.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fs.initialized.load(Ordering::Acquire) {
            let _ = init_rx.recv_timeout(std::time::Duration::from_millis(10));
            if std::time::Instant::now() > deadline {
                bail!("no FUSE_INIT within 10 s");
            }
        }
        let mut server = server;
        if let Transport::Uring(setup) = transport {
            if !fs.kernel_offered_uring.load(Ordering::Relaxed) {
                bail!("the kernel did not offer FUSE_OVER_IO_URING at INIT (enable_uring off?)");
            }
            let queues = possible_cpus()?;
            let (tx, rx) = mpsc::channel();
            for q in 0..queues {
                let fs = fs.clone();
                let d = dev.clone();
                let tx = tx.clone();
                let qid = u16::try_from(q).context("too many CPUs")?;
                server.threads.push(
                    std::thread::Builder::new()
                        .name(format!("ft-ring{q}"))
                        .spawn(move || ring_loop(&fs, &d, qid, setup, tx))
                        .context("spawn")?,
                );
            }
            drop(tx);
            for _ in 0..queues {
                match rx.recv_timeout(std::time::Duration::from_secs(10)) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => bail!("{e}"),
                    Err(_) => bail!("a ring queue did not report within 10 s"),
                }
            }
        }
        Ok(server)
    }

    /// Waits up to `within` for the threads (after the unmount aborted the connection);
    /// the first error, if any. Threads still running then are left behind (and reported).
    pub fn join(self, within: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + within;
        while self.threads.iter().any(|t| !t.is_finished()) {
            if std::time::Instant::now() > deadline {
                bail!("server threads still running {within:?} after the unmount");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut first = Ok(());
        for t in self.threads {
            let r = match t.join() {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("a server thread panicked")),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}
