//! The part of the kernel's FUSE ABI (`include/uapi/linux/fuse.h`, protocol 7.42 and its
//! io_uring structures) that the measurement server speaks: request parsing, every read
//! length-checked, and reply encoding into caller-provided buffers. Little-endian x86/ARM
//! layouts only (the ABI is native-endian; this crate runs on little-endian Linux).

/// `struct fuse_in_header`: len u32, opcode u32, unique u64, nodeid u64, uid u32, gid u32,
/// pid u32, total_extlen u16, padding u16.
pub const IN_HEADER_LEN: usize = 40;
/// `struct fuse_out_header`: len u32, error i32, unique u64.
pub const OUT_HEADER_LEN: usize = 16;
/// `struct fuse_attr` (7.9+): 88 bytes.
pub const ATTR_LEN: usize = 88;
/// `struct fuse_entry_out`: nodeid, generation, entry_valid, attr_valid (u64 each),
/// entry_valid_nsec, attr_valid_nsec (u32 each), then `fuse_attr`.
#[cfg(test)]
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
/// `struct fuse_attr_out`: attr_valid u64, attr_valid_nsec u32, dummy u32, `fuse_attr`.
#[cfg(test)]
pub const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
/// `struct fuse_open_out`: fh u64, open_flags u32, backing_id i32.
#[cfg(test)]
pub const OPEN_OUT_LEN: usize = 16;
/// `struct fuse_write_out`: size u32, padding u32.
#[cfg(test)]
pub const WRITE_OUT_LEN: usize = 8;
/// `struct fuse_kstatfs` (= `fuse_statfs_out`): 5 × u64, 4 × u32, spare 6 × u32.
#[cfg(test)]
pub const STATFS_OUT_LEN: usize = 80;
/// `struct fuse_init_out` (7.36+): 64 bytes.
pub const INIT_OUT_LEN: usize = 64;
/// `struct fuse_dirent` before its name: ino u64, off u64, namelen u32, type u32.
pub const DIRENT_LEN: usize = 24;

/// io_uring: `struct fuse_uring_req_header` = in_out[128] + op_in[128] +
/// `struct fuse_uring_ent_in_out` (flags u64, commit_id u64, payload_sz u32, padding u32,
/// reserved u64).
pub const URING_IN_OUT_LEN: usize = 128;
pub const URING_OP_IN_LEN: usize = 128;
pub const URING_ENT_IN_OUT_OFF: usize = URING_IN_OUT_LEN + URING_OP_IN_LEN;
pub const URING_HEADER_LEN: usize = URING_ENT_IN_OUT_OFF + 32;
/// `enum fuse_uring_cmd` values, in the SQE's `cmd_op`.
pub const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
pub const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

pub const FUSE_KERNEL_VERSION: u32 = 7;
/// 7.42 brought `FUSE_OVER_IO_URING`.
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 42;

// INIT flags (64 bits: `flags | flags2 << 32`).
pub const FUSE_ASYNC_READ: u64 = 1 << 0;
pub const FUSE_BIG_WRITES: u64 = 1 << 5;
pub const FUSE_PARALLEL_DIROPS: u64 = 1 << 18;
pub const FUSE_INIT_EXT: u64 = 1 << 30;
pub const FUSE_OVER_IO_URING: u64 = 1 << 41;

/// `FATTR_SIZE` in `fuse_setattr_in.valid`.
pub const FATTR_SIZE: u32 = 1 << 3;

pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    /// Opcodes below this are counted one by one (`Server::counts`).
    pub const COUNTED: usize = 64;

    pub fn name(op: u32) -> &'static str {
        match op {
            LOOKUP => "LOOKUP",
            FORGET => "FORGET",
            GETATTR => "GETATTR",
            SETATTR => "SETATTR",
            OPEN => "OPEN",
            READ => "READ",
            WRITE => "WRITE",
            STATFS => "STATFS",
            RELEASE => "RELEASE",
            GETXATTR => "GETXATTR",
            FLUSH => "FLUSH",
            INIT => "INIT",
            OPENDIR => "OPENDIR",
            READDIR => "READDIR",
            RELEASEDIR => "RELEASEDIR",
            CREATE => "CREATE",
            INTERRUPT => "INTERRUPT",
            DESTROY => "DESTROY",
            BATCH_FORGET => "BATCH_FORGET",
            _ => "other",
        }
    }
}

