//! A diverged copy handed to the primary that takes its changes in (`--on-diverged
//! reintegrate`, docs/protocol.md "Reintegration (failback)"): after `Diverged`, the session
//! (`core::session`, phase `Reintegrating`) says what the primary asks for, and this shell
//! answers from the journal (`Tail`: the records after the common point, without write data) and
//! the tree (`Entry`: the ops that recreate one entry under the primary's name for it). Nothing
//! of DIR, its journal or its meta file changes until the primary's `Reintegrated`; then the
//! changed files are saved to `STATE/diverged/…` and the copy is marked for a resync
//! (`discard_divergence`), and the session ends. A connection lost before that just ends it: the
//! next one starts the phase again.

use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use mirrorfs_core::journal::frame::encode_frame;
use mirrorfs_core::journal::Reader;
use mirrorfs_core::op::{Op, Record};
use mirrorfs_core::path::RelPath;
use mirrorfs_core::session::{Incoming, Session};
use mirrorfs_core::wire::{Decoder, Msg, BATCH_BYTES};

use crate::net::conn::Duplex;
use crate::site::volume::lock;
use crate::sys;
use crate::tree::dirtree::Root;

use super::Daemon;

/// Largest `Write` of a fetched file's data: a quarter of a batch, so an `Entry` stays within
/// `BATCH_BYTES` plus one op.
const FETCH_CHUNK_BYTES: usize = BATCH_BYTES / 4;

/// An `Entry` answer being built: ops are handed to `send` in messages of at most about
/// `BATCH_BYTES`.
struct EntryOut<'a> {
    send: &'a mut dyn FnMut(Msg) -> Result<()>,
    id: u32,
    ops: Vec<Op>,
    bytes: usize,
}

impl EntryOut<'_> {
    fn push(&mut self, op: Op) -> Result<()> {
        let f = encode_frame(1, &op, 0);
        let len = f.head.len() + f.tail.len() + f.padding;
        if !self.ops.is_empty() && self.bytes + len > BATCH_BYTES {
            self.flush(false)?;
        }
        self.bytes += len;
        self.ops.push(op);
        Ok(())
    }

    fn flush(&mut self, last: bool) -> Result<()> {
        let ops = std::mem::take(&mut self.ops);
        self.bytes = 0;
        (self.send)(Msg::Entry {
            id: self.id,
            last,
            ops,
        })
    }
}

