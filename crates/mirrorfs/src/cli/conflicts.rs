//! `mirrorfs conflicts`: lists the conflicts reintegrations left (`site::conflicts`, in each
//! running mount's state directory) and settles one, `resolve PATH --keep local|remote|both`.
//!
//! A resolution changes the volume **through the mount** (calls on paths under the mountpoint,
//! resolved beneath it by `dirtree::Root`), so it is journaled like any other change and reaches
//! every mirror and site;
//! only then is the entry dropped from the registry. Listing reads the backing directory instead
//! (whether each version still exists), so a hung mount cannot leave `conflicts` waiting in the
//! kernel.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use std::os::fd::AsFd;

use anyhow::{anyhow, bail, Context, Result};
use mirrorfs_core::path::RelPath;

use crate::site::conflicts::{self, ConflictEntry};
use crate::site::status::{self, Running};
use crate::tree::dirtree::Root;

const NAMING: &str = "\
When a former primary is reintegrated after a failover, an object both sites changed is kept
twice: our version at PATH, the other site's version beside it as

    PATH.conflict-SITE-YYYYMMDD-HHMMSS

(SITE: the other site's name; the date and time, UTC, of the reintegration; `-N` is added if
that name was taken). Each conflict is listed until it is settled with

    mirrorfs conflicts resolve PATH --keep local|remote|both

  local   keep ours at PATH; the conflict copy is removed
  remote  keep theirs: the conflict copy is renamed over PATH, replacing ours
  both    keep both files as they are; only the entry is dropped

The change is made through the mount, so it reaches every mirror.

Two writable sites (`mount --peer ... --partition reconcile`) list what both changed during a
split at both sites, reason split-both-modified: PATH holds the lower site id's version, the
copy PATH.conflict-siteID-YYYYMMDD-HHMMSS the higher id's; a resolution at either site settles
it at both.";

