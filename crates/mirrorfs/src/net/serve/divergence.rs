//! A primary whose history diverged from the daemon's copy: which files the copy changed that
//! the primary lacks, the refusal that says so, and `--on-diverged discard` (those changes saved
//! to `STATE/diverged/…` first, then the copy rewound to the common point; a reintegration ends
//! the same way once the primary took the changes in).

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result};
use mirrorfs_core::history::Comparison;
use mirrorfs_core::journal::Reader;
use mirrorfs_core::op::Op;
use mirrorfs_core::path::RelPath;

use crate::site::meta::{write_meta, CopyState};
use crate::site::state_dir::StateDir;
use crate::site::store::FileStore;
use crate::site::volume::lock;
use crate::tree::dirtree::Root;

use super::Daemon;

impl Daemon {
    /// The names this copy changed after `after` (from its journal, at most `max`), and how many
    /// there were in all; `None` if the journal no longer holds them all.
    pub(super) fn changed_paths(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Option<(Vec<String>, usize)>> {
        let (first, end) = {
            let o = lock(&self.vol.order);
            (o.journal.first_seq(), o.journal.next_seq() - 1)
        };
        if after + 1 < first {
            return Ok(None);
        }
        let mut reader: Reader<crate::site::store::FileSegment> = Reader::new(after + 1);
        let mut names = std::collections::BTreeSet::new();
        while reader.next_seq() <= end {
            let view = lock(&self.vol.order).journal.segment_for(reader.next_seq());
            let Some(r) = reader.next::<FileStore>(view, end)? else {
                break;
            };
            let op = match &r.op {
                Op::Sync { op, .. } => op.as_ref(),
                op => op,
            };
            let paths: Vec<&mirrorfs_core::path::RelPath> = match op {
                Op::Rename { from, to, .. } | Op::Link { from, to } => vec![from, to],
                other => other.path().into_iter().collect(),
            };
            for p in paths {
                // The root's own attributes are no file to save; the state directory is never
                // a record's (the receiver refuses those).
                let first = p
                    .as_bytes()
                    .split(|b| *b == b'/')
                    .next()
                    .unwrap_or_default();
                if p.as_bytes().is_empty() || first == self.reserved.as_slice() {
                    continue;
                }
                names.insert(String::from_utf8_lossy(p.as_bytes()).into_owned());
            }
        }
        let n = names.len();
        Ok(Some((names.into_iter().take(max).collect(), n)))
    }

    /// The refusal message for a divergence: where the copies part, which files this copy
    /// changed since, and what to do.
    pub(super) fn explain_divergence(&self, c: &Comparison, why: &str) -> String {
        let files = match c.common.map(|p| self.changed_paths(p.seq, 20)) {
            Some(Ok(Some((names, n)))) if n > 0 => {
                let more = if n > names.len() {
                    format!(" and {} more", n - names.len())
                } else {
                    String::new()
                };
                format!(
                    "; files this mirror changed since: {}{more}",
                    names.join(", ")
                )
            }
            Some(Ok(Some(_))) => String::new(),
            _ => "; which files: unknown (its journal no longer holds those changes)".into(),
        };
        format!(
            "{why}{files}. Keep what you need from {dir} (or mount it as a primary again); to let it follow this primary, restart `mirrorfs serve {dir} --on-diverged discard` (formerly --discard-diverged): it saves the changes to {saved}/ first",
            dir = self.dir.display(),
            saved = StateDir::at(&self.state).diverged_dir().display()
        )
    }

    /// `--on-diverged discard`, and the end of a reintegration: saves what this copy changed after the common point (those files,
    /// or the whole tree if the journal no longer says which) to STATE/diverged/NAME, then marks
    /// the copy for a block-hash resync from the primary.
    pub(super) fn discard_divergence(&self, c: &Comparison) -> Result<()> {
        let (gen, seq) = c.common.map_or((0, 0), |p| (p.generation, p.seq));
        let dest = self
            .state
            .join("diverged")
            .join(format!("{}-gen{gen}-seq{seq}", crate::sys::now().sec));
        fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
        let names = match c.common {
            Some(p) => self.changed_paths(p.seq, usize::MAX)?.map(|(n, _)| n),
            None => None,
        };
        let mut saved = 0usize;
        match &names {
            Some(names) => {
                for n in names {
                    let rel = Path::new(n);
                    if reached_beneath(&self.dir, n.as_bytes()) {
                        saved += save_copy(&self.dir.join(rel), &dest.join(rel))?;
                    }
                }
            }
            None => {
                for e in fs::read_dir(&self.dir)?.filter_map(|e| e.ok()) {
                    if e.file_name().as_bytes() != self.reserved.as_slice() {
                        saved += save_copy(&e.path(), &dest.join(e.file_name()))?;
                    }
                }
            }
        }
        let what = c.describe("this mirror", "the primary");
        fs::write(
            dest.join("DIVERGED.txt"),
            format!(
                "{what}\nsaved from {} before it followed the primary ({}).\n",
                self.dir.display(),
                match &names {
                    Some(n) => format!("{} changed name(s): {}", n.len(), n.join(", ")),
                    None => "the whole tree: its journal no longer said which files".into(),
                }
            ),
        )?;
        fs::File::open(&dest)?.sync_all()?;
        let mut mm = lock(&self.meta).clone();
        mm.state = CopyState::NeedsResync;
        mm.promoted = false;
        write_meta(&self.state, &mm)?;
        *lock(&self.meta) = mm;
        tracing::warn!(
            "saved {saved} entr(y/ies) that {} changed after the common point to {}; it now follows the primary ({what})",
            self.dir.display(),
            dest.display()
        );
        Ok(())
    }
}

/// Whether the changed name `rel` (from the journal) is an entry beneath `dir` reached without
/// following a symlink on the way (`Root::lstat`). A name whose directory has since become a
/// symlink — a user of the copy's mount can replace a directory by a link to anywhere — is not
/// saved: the daemon runs as root and must not copy what lies outside its volume (`/etc/shadow`
/// through `d` → `/etc`) into the state directory.
fn reached_beneath(dir: &Path, rel: &[u8]) -> bool {
    let Ok(rel) = RelPath::new(rel.to_vec()) else {
        return false;
    };
    Root::open(dir).is_ok_and(|root| root.lstat(&rel).is_ok())
}

/// Copies `from` (a file, symlink or directory tree, never following symlinks) to `to`, for
/// the saved changes of `--discard-diverged`; returns the number of entries copied.
fn save_copy(from: &Path, to: &Path) -> Result<usize> {
    let md = fs::symlink_metadata(from)?;
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    let ft = md.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)
            .with_context(|| format!("cannot save {}", from.display()))?;
        Ok(1)
    } else if ft.is_dir() {
        fs::create_dir_all(to)?;
        let mut n = 1;
        for e in fs::read_dir(from)?.filter_map(|e| e.ok()) {
            n += save_copy(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(n)
    } else if ft.is_file() {
        fs::copy(from, to).with_context(|| format!("cannot save {}", from.display()))?;
        fs::File::open(to)?.sync_all()?;
        Ok(1)
    } else {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name the journal says changed, whose directory is now a symlink out of the volume,
    /// is not saved at a discard (the old check, `symlink_metadata` of the joined path,
    /// followed the link and copied the outside file).
    #[test]
    fn a_changed_name_behind_a_symlinked_directory_is_not_saved() {
        let t = tempfile::tempdir().expect("tempdir");
        let (vol, outside) = (t.path().join("vol"), t.path().join("outside"));
        fs::create_dir_all(vol.join("d")).expect("mkdir d");
        fs::create_dir_all(&outside).expect("mkdir outside");
        fs::write(vol.join("d/kept"), b"ours").expect("write d/kept");
        fs::write(outside.join("secret"), b"not ours").expect("write secret");
        std::os::unix::fs::symlink(&outside, vol.join("e")).expect("symlink e");
        // What the old check said of `e/secret`: there, so it was copied.
        assert!(fs::symlink_metadata(vol.join("e/secret")).is_ok());
        assert!(!reached_beneath(&vol, b"e/secret"));
        assert!(reached_beneath(&vol, b"d/kept"));
        // The link itself is an entry of the volume: saved as a link, not followed.
        assert!(reached_beneath(&vol, b"e"));
        assert!(!reached_beneath(&vol, b"../outside/secret"));
        assert!(!reached_beneath(&vol, b"d/missing"));
    }
}