impl Daemon {
    /// Serves the reintegration phase of `session` (it answered `hello` with `Diverged`) until
    /// the primary's `Reintegrated` (then the copy is saved, marked for a resync, and answers)
    /// or the connection ends.
    pub(super) fn reintegrate(
        &self,
        link: &Duplex,
        dec: &mut Decoder,
        mut session: Session,
        hello: &Msg,
    ) -> Result<()> {
        let c = session
            .divergence()
            .ok_or_else(|| anyhow!("internal: reintegrating without a divergence"))?;
        let common = c
            .common
            .ok_or_else(|| anyhow!("internal: reintegrating without a common point"))?;
        let primary = match hello {
            Msg::Hello { name, .. } => name.clone(),
            _ => String::new(),
        };
        // Nothing is appended while the phase runs: the copy the primary reads stays the one
        // `Diverged` described.
        let next_seq = lock(&self.vol.order).journal.next_seq();
        let what = format!(
            "split brain with primary {primary} at generation {} seq {}: reintegrating {} change(s) into it",
            common.generation, common.seq, c.a_after
        );
        tracing::warn!("{what}");
        *lock(&self.reintegration) = Some((true, what));
        // An older refusal no longer says what is going on.
        *lock(&self.refused) = None;
        let r = self.serve_reintegration(link, dec, &mut session, &primary, next_seq, &c);
        match &r {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(
                    "reintegration into primary {primary} ended before it completed ({e:#}); nothing was changed here, the next connection starts it again"
                );
                *lock(&self.reintegration) = Some((
                    false,
                    format!("reintegration into primary {primary} interrupted; nothing changed here, it starts again at the next connection"),
                ));
            }
        }
        r
    }

    fn serve_reintegration(
        &self,
        link: &Duplex,
        dec: &mut Decoder,
        session: &mut Session,
        primary: &str,
        next_seq: u64,
        c: &mirrorfs_core::history::Comparison,
    ) -> Result<()> {
        let root =
            Root::open(&self.dir).with_context(|| format!("cannot open {}", self.dir.display()))?;
        let dead = crate::net::remote::DEAD_AFTER;
        let done = AtomicBool::new(false);
        let mut heard = Instant::now();
        loop {
            let silent = || anyhow!("the primary sent nothing for {dead:?}; closing");
            let Some(msg) = link.next_or_dead(dec, &done, &mut heard, dead, silent)? else {
                return Ok(());
            };
            match session.on_message(&msg)? {
                Incoming::SendTail { from, to } => {
                    let n = self.send_tail(link, from, to)?;
                    tracing::info!("sent {n} record(s) {from}..={to} to primary {primary}");
                }
                Incoming::Fetch { id, path, as_path } => {
                    let mut send = |m: Msg| -> Result<()> {
                        link.send(&m)?;
                        Ok(())
                    };
                    send_entry(&mut send, &root, id, path, as_path)?;
                }
                Incoming::Reintegrated { conflicts } => {
                    assert_eq!(
                        lock(&self.vol.order).journal.next_seq(),
                        next_seq,
                        "the journal changed during a reintegration"
                    );
                    self.discard_divergence(c)?;
                    link.send(&Msg::Reintegrated { conflicts })?;
                    tracing::info!(
                        "reintegrated into primary {primary} ({conflicts} conflict(s) kept as copies there); now resynchronising"
                    );
                    *lock(&self.reintegration) = Some((
                        false,
                        format!("reintegrated into {primary}; now resynchronising"),
                    ));
                    return Ok(());
                }
                Incoming::Reply(reply) => {
                    link.send(&reply)?;
                }
                Incoming::Nothing => {}
                Incoming::PeerError { code, message } => {
                    bail!("the primary reported an error (code {code}): {message}")
                }
                Incoming::Append { .. } => bail!("internal: records during a reintegration"),
                Incoming::UdpOffer { .. } | Incoming::UdpSent { .. } => {
                    bail!("internal: a UDP data path message during a reintegration")
                }
            }
        }
    }

    /// Sends the journal's records `from..=to` as `Tail` batches (at most `BATCH_BYTES` of
    /// frames each, a single larger record alone), writes without their data, the last batch
    /// marked; returns how many records were sent.
    fn send_tail(&self, link: &Duplex, from: u64, to: u64) -> Result<u64> {
        let mut reader: Reader<crate::site::store::FileSegment> = Reader::new(from);
        let mut batch: Vec<Record> = Vec::new();
        let (mut bytes, mut sent) = (0usize, 0u64);
        while reader.next_seq() <= to {
            let view = lock(&self.vol.order).journal.segment_for(reader.next_seq());
            let want = reader.next_seq();
            let Some(r) = reader.next::<crate::site::store::FileStore>(view, to)? else {
                bail!("the journal no longer holds record {want} of the reintegration");
            };
            let r = Record {
                seq: r.seq,
                op: without_data(r.op),
            };
            let f = encode_frame(r.seq, &r.op, 0);
            let len = f.head.len() + f.tail.len() + f.padding;
            if !batch.is_empty() && bytes + len > BATCH_BYTES {
                sent += batch.len() as u64;
                link.send(&Msg::Tail {
                    last: false,
                    records: std::mem::take(&mut batch),
                })?;
                bytes = 0;
            }
            bytes += len;
            batch.push(r);
        }
        sent += batch.len() as u64;
        link.send(&Msg::Tail {
            last: true,
            records: batch,
        })?;
        Ok(sent)
    }
}