/// Why a request could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiError {
    /// Fewer bytes than the structure needs.
    Truncated { need: usize, have: usize },
    /// `fuse_in_header.len` disagrees with the bytes received.
    BadLength { header: u32, received: usize },
    /// A name without its terminating NUL, or empty.
    BadName,
}

impl std::fmt::Display for AbiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AbiError::Truncated { need, have } => write!(f, "truncated: {have} of {need} bytes"),
            AbiError::BadLength { header, received } => {
                write!(f, "header says {header} bytes, {received} received")
            }
            AbiError::BadName => write!(f, "name without NUL"),
        }
    }
}

fn need(b: &[u8], n: usize) -> Result<(), AbiError> {
    if b.len() < n {
        Err(AbiError::Truncated {
            need: n,
            have: b.len(),
        })
    } else {
        Ok(())
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub total_extlen: u16,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Result<InHeader, AbiError> {
        need(b, IN_HEADER_LEN)?;
        Ok(InHeader {
            len: u32_at(b, 0),
            opcode: u32_at(b, 4),
            unique: u64_at(b, 8),
            nodeid: u64_at(b, 16),
            uid: u32_at(b, 24),
            gid: u32_at(b, 28),
            pid: u32_at(b, 32),
            total_extlen: u16_at(b, 36),
        })
    }
}

/// Size of the opcode's fixed `in_args[0]` structure: on io_uring it arrives in `op_in`, the
/// rest (names, write data) in the payload; on `/dev/fuse` both follow the header.
/// 0 where the kernel sends no fixed structure (`fuse_set_zero_arg0` for name-only
/// requests, or no argument at all).
pub fn op_in_len(opcode: u32) -> usize {
    match opcode {
        op::FORGET => 8,
        op::GETATTR => 16,
        op::SETATTR => 88,
        op::OPEN | op::OPENDIR => 8,
        op::CREATE => 16,
        op::READ | op::READDIR | op::WRITE => 40,
        op::FLUSH | op::RELEASE | op::RELEASEDIR => 24,
        op::GETXATTR => 8,
        op::BATCH_FORGET => 8,
        op::INTERRUPT => 8,
        _ => 0,
    }
}

/// One parsed request; borrowed slices point into the receive buffers.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u64,
    },
    Lookup {
        name: &'a [u8],
    },
    Forget,
    BatchForget {
        count: u32,
    },
    Getattr,
    Setattr {
        valid: u32,
        size: u64,
    },
    Open {
        flags: u32,
    },
    Create {
        flags: u32,
        mode: u32,
        name: &'a [u8],
    },
    Write {
        fh: u64,
        offset: u64,
        data: &'a [u8],
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Flush,
    Release,
    Statfs,
    Opendir,
    Readdir {
        offset: u64,
        size: u32,
    },
    Releasedir,
    Getxattr,
    Interrupt,
    Destroy,
    Other(u32),
}

/// A NUL-terminated name at the start of `b` (the NUL and anything after it excluded).
fn name(b: &[u8]) -> Result<&[u8], AbiError> {
    match b.iter().position(|&c| c == 0) {
        Some(0) | None => Err(AbiError::BadName),
        Some(n) => Ok(&b[..n]),
    }
}

