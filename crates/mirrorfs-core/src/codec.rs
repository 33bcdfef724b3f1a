//! Binary encoding of op bodies, shared by the journal and (later) the wire protocol.
//!
//! Layout: fields in declaration order, little-endian integers, paths as `u16` length + bytes,
//! byte strings as `u32` length + bytes, `Option<T>` as a `u8` (0 or 1) followed by `T` when 1.
//! `Write` keeps its data last so a producer can hand the data slice to `writev` without copying.
//! Decoding validates every length against its bound and every path with [`RelPath::new`].

use crate::op::{kind, Op, Timespec, WRITE_BYTES_MAX, XATTR_NAME_BYTES_MAX, XATTR_VALUE_BYTES_MAX};
use crate::path::{PathError, RelPath, PATH_BYTES_MAX, TARGET_BYTES_MAX};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("record body ends early")]
    Truncated,
    #[error("record body has {0} trailing bytes")]
    Trailing(usize),
    #[error("unknown op kind {0}")]
    UnknownKind(u8),
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("invalid path: {0}")]
    Path(#[from] PathError),
    #[error("invalid value: {0}")]
    Invalid(&'static str),
}

/// Appends the body of `op` to `out`. For `Write`, the data bytes are NOT appended: the caller
/// appends `data` right after (see [`body_tail`]); [`encoded_body_len`] counts them.
pub fn encode_body_head(op: &Op, out: &mut Vec<u8>) {
    match op {
        Op::Create {
            path,
            mode,
            uid,
            gid,
        }
        | Op::Mkdir {
            path,
            mode,
            uid,
            gid,
        } => {
            put_path(out, path);
            put_u32(out, *mode);
            put_u32(out, *uid);
            put_u32(out, *gid);
        }
        Op::Mknod {
            path,
            mode,
            rdev,
            uid,
            gid,
        } => {
            put_path(out, path);
            put_u32(out, *mode);
            put_u64(out, *rdev);
            put_u32(out, *uid);
            put_u32(out, *gid);
        }
        Op::Symlink {
            path,
            target,
            uid,
            gid,
        } => {
            put_path(out, path);
            put_bytes(out, target);
            put_u32(out, *uid);
            put_u32(out, *gid);
        }
        Op::Link { from, to } => {
            put_path(out, from);
            put_path(out, to);
        }
        Op::Unlink { path, nlink } => {
            put_path(out, path);
            put_u32(out, *nlink);
        }
        Op::Rmdir { path } => put_path(out, path),
        Op::Rename {
            from,
            to,
            flags,
            from_ino,
        } => {
            put_path(out, from);
            put_path(out, to);
            put_u32(out, *flags);
            put_u64(out, *from_ino);
        }
        Op::Write { path, offset, data } => {
            put_path(out, path);
            put_u64(out, *offset);
            put_u32(out, data.len() as u32);
        }
        Op::Truncate { path, size } => {
            put_path(out, path);
            put_u64(out, *size);
        }
        Op::Fallocate {
            path,
            mode,
            offset,
            len,
        } => {
            put_path(out, path);
            put_u32(out, *mode as u32);
            put_u64(out, *offset);
            put_u64(out, *len);
        }
        Op::SetMode { path, mode } => {
            put_path(out, path);
            put_u32(out, *mode);
        }
        Op::SetOwner { path, uid, gid } => {
            put_path(out, path);
            put_opt_u32(out, *uid);
            put_opt_u32(out, *gid);
        }
        Op::SetTimes { path, atime, mtime } => {
            put_path(out, path);
            put_opt_time(out, *atime);
            put_opt_time(out, *mtime);
        }
        Op::SetXattr {
            path,
            name,
            value,
            flags,
        } => {
            put_path(out, path);
            put_bytes(out, name);
            put_bytes(out, value);
            put_u32(out, *flags as u32);
        }
        Op::RemoveXattr { path, name } => {
            put_path(out, path);
            put_bytes(out, name);
        }
        Op::Abort { seq } => put_u64(out, *seq),
        Op::Sync { mirror, op } => {
            put_u32(out, *mirror);
            out.push(op.kind());
            encode_body_head(op, out);
        }
        Op::SyncDone { mirror } => put_u32(out, *mirror),
        Op::GroupBegin | Op::GroupEnd => {}
    }
}

/// The bytes that follow the head: a `Write`'s data, empty for every other op.
pub fn body_tail(op: &Op) -> &[u8] {
    match op {
        Op::Write { data, .. } => data,
        Op::Sync { op, .. } => body_tail(op),
        _ => &[],
    }
}

/// Encodes the whole body into a fresh vector (head and tail).
pub fn encode_body(op: &Op) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + op.data_len());
    encode_body_head(op, &mut out);
    out.extend_from_slice(body_tail(op));
    out
}