/// `mirrorfs conflicts [MOUNT] [--json]`, or `mirrorfs conflicts resolve PATH --keep ...`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, after_help = NAMING)]
pub struct ConflictsArgs {
    #[command(subcommand)]
    pub cmd: Option<ConflictsCmd>,
    /// A mountpoint, or any path inside a mount (default: every mirrorfs mount on this machine).
    pub mount: Option<PathBuf>,
    /// Print a JSON array instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Subcommand)]
pub enum ConflictsCmd {
    /// Settle one conflict: keep our version, theirs, or both, then drop its entry.
    #[command(after_help = NAMING)]
    Resolve {
        /// The path in conflict inside a running mount (absolute, or relative to the current
        /// directory), e.g. /mnt/data/notes.txt, or the path of its conflict copy.
        path: PathBuf,
        /// Which version to keep.
        #[arg(long, value_enum)]
        keep: Keep,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Keep our version at PATH: the conflict copy is removed (a non-empty directory is refused:
    /// mirrorfs never deletes a tree).
    Local,
    /// Keep their version: the conflict copy is renamed over PATH, replacing ours (refused if
    /// PATH is a non-empty directory).
    Remote,
    /// Keep both as they are (rename or merge them yourself); only the entry is dropped.
    Both,
}

pub fn conflicts(a: ConflictsArgs) -> Result<()> {
    match a.cmd {
        Some(ConflictsCmd::Resolve { path, keep }) => resolve(&path, keep),
        None => show(a.mount.as_deref(), a.json),
    }
}

// ---------------------------------------------------------------------------------------------
// listing

/// `mirrorfs conflicts [MOUNT] [--json]`. A registry that cannot be read (corrupt, not this
/// user's) does not hide the other mounts' conflicts, but makes the command fail, naming it.
fn show(mount: Option<&Path>, json: bool) -> Result<()> {
    let want = mount.map(|m| m.canonicalize().unwrap_or_else(|_| m.to_path_buf()));
    let mounts = status::registered(want.as_deref())?;
    let mut found: Vec<(&Running, Vec<ConflictEntry>)> = Vec::new();
    let mut failed: Vec<anyhow::Error> = Vec::new();
    for m in &mounts {
        match conflicts::list(&m.state) {
            Ok(es) if es.is_empty() => {}
            Ok(es) => found.push((m, es)),
            Err(e) => failed.push(e),
        }
    }
    if json {
        let v: Vec<serde_json::Value> = found
            .iter()
            .flat_map(|(m, es)| es.iter().map(|e| json_row(m, e)))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if found.is_empty() && failed.is_empty() {
        println!(
            "no conflicts{}",
            if mounts.is_empty() {
                " (no running mirrorfs mount)"
            } else {
                ""
            }
        );
    }
    if !json {
        for (m, es) in &found {
            println!("{}: {} conflict(s)", m.mountpoint.display(), es.len());
            for e in es {
                print_entry(m, e);
            }
            println!(
                "  settle each with: mirrorfs conflicts resolve {}/PATH --keep local|remote|both",
                m.mountpoint.display()
            );
        }
    }
    match failed.len() {
        0 => Ok(()),
        1 => Err(failed.remove(0)),
        n => Err(failed.remove(0).context(format!(
            "{n} conflict registries could not be read, the first"
        ))),
    }
}

fn print_entry(m: &Running, e: &ConflictEntry) {
    println!(
        "  {}{}",
        shown(&e.path),
        existence(exists(&m.backing, &e.path))
    );
    match &e.copy {
        Some(c) => println!(
            "    theirs: {}{}",
            shown(c),
            existence(exists(&m.backing, c))
        ),
        None => println!("    theirs: not copied"),
    }
    println!("    {}", e.description());
    println!(
        "    with site {}, recorded {}",
        e.peer,
        crate::sys::local_time_text(e.time)
    );
}

/// One entry as `--json` shows it: the registry's fields (paths relative to the volume's root,
/// `path_hex`/`copy_hex` for names that are not UTF-8) and what the listing adds.
fn json_row(m: &Running, e: &ConflictEntry) -> serde_json::Value {
    let mut v = serde_json::to_value(e).unwrap_or_default();
    v["mountpoint"] = serde_json::json!(m.mountpoint.display().to_string());
    v["description"] = serde_json::json!(e.description());
    v["time_local"] = serde_json::json!(crate::sys::local_time_text(e.time));
    v["path_exists"] = serde_json::json!(exists(&m.backing, &e.path));
    v["copy_exists"] = serde_json::json!(e.copy.as_ref().map(|c| exists(&m.backing, c)));
    v
}

fn shown(rel: &[u8]) -> String {
    Path::new(OsStr::from_bytes(rel)).display().to_string()
}

fn existence(present: bool) -> &'static str {
    if present {
        ""
    } else {
        " (no longer exists)"
    }
}

/// Whether `rel` exists in the backing directory (read there, not through the mount: a hung
/// mount must not hang the listing), resolved beneath it without following a symlink.
fn exists(backing: &Path, rel: &[u8]) -> bool {
    let Ok(rel) = RelPath::new(rel.to_vec()) else {
        return false;
    };
    Root::open(backing).is_ok_and(|root| root.lstat(&rel).is_ok())
}

// ---------------------------------------------------------------------------------------------
// resolving

/// `mirrorfs conflicts resolve PATH --keep ...`.
fn resolve(path: &Path, keep: Keep) -> Result<()> {
    let abs = absolute(path)?;
    let mounts = status::registered(None)?;
    let (mount, rel) = locate(&mounts, &abs)?;
    let mounted = crate::sys::mount_entry(&mount.mountpoint);
    if !mounted.as_ref().is_some_and(|(t, _)| t.starts_with("fuse")) {
        bail!(
            "{} is not mounted (its mirrorfs, pid {}, is not serving it): start it with `mirrorfs mount`, then run this again",
            mount.mountpoint.display(),
            mount.pid
        );
    }
    let entries = conflicts::list(&mount.state)?;
    let chosen = select(&entries, &rel);
    if chosen.is_empty() {
        bail!(
            "no conflict is recorded for {}: list them with `mirrorfs conflicts {}`",
            abs.display(),
            mount.mountpoint.display()
        );
    }
    let actions = plan(&chosen, keep, &mount.mountpoint)?;
    for a in &actions {
        act(&mount.mountpoint, a)?;
    }
    // Exactly the entries settled: a conflict recorded meanwhile on the same path stays listed.
    let dropped = conflicts::remove_entries(&mount.state, &chosen)?;
    let what = match keep {
        Keep::Local => "kept our version",
        Keep::Remote => "kept their version",
        Keep::Both => "kept both versions",
    };
    println!(
        "{}: {what}; {dropped} conflict entr{} dropped",
        mount
            .mountpoint
            .join(OsStr::from_bytes(&chosen[0].path))
            .display(),
        if dropped == 1 { "y" } else { "ies" }
    );
    Ok(())
}

/// `p` made absolute (relative to the current directory) with the symlinks of its parent
/// resolved, as mountpoints are registered; the last name is kept as it is (it may be a symlink
/// in conflict, which must not be followed).
fn absolute(p: &Path) -> Result<PathBuf> {
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(p)
    };
    let canon = |d: &Path| {
        d.canonicalize()
            .with_context(|| format!("cannot resolve {}", d.display()))
    };
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => Ok(canon(parent)?.join(name)),
        _ => canon(&p),
    }
}

/// The running mount that holds `abs`, and `abs` relative to its root.
fn locate<'a>(mounts: &'a [Running], abs: &Path) -> Result<(&'a Running, Vec<u8>)> {
    let Some(m) = status::containing(mounts, abs) else {
        bail!(
            "{} is not inside a running mirrorfs mount (is it mounted? `mirrorfs status` lists the mounts)",
            abs.display()
        );
    };
    if m.is_daemon() {
        bail!(
            "{} is a mirror daemon's directory: conflicts are settled on the primary, through its mount",
            m.mountpoint.display()
        );
    }
    let rel = abs
        .strip_prefix(&m.mountpoint)
        .map_err(|_| anyhow!("{} is not inside {}", abs.display(), m.mountpoint.display()))?;
    if rel.as_os_str().is_empty() {
        bail!(
            "{} is the mount's root: name the file in conflict (`mirrorfs conflicts {}` lists them)",
            abs.display(),
            m.mountpoint.display()
        );
    }
    Ok((m, rel.as_os_str().as_bytes().to_vec()))
}