/// Parses a request from its fixed part (`op_in`, exactly `op_in_len(opcode)` bytes or more)
/// and its payload. Neither may be shorter than the opcode needs.
pub fn parse<'a>(
    h: &InHeader,
    op_in: &'a [u8],
    payload: &'a [u8],
) -> Result<Request<'a>, AbiError> {
    need(op_in, op_in_len(h.opcode))?;
    Ok(match h.opcode {
        op::INIT => {
            // fuse_init_in: major, minor, max_readahead, flags (16 bytes), then flags2 and
            // unused[11] when the kernel sets FUSE_INIT_EXT (64 bytes).
            let b = payload;
            need(b, 16)?;
            let mut flags = u64::from(u32_at(b, 12));
            if flags & FUSE_INIT_EXT != 0 {
                need(b, 20)?;
                flags |= u64::from(u32_at(b, 16)) << 32;
            }
            Request::Init {
                major: u32_at(b, 0),
                minor: u32_at(b, 4),
                max_readahead: u32_at(b, 8),
                flags,
            }
        }
        op::LOOKUP => Request::Lookup {
            name: name(payload)?,
        },
        op::FORGET => Request::Forget,
        op::BATCH_FORGET => {
            let count = u32_at(op_in, 0);
            // Each fuse_forget_one is nodeid u64 + nlookup u64.
            need(payload, (count as usize).saturating_mul(16))?;
            Request::BatchForget { count }
        }
        op::GETATTR => Request::Getattr,
        op::SETATTR => Request::Setattr {
            valid: u32_at(op_in, 0),
            size: u64_at(op_in, 16),
        },
        op::OPEN => Request::Open {
            flags: u32_at(op_in, 0),
        },
        op::CREATE => Request::Create {
            flags: u32_at(op_in, 0),
            mode: u32_at(op_in, 4),
            name: name(payload)?,
        },
        op::WRITE => {
            let size = u32_at(op_in, 16) as usize;
            need(payload, size)?;
            Request::Write {
                fh: u64_at(op_in, 0),
                offset: u64_at(op_in, 8),
                data: &payload[..size],
            }
        }
        op::READ => Request::Read {
            fh: u64_at(op_in, 0),
            offset: u64_at(op_in, 8),
            size: u32_at(op_in, 16),
        },
        op::FLUSH => Request::Flush,
        op::RELEASE => Request::Release,
        op::STATFS => Request::Statfs,
        op::OPENDIR => Request::Opendir,
        op::READDIR => Request::Readdir {
            offset: u64_at(op_in, 8),
            size: u32_at(op_in, 16),
        },
        op::RELEASEDIR => Request::Releasedir,
        op::GETXATTR => {
            name(payload)?;
            Request::Getxattr
        }
        op::INTERRUPT => Request::Interrupt,
        op::DESTROY => Request::Destroy,
        other => Request::Other(other),
    })
}

/// Parses a whole request read from `/dev/fuse` (`buf` = the bytes `read` returned).
pub fn parse_dev(buf: &[u8]) -> Result<(InHeader, Request<'_>), AbiError> {
    let h = InHeader::parse(buf)?;
    if h.len as usize != buf.len() {
        return Err(AbiError::BadLength {
            header: h.len,
            received: buf.len(),
        });
    }
    let body = &buf[IN_HEADER_LEN..];
    let fixed = if h.opcode == op::INIT {
        0
    } else {
        op_in_len(h.opcode)
    };
    need(body, fixed)?;
    let (op_in, payload) = body.split_at(fixed);
    let r = parse(&h, op_in, payload)?;
    Ok((h, r))
}

/// Attributes of one node, as the server keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    pub nlink: u32,
    pub mtime: u64,
}