/// Decodes an op body of the given kind. Every length and path is validated.
pub fn decode_body(kind_tag: u8, body: &[u8]) -> Result<Op, DecodeError> {
    let mut r = Reader { buf: body, pos: 0 };
    let op = match kind_tag {
        kind::CREATE => Op::Create {
            path: r.path()?,
            mode: r.u32()?,
            uid: r.u32()?,
            gid: r.u32()?,
        },
        kind::MKDIR => Op::Mkdir {
            path: r.path()?,
            mode: r.u32()?,
            uid: r.u32()?,
            gid: r.u32()?,
        },
        kind::MKNOD => Op::Mknod {
            path: r.path()?,
            mode: r.u32()?,
            rdev: r.u64()?,
            uid: r.u32()?,
            gid: r.u32()?,
        },
        kind::SYMLINK => Op::Symlink {
            path: r.path()?,
            target: r.bytes("symlink target", TARGET_BYTES_MAX)?,
            uid: r.u32()?,
            gid: r.u32()?,
        },
        kind::LINK => Op::Link {
            from: r.path()?,
            to: r.path()?,
        },
        kind::UNLINK => Op::Unlink {
            path: r.path()?,
            nlink: r.u32()?,
        },
        kind::RMDIR => Op::Rmdir { path: r.path()? },
        kind::RENAME => Op::Rename {
            from: r.path()?,
            to: r.path()?,
            flags: r.u32()?,
            from_ino: r.u64()?,
        },
        kind::WRITE => {
            let path = r.path()?;
            let offset = r.u64()?;
            let data = r.bytes("write data", WRITE_BYTES_MAX)?;
            offset
                .checked_add(data.len() as u64)
                .filter(|end| *end <= i64::MAX as u64)
                .ok_or(DecodeError::Invalid(
                    "write extends past the largest file offset",
                ))?;
            Op::Write { path, offset, data }
        }
        kind::TRUNCATE => Op::Truncate {
            path: r.path()?,
            size: r.u64()?,
        },
        kind::FALLOCATE => Op::Fallocate {
            path: r.path()?,
            mode: r.u32()? as i32,
            offset: r.u64()?,
            len: r.u64()?,
        },
        kind::SET_MODE => Op::SetMode {
            path: r.path()?,
            mode: r.u32()?,
        },
        kind::SET_OWNER => Op::SetOwner {
            path: r.path()?,
            uid: r.opt_u32()?,
            gid: r.opt_u32()?,
        },
        kind::SET_TIMES => Op::SetTimes {
            path: r.path()?,
            atime: r.opt_time()?,
            mtime: r.opt_time()?,
        },
        kind::SET_XATTR => Op::SetXattr {
            path: r.path()?,
            name: r.bytes("xattr name", XATTR_NAME_BYTES_MAX)?,
            value: r.bytes("xattr value", XATTR_VALUE_BYTES_MAX)?,
            flags: r.u32()? as i32,
        },
        kind::REMOVE_XATTR => Op::RemoveXattr {
            path: r.path()?,
            name: r.bytes("xattr name", XATTR_NAME_BYTES_MAX)?,
        },
        kind::ABORT => Op::Abort { seq: r.u64()? },
        kind::SYNC => {
            let mirror = r.u32()?;
            let inner = r.u8()?;
            if matches!(
                inner,
                kind::SYNC | kind::SYNC_DONE | kind::GROUP_BEGIN | kind::GROUP_END
            ) {
                return Err(DecodeError::Invalid("nested sync record"));
            }
            let op = decode_body(inner, &body[r.pos..])?;
            r.pos = body.len();
            Op::Sync {
                mirror,
                op: Box::new(op),
            }
        }
        kind::SYNC_DONE => Op::SyncDone { mirror: r.u32()? },
        kind::GROUP_BEGIN => Op::GroupBegin,
        kind::GROUP_END => Op::GroupEnd,
        other => return Err(DecodeError::UnknownKind(other)),
    };
    if r.pos != body.len() {
        return Err(DecodeError::Trailing(body.len() - r.pos));
    }
    if let Op::SetXattr { name, .. } | Op::RemoveXattr { name, .. } = &op {
        if name.is_empty() || name.contains(&0) {
            return Err(DecodeError::Invalid("xattr name is empty or contains NUL"));
        }
    }
    if let Op::Symlink { target, .. } = &op {
        if target.is_empty() || target.contains(&0) {
            return Err(DecodeError::Invalid(
                "symlink target is empty or contains NUL",
            ));
        }
    }
    Ok(op)
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_path(out: &mut Vec<u8>, p: &RelPath) {
    out.extend_from_slice(&(p.as_bytes().len() as u16).to_le_bytes());
    out.extend_from_slice(p.as_bytes());
}
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}
fn put_opt_u32(out: &mut Vec<u8>, v: Option<u32>) {
    match v {
        Some(v) => {
            out.push(1);
            put_u32(out, v);
        }
        None => out.push(0),
    }
}
fn put_opt_time(out: &mut Vec<u8>, v: Option<Timespec>) {
    match v {
        Some(t) => {
            out.push(1);
            put_u64(out, t.sec as u64);
            put_u32(out, t.nsec);
        }
        None => out.push(0),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn path(&mut self) -> Result<RelPath, DecodeError> {
        let len = self.u16()? as usize;
        if len > PATH_BYTES_MAX {
            return Err(DecodeError::TooLarge {
                what: "path",
                len,
                max: PATH_BYTES_MAX,
            });
        }
        Ok(RelPath::new(self.take(len)?.to_vec())?)
    }
    fn bytes(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, DecodeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(DecodeError::TooLarge { what, len, max });
        }
        Ok(self.take(len)?.to_vec())
    }
    fn opt_u32(&mut self) -> Result<Option<u32>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u32()?)),
            _ => Err(DecodeError::Invalid("option flag is not 0 or 1")),
        }
    }
    fn opt_time(&mut self) -> Result<Option<Timespec>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => {
                let sec = self.u64()? as i64;
                let nsec = self.u32()?;
                if nsec >= 1_000_000_000 {
                    return Err(DecodeError::Invalid("nanoseconds out of range"));
                }
                Ok(Some(Timespec { sec, nsec }))
            }
            _ => Err(DecodeError::Invalid("option flag is not 0 or 1")),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn arb_path() -> impl Strategy<Value = RelPath> {
        prop::collection::vec(
            prop::collection::vec(
                any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0),
                1..8,
            )
            .prop_filter("not . or ..", |c| c != b"." && c != b".."),
            0..4,
        )
        .prop_map(|comps| {
            let mut p = RelPath::root();
            for c in comps {
                p = p.join(&c).expect("valid component");
            }
            p
        })
    }

    fn arb_time() -> impl Strategy<Value = Option<Timespec>> {
        prop::option::of(
            (any::<i64>(), 0u32..1_000_000_000).prop_map(|(sec, nsec)| Timespec { sec, nsec }),
        )
    }

    pub fn arb_op() -> impl Strategy<Value = Op> {
        let bytes = || prop::collection::vec(1u8..=255, 1..32);
        prop_oneof![
            (arb_path(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
                |(path, mode, uid, gid)| Op::Create {
                    path,
                    mode,
                    uid,
                    gid
                }
            ),
            (arb_path(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
                |(path, mode, uid, gid)| Op::Mkdir {
                    path,
                    mode,
                    uid,
                    gid
                }
            ),
            (
                arb_path(),
                any::<u32>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(path, mode, rdev, uid, gid)| Op::Mknod {
                    path,
                    mode,
                    rdev,
                    uid,
                    gid
                }),
            (arb_path(), bytes(), any::<u32>(), any::<u32>()).prop_map(
                |(path, target, uid, gid)| Op::Symlink {
                    path,
                    target,
                    uid,
                    gid
                }
            ),
            (arb_path(), arb_path()).prop_map(|(from, to)| Op::Link { from, to }),
            (arb_path(), any::<u32>()).prop_map(|(path, nlink)| Op::Unlink { path, nlink }),
            arb_path().prop_map(|path| Op::Rmdir { path }),
            (arb_path(), arb_path(), any::<u32>(), any::<u64>()).prop_map(
                |(from, to, flags, from_ino)| Op::Rename {
                    from,
                    to,
                    flags,
                    from_ino
                }
            ),
            (
                arb_path(),
                0u64..(1 << 40),
                prop::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(path, offset, data)| Op::Write { path, offset, data }),
            (arb_path(), any::<u64>()).prop_map(|(path, size)| Op::Truncate { path, size }),
            (arb_path(), any::<i32>(), any::<u64>(), any::<u64>()).prop_map(
                |(path, mode, offset, len)| Op::Fallocate {
                    path,
                    mode,
                    offset,
                    len
                }
            ),
            (arb_path(), any::<u32>()).prop_map(|(path, mode)| Op::SetMode { path, mode }),
            (arb_path(), any::<Option<u32>>(), any::<Option<u32>>())
                .prop_map(|(path, uid, gid)| Op::SetOwner { path, uid, gid }),
            (arb_path(), arb_time(), arb_time()).prop_map(|(path, atime, mtime)| Op::SetTimes {
                path,
                atime,
                mtime
            }),
            (
                arb_path(),
                bytes(),
                prop::collection::vec(any::<u8>(), 0..40),
                any::<i32>()
            )
                .prop_map(|(path, name, value, flags)| Op::SetXattr {
                    path,
                    name,
                    value,
                    flags
                }),
            (arb_path(), bytes()).prop_map(|(path, name)| Op::RemoveXattr { path, name }),
            any::<u64>().prop_map(|seq| Op::Abort { seq }),
            any::<u32>().prop_map(|mirror| Op::SyncDone { mirror }),
            Just(Op::GroupBegin),
            Just(Op::GroupEnd),
        ]
    }

    pub fn arb_op_with_sync() -> impl Strategy<Value = Op> {
        prop_oneof![
            arb_op(),
            (
                any::<u32>(),
                arb_op().prop_filter("not nested", |o| !matches!(
                    o,
                    Op::SyncDone { .. } | Op::GroupBegin | Op::GroupEnd
                ))
            )
                .prop_map(|(mirror, op)| Op::Sync {
                    mirror,
                    op: Box::new(op)
                }),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip(op in arb_op_with_sync()) {
            let body = encode_body(&op);
            let back = decode_body(op.kind(), &body).expect("decodes");
            prop_assert_eq!(back, op);
        }

        #[test]
        fn garbage_never_panics(kind_tag in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_body(kind_tag, &body);
        }

        #[test]
        fn truncation_is_detected(op in arb_op(), cut in 1usize..8) {
            let body = encode_body(&op);
            if body.len() >= cut {
                prop_assert!(decode_body(op.kind(), &body[..body.len() - cut]).is_err());
            }
        }
    }

    #[test]
    fn rejects_escaping_paths() {
        let mut body = Vec::new();
        put_u32(&mut body, 0); // placeholder to build manually below
        body.clear();
        let evil = b"../etc/passwd";
        body.extend_from_slice(&(evil.len() as u16).to_le_bytes());
        body.extend_from_slice(evil);
        assert!(matches!(
            decode_body(kind::RMDIR, &body),
            Err(DecodeError::Path(_))
        ));
        let mut abs = Vec::new();
        abs.extend_from_slice(&4u16.to_le_bytes());
        abs.extend_from_slice(b"/etc");
        assert!(matches!(
            decode_body(kind::RMDIR, &abs),
            Err(DecodeError::Path(_))
        ));
    }

    #[test]
    fn rejects_oversize_write() {
        let mut body = Vec::new();
        put_path(&mut body, &RelPath::new("f").expect("valid"));
        put_u64(&mut body, 0);
        put_u32(&mut body, (WRITE_BYTES_MAX + 1) as u32);
        assert!(matches!(
            decode_body(kind::WRITE, &body),
            Err(DecodeError::TooLarge { .. })
        ));
    }
}