/// Answers `Fetch{id, path, as_path}`: the ops that recreate the entry at `path` under
/// `as_path` (`mirror::entry_ops`, a regular file's data streamed in between, holes skipped),
/// read beneath DIR without following symlinks; an absent entry is one empty last `Entry`.
fn send_entry(
    send: &mut dyn FnMut(Msg) -> Result<()>,
    root: &Root,
    id: u32,
    path: &RelPath,
    as_path: &RelPath,
) -> Result<()> {
    let mut out = EntryOut {
        send,
        id,
        ops: Vec::new(),
        bytes: 0,
    };
    let st = match root.lstat(path) {
        Ok(st) => st,
        Err(e) if is_absent(&e) => return out.flush(true),
        Err(e) => return Err(e).with_context(|| format!("cannot read {path:?}")),
    };
    let (dir, name) = root.parent(path)?;
    let (create, attrs) =
        crate::mirror::entry_ops(root.fd(), path, as_path, name.as_bytes(), &st, dir.as_fd())?;
    out.push(create)?;
    if st.st_mode & libc::S_IFMT == libc::S_IFREG {
        let size = send_data(&mut out, root, path, as_path, &st)?;
        out.push(Op::Truncate {
            path: as_path.clone(),
            size,
        })?;
    }
    for op in attrs {
        out.push(op)?;
    }
    out.flush(true)
}

/// Streams the data extents of the regular file at `path` (whose `lstat` was `st`) as
/// `Write`s to `as_path`; returns its size.
fn send_data(
    out: &mut EntryOut<'_>,
    root: &Root,
    path: &RelPath,
    as_path: &RelPath,
    st: &libc::stat,
) -> Result<u64> {
    let f = root.open_at(
        path,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
        0,
    )?;
    let now = sys::fstat(f.as_fd())?;
    if now.st_mode & libc::S_IFMT != libc::S_IFREG || now.st_ino != st.st_ino {
        bail!("{path:?} changed while it was read for the primary");
    }
    let size = now.st_size as u64;
    let mut buf = vec![0u8; FETCH_CHUNK_BYTES];
    let mut off = 0u64;
    while off < size {
        let data = match sys::lseek(f.as_fd(), off as i64, libc::SEEK_DATA) {
            Ok(d) if (d as u64) < size => d as u64,
            _ => break,
        };
        let hole = sys::lseek(f.as_fd(), data as i64, libc::SEEK_HOLE)
            .map(|h| h as u64)
            .unwrap_or(size)
            .min(size);
        let want = ((hole - data) as usize).min(buf.len());
        let n = sys::pread(f.as_fd(), &mut buf[..want], data)?;
        if n == 0 {
            off = hole.max(data + 1);
            continue;
        }
        out.push(Op::Write {
            path: as_path.clone(),
            offset: data,
            data: buf[..n].to_vec(),
        })?;
        off = data + n as u64;
    }
    Ok(size)
}

/// The op as a `Tail` carries it: a write names its file and range, not its data.
fn without_data(op: Op) -> Op {
    match op {
        Op::Write { path, offset, .. } => Op::Write {
            path,
            offset,
            data: Vec::new(),
        },
        Op::Sync { mirror, op } => Op::Sync {
            mirror,
            op: Box::new(without_data(*op)),
        },
        op => op,
    }
}