/// A reply body under construction in a bounded buffer; writes past its end are refused
/// (`put` returns false) rather than grown.
pub struct Out<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Out<'a> {
    pub fn new(buf: &'a mut [u8]) -> Out<'a> {
        Out { buf, len: 0 }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn room(&self) -> usize {
        self.buf.len() - self.len
    }
    #[must_use]
    pub fn put(&mut self, b: &[u8]) -> bool {
        if b.len() > self.room() {
            return false;
        }
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
        true
    }
    #[must_use]
    pub fn zeros(&mut self, n: usize) -> bool {
        if n > self.room() {
            return false;
        }
        self.buf[self.len..self.len + n].fill(0);
        self.len += n;
        true
    }
    #[must_use]
    fn u32(&mut self, v: u32) -> bool {
        self.put(&v.to_le_bytes())
    }
    #[must_use]
    fn u64(&mut self, v: u64) -> bool {
        self.put(&v.to_le_bytes())
    }
}

fn attr_bytes(a: &Attr) -> [u8; ATTR_LEN] {
    let mut b = [0u8; ATTR_LEN];
    b[0..8].copy_from_slice(&a.ino.to_le_bytes());
    b[8..16].copy_from_slice(&a.size.to_le_bytes());
    b[16..24].copy_from_slice(&a.size.div_ceil(512).to_le_bytes()); // blocks
    b[24..32].copy_from_slice(&a.mtime.to_le_bytes()); // atime
    b[32..40].copy_from_slice(&a.mtime.to_le_bytes()); // mtime
    b[40..48].copy_from_slice(&a.mtime.to_le_bytes()); // ctime
                                                       // atimensec, mtimensec, ctimensec at 48..60 stay 0.
    b[60..64].copy_from_slice(&a.mode.to_le_bytes());
    b[64..68].copy_from_slice(&a.nlink.to_le_bytes());
    // uid, gid, rdev at 68..80 stay 0 (root).
    b[80..84].copy_from_slice(&4096u32.to_le_bytes()); // blksize
    b
}

/// `fuse_entry_out` with entry and attribute timeouts of `valid_secs`.
#[must_use]
pub fn entry_out(o: &mut Out<'_>, a: &Attr, valid_secs: u64) -> bool {
    o.u64(a.ino)
        && o.u64(0)
        && o.u64(valid_secs)
        && o.u64(valid_secs)
        && o.u32(0)
        && o.u32(0)
        && o.put(&attr_bytes(a))
}

#[must_use]
pub fn attr_out(o: &mut Out<'_>, a: &Attr, valid_secs: u64) -> bool {
    o.u64(valid_secs) && o.u32(0) && o.u32(0) && o.put(&attr_bytes(a))
}

#[must_use]
pub fn open_out(o: &mut Out<'_>, fh: u64) -> bool {
    o.u64(fh) && o.u32(0) && o.u32(0)
}

#[must_use]
pub fn write_out(o: &mut Out<'_>, size: u32) -> bool {
    o.u32(size) && o.u32(0)
}

#[must_use]
pub fn statfs_out(o: &mut Out<'_>, files: u64) -> bool {
    o.u64(1 << 20) // blocks
        && o.u64(1 << 19) // bfree
        && o.u64(1 << 19) // bavail
        && o.u64(files)
        && o.u64(1 << 20) // ffree
        && o.u32(4096) // bsize
        && o.u32(255) // namelen
        && o.u32(4096) // frsize
        && o.zeros(4 + 24)
}

/// `fuse_init_out`.
#[must_use]
pub fn init_out(o: &mut Out<'_>, minor: u32, flags: u64, max_write: u32, max_pages: u16) -> bool {
    o.u32(FUSE_KERNEL_VERSION)
        && o.u32(minor)
        && o.u32(128 << 10) // max_readahead
        && o.u32(flags as u32)
        && o.put(&16u16.to_le_bytes()) // max_background
        && o.put(&12u16.to_le_bytes()) // congestion_threshold
        && o.u32(max_write)
        && o.u32(1) // time_gran
        && o.put(&max_pages.to_le_bytes())
        && o.put(&0u16.to_le_bytes()) // map_alignment
        && o.u32((flags >> 32) as u32)
        && o.zeros(INIT_OUT_LEN - 36) // max_stack_depth, request_timeout, unused
}

/// One `fuse_dirent` (padded to 8 bytes); false if it does not fit.
#[must_use]
pub fn dirent(o: &mut Out<'_>, ino: u64, next_off: u64, dtype: u32, name: &[u8]) -> bool {
    let padded = (DIRENT_LEN + name.len()).next_multiple_of(8);
    if padded > o.room() {
        return false;
    }
    o.u64(ino)
        && o.u64(next_off)
        && o.u32(name.len() as u32)
        && o.u32(dtype)
        && o.put(name)
        && o.zeros(padded - DIRENT_LEN - name.len())
}

/// `fuse_out_header` for a reply with `body_len` bytes after it (`error` is -errno or 0).
pub fn out_header(unique: u64, error: i32, body_len: usize) -> [u8; OUT_HEADER_LEN] {
    let mut b = [0u8; OUT_HEADER_LEN];
    b[0..4].copy_from_slice(&((OUT_HEADER_LEN + body_len) as u32).to_le_bytes());
    b[4..8].copy_from_slice(&error.to_le_bytes());
    b[8..16].copy_from_slice(&unique.to_le_bytes());
    b
}

/// The io_uring entry's `fuse_uring_ent_in_out`, from the header buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingEntInOut {
    pub commit_id: u64,
    pub payload_sz: u32,
}

pub fn ring_ent_in_out(hdr: &[u8]) -> Result<RingEntInOut, AbiError> {
    need(hdr, URING_HEADER_LEN)?;
    Ok(RingEntInOut {
        commit_id: u64_at(hdr, URING_ENT_IN_OUT_OFF + 8),
        payload_sz: u32_at(hdr, URING_ENT_IN_OUT_OFF + 16),
    })
}