/// The entries a path names: the one whose conflict copy it is, else every one on that path.
fn select(entries: &[ConflictEntry], rel: &[u8]) -> Vec<ConflictEntry> {
    let by_copy: Vec<_> = entries
        .iter()
        .filter(|e| e.copy.as_deref() == Some(rel))
        .cloned()
        .collect();
    if !by_copy.is_empty() {
        return by_copy;
    }
    entries.iter().filter(|e| e.path == rel).cloned().collect()
}

/// A change to make through the mount (paths relative to its root).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// Remove their version (`--keep local`).
    RemoveCopy(Vec<u8>),
    /// Rename their version over ours (`--keep remote`).
    RenameOver { copy: Vec<u8>, path: Vec<u8> },
}

/// What `keep` means for the chosen entries; a refusal says what would work.
fn plan(chosen: &[ConflictEntry], keep: Keep, mnt: &Path) -> Result<Vec<Action>> {
    match keep {
        Keep::Both => Ok(Vec::new()),
        Keep::Local => Ok(chosen
            .iter()
            .filter_map(|e| e.copy.clone().map(Action::RemoveCopy))
            .collect()),
        Keep::Remote => {
            let [e] = chosen else {
                let copies: Vec<String> = chosen
                    .iter()
                    .filter_map(|e| e.copy.as_deref())
                    .map(|c| mnt.join(OsStr::from_bytes(c)).display().to_string())
                    .collect();
                bail!(
                    "{} conflicts are recorded for {}: name the conflict copy whose version should win, one of:\n  {}",
                    chosen.len(),
                    shown(&chosen[0].path),
                    copies.join("\n  ")
                );
            };
            let Some(copy) = &e.copy else {
                bail!(
                    "nothing was copied for {} ({}): there is no other version to keep; `--keep local` or `--keep both` drops the entry",
                    shown(&e.path),
                    e.description()
                );
            };
            Ok(vec![Action::RenameOver {
                copy: copy.clone(),
                path: e.path.clone(),
            }])
        }
    }
}