/// No entry at that name beneath the root: nothing there, or only through a symlink (which a
/// path from the primary never follows: `ELOOP` from `RESOLVE_NO_SYMLINKS`, `EXDEV` from
/// `RESOLVE_BENEATH`).
fn is_absent(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP) | Some(libc::EXDEV)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    /// The `Entry` messages answering a fetch of `path` as `as_path` in `root`.
    fn fetch(root: &Root, path: &str, as_path: &str) -> Vec<Msg> {
        let mut got = Vec::new();
        let mut send = |m: Msg| -> Result<()> {
            got.push(m);
            Ok(())
        };
        let (p, q) = (
            RelPath::new(path).expect("path"),
            RelPath::new(as_path).expect("path"),
        );
        send_entry(&mut send, root, 7, &p, &q).expect("fetch");
        got
    }

    /// The ops of `msgs`, checked: one answer, `last` only on the final message, every op
    /// naming `as_path`, each message within a batch and one chunk.
    fn ops_of(msgs: &[Msg], as_path: &str) -> Vec<Op> {
        let mut ops = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let Msg::Entry {
                id,
                last,
                ops: more,
            } = m
            else {
                panic!("not an Entry: {m:?}");
            };
            assert_eq!((*id, *last), (7, i + 1 == msgs.len()));
            assert!(m.encode_body().len() <= BATCH_BYTES + FETCH_CHUNK_BYTES + 4096);
            let as_path = RelPath::new(as_path).expect("path");
            mirrorfs_core::link::check_entry_ops(&as_path, more).expect("entry ops");
            ops.extend(more.iter().cloned());
        }
        ops
    }

    #[test]
    fn a_fetched_file_comes_in_bounded_messages_without_its_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut f = std::fs::File::create(dir.path().join("f")).expect("create");
        f.write_all(&[1u8; 100]).expect("write");
        let far: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
        f.seek(SeekFrom::Start(4 << 20)).expect("seek");
        f.write_all(&far).expect("write");
        drop(f);
        let want = std::fs::read(dir.path().join("f")).expect("read");
        let root = Root::open(dir.path()).expect("root");
        let msgs = fetch(&root, "f", "f.conflict");
        let ops = ops_of(&msgs, "f.conflict");
        assert!(matches!(ops.first(), Some(Op::Create { .. })), "{ops:?}");
        let mut got = Vec::new();
        let mut sent = 0usize;
        for op in &ops {
            if let Op::Write { offset, data, .. } = op {
                let end = *offset as usize + data.len();
                got.resize(got.len().max(end), 0);
                got[*offset as usize..end].copy_from_slice(data);
                sent += data.len();
            }
        }
        got.resize(want.len(), 0);
        assert_eq!(got, want);
        let md = std::fs::metadata(dir.path().join("f")).expect("stat");
        if md.blocks() * 512 < md.len() {
            assert!(sent < want.len(), "the hole was sent");
        }
        // Then its size and attributes, the mtime last.
        let tail: Vec<&str> = ops
            .iter()
            .skip_while(|o| !matches!(o, Op::Truncate { .. }))
            .filter(|o| !matches!(o, Op::SetXattr { .. }))
            .map(|o| o.name())
            .collect();
        assert_eq!(tail.len(), 4, "{tail:?}");
        assert!(matches!(ops.last(), Some(Op::SetTimes { .. })));
        assert!(ops
            .iter()
            .any(|o| matches!(o, Op::Truncate { size, .. } if *size == want.len() as u64)));
        assert!(msgs.len() >= 2, "1.5 MiB of data in one message");
    }

    #[test]
    fn a_fetched_directory_symlink_or_absent_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("d")).expect("mkdir");
        std::fs::write(dir.path().join("d/inner"), b"x").expect("write");
        std::os::unix::fs::symlink("d", dir.path().join("l")).expect("symlink");
        let root = Root::open(dir.path()).expect("root");
        // A directory: made and given its attributes, never its entries.
        let ops = ops_of(&fetch(&root, "d", "e"), "e");
        assert!(matches!(ops.first(), Some(Op::Mkdir { .. })), "{ops:?}");
        assert!(ops.iter().any(|o| matches!(o, Op::SetMode { .. })));
        assert!(matches!(ops.last(), Some(Op::SetTimes { .. })));
        // A symlink: its target, no mode of its own.
        let ops = ops_of(&fetch(&root, "l", "l2"), "l2");
        assert!(
            matches!(ops.first(), Some(Op::Symlink { target, .. }) if target == b"d"),
            "{ops:?}"
        );
        assert!(!ops.iter().any(|o| matches!(o, Op::SetMode { .. })));
        // Absent, or only through a symlink: one empty last answer.
        for p in ["nothing", "d/nothing", "l/inner", "d/inner/x"] {
            let msgs = fetch(&root, p, "x");
            assert_eq!(
                msgs,
                vec![Msg::Entry {
                    id: 7,
                    last: true,
                    ops: vec![]
                }],
                "{p}"
            );
        }
    }

    #[test]
    fn a_tail_write_keeps_its_name_and_range_but_not_its_data() {
        let p = RelPath::new(b"d/f").expect("path");
        let w = Op::Write {
            path: p.clone(),
            offset: 9,
            data: b"abc".to_vec(),
        };
        let bare = Op::Write {
            path: p.clone(),
            offset: 9,
            data: Vec::new(),
        };
        assert_eq!(without_data(w.clone()), bare);
        assert_eq!(
            without_data(Op::Sync {
                mirror: 2,
                op: Box::new(w)
            }),
            Op::Sync {
                mirror: 2,
                op: Box::new(bare)
            }
        );
        let t = Op::Truncate { path: p, size: 1 };
        assert_eq!(without_data(t.clone()), t);
    }
}