/// `struct fuse_uring_cmd_req` in the first 24 bytes of the SQE's 80-byte command area.
pub fn uring_cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_le_bytes());
    c[16..18].copy_from_slice(&qid.to_le_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: usize, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
        let mut b = vec![0u8; IN_HEADER_LEN];
        b[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        b[4..8].copy_from_slice(&opcode.to_le_bytes());
        b[8..16].copy_from_slice(&unique.to_le_bytes());
        b[16..24].copy_from_slice(&nodeid.to_le_bytes());
        b
    }

    fn request(opcode: u32, fixed: &[u8], payload: &[u8]) -> Vec<u8> {
        let len = IN_HEADER_LEN + fixed.len() + payload.len();
        let mut b = header(len, opcode, 7, 1);
        b.extend_from_slice(fixed);
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn structure_sizes_are_the_kernels() {
        assert_eq!(ENTRY_OUT_LEN, 128);
        assert_eq!(ATTR_OUT_LEN, 104);
        assert_eq!(URING_HEADER_LEN, 288);
        assert_eq!(op_in_len(op::WRITE), 40);
        assert_eq!(op_in_len(op::SETATTR), 88);
        assert_eq!(op_in_len(op::LOOKUP), 0);
    }

    #[test]
    fn lookup_parses_its_name_and_refuses_one_without_nul() {
        let b = request(op::LOOKUP, &[], b"f1\0");
        let (h, r) = parse_dev(&b).expect("parse");
        assert_eq!(h.unique, 7);
        assert_eq!(h.nodeid, 1);
        assert_eq!(r, Request::Lookup { name: b"f1" });
        let b = request(op::LOOKUP, &[], b"f1");
        assert_eq!(parse_dev(&b), Err(AbiError::BadName));
        let b = request(op::LOOKUP, &[], b"\0");
        assert_eq!(parse_dev(&b), Err(AbiError::BadName));
    }

    #[test]
    fn write_takes_exactly_its_size_and_refuses_short_data() {
        let mut fixed = [0u8; 40];
        fixed[0..8].copy_from_slice(&3u64.to_le_bytes());
        fixed[8..16].copy_from_slice(&4096u64.to_le_bytes());
        fixed[16..20].copy_from_slice(&5u32.to_le_bytes());
        let b = request(op::WRITE, &fixed, b"hello");
        let (_, r) = parse_dev(&b).expect("parse");
        assert_eq!(
            r,
            Request::Write {
                fh: 3,
                offset: 4096,
                data: b"hello"
            }
        );
        let b = request(op::WRITE, &fixed, b"hell");
        assert_eq!(parse_dev(&b), Err(AbiError::Truncated { need: 5, have: 4 }));
    }

    #[test]
    fn truncated_input_is_refused_at_every_length() {
        let mut fixed = [0u8; 16];
        fixed[4..8].copy_from_slice(&0o100644u32.to_le_bytes());
        let full = request(op::CREATE, &fixed, b"new\0");
        assert!(parse_dev(&full).is_ok());
        for n in 0..full.len() {
            // The header's len still says the full length: refused as a length mismatch,
            // or (below the header) as truncated.
            assert!(parse_dev(&full[..n]).is_err(), "accepted {n} bytes");
            // Header len adjusted to the cut: refused as truncated or a bad name.
            if n >= IN_HEADER_LEN {
                let mut cut = full[..n].to_vec();
                cut[0..4].copy_from_slice(&(n as u32).to_le_bytes());
                assert!(parse_dev(&cut).is_err(), "accepted a cut of {n} bytes");
            }
        }
    }

    #[test]
    fn header_length_must_match_what_was_read() {
        let mut b = request(op::GETATTR, &[0u8; 16], &[]);
        b[0..4].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(
            parse_dev(&b),
            Err(AbiError::BadLength {
                header: 100,
                received: 56
            })
        );
    }

    #[test]
    fn batch_forget_needs_all_its_entries() {
        let mut fixed = [0u8; 8];
        fixed[0..4].copy_from_slice(&2u32.to_le_bytes());
        let b = request(op::BATCH_FORGET, &fixed, &[0u8; 32]);
        assert_eq!(
            parse_dev(&b).map(|r| r.1),
            Ok(Request::BatchForget { count: 2 })
        );
        let b = request(op::BATCH_FORGET, &fixed, &[0u8; 31]);
        assert!(parse_dev(&b).is_err());
    }

    #[test]
    fn init_reads_flags2_only_with_init_ext() {
        let mut p = [0u8; 64];
        p[0..4].copy_from_slice(&7u32.to_le_bytes());
        p[4..8].copy_from_slice(&45u32.to_le_bytes());
        p[12..16].copy_from_slice(&(FUSE_INIT_EXT as u32).to_le_bytes());
        p[16..20].copy_from_slice(&((FUSE_OVER_IO_URING >> 32) as u32).to_le_bytes());
        let b = request(op::INIT, &[], &p);
        match parse_dev(&b) {
            Ok((_, Request::Init { minor, flags, .. })) => {
                assert_eq!(minor, 45);
                assert_eq!(flags, FUSE_INIT_EXT | FUSE_OVER_IO_URING);
            }
            other => panic!("{other:?}"),
        }
        // An old kernel's 16-byte fuse_init_in without FUSE_INIT_EXT.
        let b = request(op::INIT, &[], &p[..12]);
        assert!(parse_dev(&b).is_err());
    }

    #[test]
    fn reply_encoders_write_the_kernels_lengths_and_refuse_to_overflow() {
        let a = Attr {
            ino: 5,
            size: 4096,
            mode: 0o100644,
            nlink: 1,
            mtime: 0,
        };
        let mut buf = [0u8; 256];
        let mut o = Out::new(&mut buf);
        assert!(entry_out(&mut o, &a, 0));
        assert_eq!(o.len(), ENTRY_OUT_LEN);
        assert!(open_out(&mut o, 9));
        assert_eq!(o.len(), ENTRY_OUT_LEN + OPEN_OUT_LEN);
        let mut o = Out::new(&mut buf);
        assert!(attr_out(&mut o, &a, 0));
        assert_eq!(o.len(), ATTR_OUT_LEN);
        let mut o = Out::new(&mut buf);
        assert!(init_out(&mut o, 42, FUSE_OVER_IO_URING, 1 << 17, 32));
        assert_eq!(o.len(), INIT_OUT_LEN);
        // flags2 holds the upper half at offset 32.
        assert_eq!(u32_at(&buf, 32), (FUSE_OVER_IO_URING >> 32) as u32);
        let mut o = Out::new(&mut buf);
        assert!(write_out(&mut o, 4096));
        assert_eq!(o.len(), WRITE_OUT_LEN);
        assert_eq!(u32_at(&buf, 0), 4096);
        let mut o = Out::new(&mut buf);
        assert!(statfs_out(&mut o, 1));
        assert_eq!(o.len(), STATFS_OUT_LEN);
        let mut small = [0u8; 100];
        let mut o = Out::new(&mut small);
        assert!(!entry_out(&mut o, &a, 0), "128 bytes fit in 100");
        let mut o = Out::new(&mut small);
        assert!(dirent(&mut o, 2, 1, 8, b"abc"));
        assert_eq!(o.len(), 32);
        assert!(dirent(&mut o, 3, 2, 8, b"0123456789"));
        assert_eq!(o.len(), 32 + 40);
        assert!(!dirent(&mut o, 4, 3, 8, b"x"), "needs 32, 28 left");
        assert_eq!(o.len(), 72, "a refused entry writes nothing");
        let h = out_header(11, -2, 104);
        assert_eq!(u32_at(&h, 0), 120);
        assert_eq!(u32_at(&h, 4) as i32, -2);
        assert_eq!(u64_at(&h, 8), 11);
    }

    #[test]
    fn ring_header_fields_are_read_where_the_kernel_writes_them() {
        let mut hdr = [0u8; URING_HEADER_LEN];
        hdr[URING_ENT_IN_OUT_OFF + 8..URING_ENT_IN_OUT_OFF + 16]
            .copy_from_slice(&99u64.to_le_bytes());
        hdr[URING_ENT_IN_OUT_OFF + 16..URING_ENT_IN_OUT_OFF + 20]
            .copy_from_slice(&4096u32.to_le_bytes());
        assert_eq!(
            ring_ent_in_out(&hdr),
            Ok(RingEntInOut {
                commit_id: 99,
                payload_sz: 4096
            })
        );
        assert!(ring_ent_in_out(&hdr[..287]).is_err());
        let c = uring_cmd_req(99, 1);
        assert_eq!(u64_at(&c, 8), 99);
        assert_eq!(u16_at(&c, 16), 1);
    }
}