/// The kind of the entry at `rel` beneath `root` (a final symlink not followed), `None` if there
/// is none.
fn kind(root: &Root, rel: &RelPath) -> io::Result<Option<u32>> {
    match root.lstat(rel) {
        Ok(st) => Ok(Some(st.st_mode & libc::S_IFMT)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn rel_path(rel: &[u8]) -> Result<RelPath> {
    // Checked when the registry was read; checked again where it is acted on.
    RelPath::new(rel.to_vec())
        .map_err(|e| anyhow!("{:?} is not a path inside a volume: {e}", shown(rel)))
}

/// Makes one change through the mount at `mnt`. Each path is resolved beneath the mount's root
/// by `dirtree::Root` (no symlink followed, none planted in a directory of the path can send the
/// change outside the volume), and the change still reaches the mount as any other does.
fn act(mnt: &Path, a: &Action) -> Result<()> {
    let root = Root::open(mnt).with_context(|| format!("cannot open {}", mnt.display()))?;
    let at = |rel: &[u8]| mnt.join(OsStr::from_bytes(rel));
    match a {
        Action::RemoveCopy(copy) => {
            let (c, rel) = (at(copy), rel_path(copy)?);
            match kind(&root, &rel).with_context(|| format!("cannot read {}", c.display()))? {
                None => {
                    println!("{}: already gone", c.display());
                    Ok(())
                }
                Some(libc::S_IFDIR) => {
                    refuse_non_empty(
                        &root,
                        &rel,
                        &c,
                        "remove it yourself (`rm -r`) once you have checked it",
                    )?;
                    root.rmdir(&rel)
                        .with_context(|| format!("cannot remove {}", c.display()))
                }
                Some(_) => root
                    .unlink(&rel)
                    .with_context(|| format!("cannot remove {}", c.display())),
            }
        }
        Action::RenameOver { copy, path } => {
            let (c, p) = (at(copy), at(path));
            let (crel, prel) = (rel_path(copy)?, rel_path(path)?);
            let Some(ckind) =
                kind(&root, &crel).with_context(|| format!("cannot read {}", c.display()))?
            else {
                bail!(
                    "the conflict copy {} no longer exists, so their version is gone: `--keep both` drops the entry",
                    c.display()
                );
            };
            match kind(&root, &prel).with_context(|| format!("cannot read {}", p.display()))? {
                None => {}
                Some(libc::S_IFDIR) => {
                    refuse_non_empty(&root, &prel, &p, "empty it (or move it aside) first")?;
                    if ckind != libc::S_IFDIR {
                        // A rename cannot put a file over a directory, even an empty one.
                        root.rmdir(&prel)
                            .with_context(|| format!("cannot remove {}", p.display()))?;
                    }
                }
                Some(_) if ckind == libc::S_IFDIR => {
                    // Nor a directory over a file.
                    root.unlink(&prel)
                        .with_context(|| format!("cannot remove {}", p.display()))?;
                }
                Some(_) => {}
            }
            root.rename(&crel, &prel, 0)
                .with_context(|| format!("cannot rename {} to {}", c.display(), p.display()))
        }
    }
}

/// Refuses a directory that is not empty (mirrorfs never deletes or replaces a tree silently).
fn refuse_non_empty(root: &Root, rel: &RelPath, shown_as: &Path, hint: &str) -> Result<()> {
    let d = root
        .open_at(
            rel,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .and_then(|fd| crate::sys::read_dir_fd(fd.as_fd()))
        .with_context(|| format!("cannot read {}", shown_as.display()))?;
    if !d.is_empty() {
        bail!(
            "{} is a directory that is not empty: mirrorfs does not delete a tree; {hint}, then run this again (or use `--keep both`)",
            shown_as.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn running(mnt: &str) -> Running {
        Running {
            mountpoint: mnt.into(),
            backing: format!("/srv{mnt}").into(),
            state: format!("/srv{mnt}/.mirrorfs").into(),
            pid: 1,
        }
    }

    fn entry(path: &str, copy: Option<&str>) -> ConflictEntry {
        ConflictEntry {
            path: path.as_bytes().to_vec(),
            copy: copy.map(|c| c.as_bytes().to_vec()),
            reason: "both-modified".into(),
            peer: "siteb".into(),
            time: 0,
        }
    }

    #[test]
    fn a_path_is_located_in_the_deepest_mount_that_holds_it() {
        let mounts = [
            running("/mnt/data"),
            running("/mnt/data/inner"),
            running("/mnt/d"),
        ];
        let (m, rel) = locate(&mounts, Path::new("/mnt/data/a/notes.txt")).expect("inside");
        assert_eq!(m.mountpoint, Path::new("/mnt/data"));
        assert_eq!(rel, b"a/notes.txt");
        let (m, rel) = locate(&mounts, Path::new("/mnt/data/inner/x")).expect("inner");
        assert_eq!(
            (m.mountpoint.as_path(), rel.as_slice()),
            (Path::new("/mnt/data/inner"), &b"x"[..])
        );
        let e = locate(&mounts, Path::new("/mnt/database/x"))
            .expect_err("a prefix of a name is not a parent");
        assert!(
            e.to_string()
                .contains("not inside a running mirrorfs mount"),
            "{e}"
        );
        let e = locate(&mounts, Path::new("/mnt/data")).expect_err("the root");
        assert!(e.to_string().contains("root"), "{e}");
        let daemon = [Running {
            backing: "/backup".into(),
            ..running("/backup")
        }];
        let e = locate(&daemon, Path::new("/backup/x")).expect_err("a daemon's directory");
        assert!(e.to_string().contains("mirror daemon"), "{e}");
    }

    #[test]
    fn a_relative_path_is_made_absolute_without_following_its_last_name() {
        let d = tempfile::tempdir().expect("tempdir");
        let real = d.path().canonicalize().expect("canon");
        std::os::unix::fs::symlink("/etc/hostname", real.join("link")).expect("symlink");
        let abs = absolute(&real.join("link")).expect("absolute");
        assert_eq!(abs, real.join("link"), "the symlink in conflict itself");
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(absolute(Path::new("x")).expect("relative"), cwd.join("x"));
    }

    #[test]
    fn a_change_never_follows_a_symlink_planted_in_the_path() {
        let d = tempfile::tempdir().expect("tempdir");
        let (vol, outside) = (d.path().join("vol"), d.path().join("outside"));
        fs::create_dir_all(&vol).expect("mkdir");
        fs::create_dir_all(&outside).expect("mkdir");
        fs::write(outside.join("n"), b"outside").expect("write");
        fs::write(outside.join("n.c"), b"outside copy").expect("write");
        std::os::unix::fs::symlink(&outside, vol.join("link")).expect("symlink");
        let over = Action::RenameOver {
            copy: b"link/n.c".to_vec(),
            path: b"link/n".to_vec(),
        };
        assert!(act(&vol, &over).is_err(), "renamed through a symlink");
        assert!(act(&vol, &Action::RemoveCopy(b"link/n.c".to_vec())).is_err());
        assert_eq!(fs::read(outside.join("n")).expect("read"), b"outside");
        assert!(
            outside.join("n.c").exists(),
            "nothing outside the volume changed"
        );
        fs::create_dir(vol.join("d")).expect("mkdir");
        fs::write(vol.join("d/f"), b"x").expect("write");
        let e = act(&vol, &Action::RemoveCopy(b"d".to_vec())).expect_err("a tree");
        assert!(format!("{e:#}").contains("not empty"), "{e:#}");
        assert!(vol.join("d/f").exists());
    }

    #[test]
    fn a_path_selects_its_entries_or_the_one_copy_it_names() {
        let es = [
            entry(
                "notes.txt",
                Some("notes.txt.conflict-siteb-20261204-120000"),
            ),
            entry(
                "notes.txt",
                Some("notes.txt.conflict-sitec-20261205-120000"),
            ),
            entry("gone", None),
        ];
        assert_eq!(select(&es, b"notes.txt").len(), 2);
        assert_eq!(
            select(&es, b"notes.txt.conflict-sitec-20261205-120000"),
            vec![es[1].clone()]
        );
        assert!(select(&es, b"other").is_empty());
    }

    #[test]
    fn each_keep_choice_plans_its_change_or_says_what_would_work() {
        let mnt = Path::new("/mnt/data");
        let one = [entry("n", Some("n.conflict-b-20261204-120000"))];
        assert_eq!(
            plan(&one, Keep::Remote, mnt).expect("remote"),
            vec![Action::RenameOver {
                copy: b"n.conflict-b-20261204-120000".to_vec(),
                path: b"n".to_vec()
            }]
        );
        assert_eq!(
            plan(&one, Keep::Local, mnt).expect("local"),
            vec![Action::RemoveCopy(b"n.conflict-b-20261204-120000".to_vec())]
        );
        assert!(plan(&one, Keep::Both, mnt).expect("both").is_empty());
        let none = [entry("gone", None)];
        let e = plan(&none, Keep::Remote, mnt).expect_err("nothing copied");
        assert!(e.to_string().contains("--keep local"), "{e}");
        assert!(plan(&none, Keep::Local, mnt).expect("local").is_empty());
        let two = [
            entry("n", Some("n.conflict-b-20261204-120000")),
            entry("n", Some("n.conflict-c-20261204-120000")),
        ];
        let e = plan(&two, Keep::Remote, mnt).expect_err("ambiguous");
        assert!(
            e.to_string()
                .contains("/mnt/data/n.conflict-c-20261204-120000"),
            "{e}"
        );
        assert_eq!(plan(&two, Keep::Local, mnt).expect("local").len(), 2);
    }
}
