//! Comparing a mirror with its primary (`mirrorfs verify`), without I/O: two scans in (each a
//! list of [`Entry`] sorted by path, as `tree::scan` makes them), a list of [`Difference`]s out.
//!
//! ```text
//!  primary tree ─scan─▶ [Entry] ─┐
//!                                ├─▶ compare ─▶ [Difference] (kind, path, both sides in words)
//!  mirror tree  ─scan─▶ [Entry] ─┘
//! ```
//! What counts as equal is what a mirror promises (see the README's verify section): the same
//! type, permission bits, owner, modification time, data (by blake3 hash), symlink target,
//! device number, extended attributes (names and values, by hash), hard-link groups and link
//! counts of non-directories, and holes kept (the mirror does not allocate much more than the primary). Access
//! times are never compared (reading changes them), nor change times (they cannot be set).

use std::collections::BTreeMap;

pub mod incremental;

/// Allocation slack (in 512-byte sectors) before a file counts as having lost its holes: eight
/// 4 KiB blocks, so that different file systems' rounding is not a difference.
pub const HOLE_SLACK_SECTORS: u64 = 64;

/// The type of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    /// From `st_mode`'s `S_IFMT` bits (the values are the same on every Linux architecture).
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & 0o170000 {
            0o100000 => Kind::File,
            0o040000 => Kind::Dir,
            0o120000 => Kind::Symlink,
            0o010000 => Kind::Fifo,
            0o140000 => Kind::Socket,
            0o020000 => Kind::CharDev,
            0o060000 => Kind::BlockDev,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::CharDev => "character device",
            Kind::BlockDev => "block device",
        }
    }
}

/// One entry of a scanned tree, with what verify compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the tree's root, `/`-separated, the root itself being `.`.
    pub path: Vec<u8>,
    pub kind: Kind,
    /// The permission bits (`st_mode & 0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    pub nlink: u64,
    /// Allocated 512-byte sectors (`st_blocks`), for the hole check.
    pub blocks: u64,
    pub rdev: u64,
    /// A symlink's target.
    pub target: Option<Vec<u8>>,
    /// The blake3 hash of a regular file's data.
    pub hash: Option<[u8; 32]>,
    /// Extended attributes: name → blake3 hash of the value, sorted by name.
    pub xattrs: Vec<(Vec<u8>, [u8; 32])>,
    /// For a non-directory with several links: the first path (in scan order) of its inode
    /// within this tree, so hard-link groups compare across trees.
    pub link_leader: Option<Vec<u8>>,
}

/// What differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DiffKind {
    /// A regular file's data (or size).
    Content,
    /// The type (a file on one side, a directory on the other, ...).
    Type,
    /// The permission bits.
    Mode,
    /// uid or gid.
    Owner,
    /// The modification time.
    Times,
    /// The link count or the hard-link group.
    Links,
    /// A symlink's target.
    LinkTarget,
    /// A device's number.
    Device,
    /// Extended attributes (names or values).
    Xattrs,
    /// The mirror allocates much more than the primary: holes were filled.
    Holes,
    /// On the primary, missing from the mirror.
    OnlyOnPrimary,
    /// On the mirror only: never deleted by `--repair` unless asked.
    OnlyOnMirror,
}

impl DiffKind {
    pub const ALL: [DiffKind; 12] = [
        DiffKind::Content,
        DiffKind::Type,
        DiffKind::Mode,
        DiffKind::Owner,
        DiffKind::Times,
        DiffKind::Links,
        DiffKind::LinkTarget,
        DiffKind::Device,
        DiffKind::Xattrs,
        DiffKind::Holes,
        DiffKind::OnlyOnPrimary,
        DiffKind::OnlyOnMirror,
    ];

    /// The name used in text and JSON output.
    pub fn name(self) -> &'static str {
        match self {
            DiffKind::Content => "content",
            DiffKind::Type => "type",
            DiffKind::Mode => "mode",
            DiffKind::Owner => "owner",
            DiffKind::Times => "times",
            DiffKind::Links => "links",
            DiffKind::LinkTarget => "link-target",
            DiffKind::Device => "device",
            DiffKind::Xattrs => "xattrs",
            DiffKind::Holes => "holes",
            DiffKind::OnlyOnPrimary => "only-on-primary",
            DiffKind::OnlyOnMirror => "only-on-mirror",
        }
    }
}

/// One difference between the trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub path: Vec<u8>,
    pub kind: DiffKind,
    /// The primary's side in words (empty when it has no entry).
    pub primary: String,
    /// The mirror's side in words (empty when it has no entry).
    pub mirror: String,
}

/// The order of scans: component by component (`/` sorts before every other byte), so that
/// everything below a directory comes right after it.
pub fn path_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let key = |c: &u8| if *c == b'/' { 0 } else { *c };
    a.iter().map(key).cmp(b.iter().map(key))
}

/// Every difference between `primary` and `mirror`, in path order. Both must be sorted by
/// [`path_order`] with no duplicates, as a scan makes them; an unsorted input gives a wrong (but
/// bounded) answer, never a panic. Below a path present on one side only, nothing is listed
/// (its parent already is): the caller's scan gives every entry, so a missing directory with a
/// thousand files is one difference, not a thousand and one.
pub fn compare(primary: &[Entry], mirror: &[Entry]) -> Vec<Difference> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    // The last path reported as present on one side only: its descendants are skipped.
    let mut missing_dir: Option<Vec<u8>> = None;
    let below = |p: &[u8], d: &Option<Vec<u8>>| {
        d.as_ref()
            .is_some_and(|d| p.len() > d.len() && p.starts_with(d) && p[d.len()] == b'/')
    };
    while i < primary.len() || j < mirror.len() {
        let order = match (primary.get(i), mirror.get(j)) {
            (Some(a), Some(b)) => path_order(&a.path, &b.path),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                let a = &primary[i];
                i += 1;
                if !below(&a.path, &missing_dir) {
                    out.push(one_side(a, DiffKind::OnlyOnPrimary));
                    missing_dir = Some(a.path.clone());
                }
            }
            std::cmp::Ordering::Greater => {
                let b = &mirror[j];
                j += 1;
                if !below(&b.path, &missing_dir) {
                    out.push(one_side(b, DiffKind::OnlyOnMirror));
                    missing_dir = Some(b.path.clone());
                }
            }
            std::cmp::Ordering::Equal => {
                let (a, b) = (&primary[i], &mirror[j]);
                i += 1;
                j += 1;
                if below(&a.path, &missing_dir) {
                    continue;
                }
                if a.kind != b.kind {
                    // A directory replaced by a file: what is below is one difference too.
                    missing_dir = Some(a.path.clone());
                }
                entry_diffs(a, b, &mut out);
            }
        }
    }
    out
}

fn one_side(e: &Entry, kind: DiffKind) -> Difference {
    let side = e.kind.name().to_string();
    let (primary, mirror) = if kind == DiffKind::OnlyOnPrimary {
        (side, String::new())
    } else {
        (String::new(), side)
    };
    Difference {
        path: e.path.clone(),
        kind,
        primary,
        mirror,
    }
}

fn hex8(h: &[u8; 32]) -> String {
    h[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The differences of two entries at the same path.
fn entry_diffs(a: &Entry, b: &Entry, out: &mut Vec<Difference>) {
    let mut push = |kind: DiffKind, primary: String, mirror: String| {
        out.push(Difference {
            path: a.path.clone(),
            kind,
            primary,
            mirror,
        })
    };
    if a.kind != b.kind {
        push(DiffKind::Type, a.kind.name().into(), b.kind.name().into());
        return;
    }
    if a.perm != b.perm {
        push(
            DiffKind::Mode,
            format!("{:04o}", a.perm),
            format!("{:04o}", b.perm),
        );
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        push(
            DiffKind::Owner,
            format!("{}:{}", a.uid, a.gid),
            format!("{}:{}", b.uid, b.gid),
        );
    }
    if a.mtime != b.mtime {
        let t = |m: (i64, i64)| format!("mtime {}.{:09}", m.0, m.1);
        push(DiffKind::Times, t(a.mtime), t(b.mtime));
    }
    // A directory's link count follows from its subdirectories (compared one by one), differs
    // between file systems (btrfs counts 1), and at the root counts the state directory.
    if a.kind != Kind::Dir && (a.nlink != b.nlink || a.link_leader != b.link_leader) {
        let l = |e: &Entry| match &e.link_leader {
            Some(p) if p != &e.path => format!(
                "{} links, same file as {}",
                e.nlink,
                String::from_utf8_lossy(p)
            ),
            _ => format!("{} links", e.nlink),
        };
        push(DiffKind::Links, l(a), l(b));
    }
    if a.target != b.target {
        let t = |e: &Entry| String::from_utf8_lossy(e.target.as_deref().unwrap_or_default()).into();
        push(DiffKind::LinkTarget, t(a), t(b));
    }
    if matches!(a.kind, Kind::CharDev | Kind::BlockDev) && a.rdev != b.rdev {
        push(
            DiffKind::Device,
            format!("{:#x}", a.rdev),
            format!("{:#x}", b.rdev),
        );
    }
    if a.kind == Kind::File {
        if a.size != b.size {
            push(
                DiffKind::Content,
                format!("{} bytes", a.size),
                format!("{} bytes", b.size),
            );
        } else if a.hash != b.hash {
            let h = |e: &Entry| e.hash.as_ref().map(hex8).unwrap_or_else(|| "unread".into());
            push(
                DiffKind::Content,
                format!("blake3 {}…", h(a)),
                format!("blake3 {}…", h(b)),
            );
        }
        if b.blocks > a.blocks + HOLE_SLACK_SECTORS {
            push(
                DiffKind::Holes,
                format!("{} sectors allocated", a.blocks),
                format!("{} sectors allocated", b.blocks),
            );
        }
    }
    if a.xattrs != b.xattrs {
        push(DiffKind::Xattrs, xattr_words(a, b), xattr_words(b, a));
    }
}

/// The xattrs of `e` that `other` lacks or holds with another value, in words.
fn xattr_words(e: &Entry, other: &Entry) -> String {
    let theirs: BTreeMap<&[u8], &[u8; 32]> =
        other.xattrs.iter().map(|(n, h)| (&n[..], h)).collect();
    let words: Vec<String> = e
        .xattrs
        .iter()
        .filter(|(n, h)| theirs.get(&n[..]) != Some(&h))
        .map(|(n, h)| format!("{}=blake3 {}…", String::from_utf8_lossy(n), hex8(h)))
        .collect();
    if words.is_empty() {
        "-".into()
    } else {
        words.join(", ")
    }
}

/// How many differences of each kind, in [`DiffKind::ALL`] order, kinds with none left out.
pub fn summary(diffs: &[Difference]) -> Vec<(DiffKind, usize)> {
    DiffKind::ALL
        .iter()
        .map(|k| (*k, diffs.iter().filter(|d| d.kind == *k).count()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, data: &[u8]) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: Kind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            size: data.len() as u64,
            mtime: (1, 0),
            nlink: 1,
            blocks: 8,
            rdev: 0,
            target: None,
            hash: Some(*blake3_like(data)),
            xattrs: Vec::new(),
            link_leader: None,
        }
    }

    /// A stand-in for a hash: distinct data give distinct values in these tests.
    fn blake3_like(data: &[u8]) -> Box<[u8; 32]> {
        let mut h = [0u8; 32];
        for (i, b) in data.iter().enumerate() {
            h[i % 32] ^= b.wrapping_add(i as u8);
        }
        h[31] = data.len() as u8;
        Box::new(h)
    }

    fn dir(path: &str) -> Entry {
        Entry {
            kind: Kind::Dir,
            perm: 0o755,
            hash: None,
            size: 4096,
            nlink: 2,
            ..file(path, b"")
        }
    }

    fn kinds(d: &[Difference]) -> Vec<(String, &'static str)> {
        d.iter()
            .map(|d| (String::from_utf8_lossy(&d.path).into_owned(), d.kind.name()))
            .collect()
    }

    #[test]
    fn equal_trees_have_no_difference() {
        let t = vec![dir("."), dir("a"), file("a/f", b"x"), file("b", b"y")];
        assert!(compare(&t, &t.clone()).is_empty());
        // A directory's link count is not compared (it follows from the tree).
        let mut m = t.clone();
        m[0].nlink = 3;
        assert!(compare(&t, &m).is_empty());
    }

    #[test]
    fn every_attribute_difference_is_named_once() {
        let p = vec![
            dir("."),
            file("content", b"abc"),
            file("mode", b""),
            file("owner", b""),
            file("size", b"abc"),
            file("times", b""),
        ];
        let mut m = p.clone();
        m[1].hash = Some(*blake3_like(b"abd"));
        m[2].perm = 0o600;
        m[3].uid = 1000;
        m[4].size = 2;
        m[5].mtime = (2, 5);
        let d = compare(&p, &m);
        assert_eq!(
            kinds(&d),
            vec![
                ("content".into(), "content"),
                ("mode".into(), "mode"),
                ("owner".into(), "owner"),
                ("size".into(), "content"),
                ("times".into(), "times"),
            ]
        );
        assert_eq!(d[1].primary, "0644");
        assert_eq!(d[1].mirror, "0600");
        assert_eq!(d[3].mirror, "2 bytes");
    }

    #[test]
    fn a_type_change_hides_the_other_attributes_and_what_was_below() {
        let p = vec![dir("."), dir("x"), file("x/a", b"1"), file("y", b"")];
        let m = vec![dir("."), file("x", b"zz"), file("y", b"")];
        assert_eq!(kinds(&compare(&p, &m)), vec![("x".into(), "type")]);
    }

    #[test]
    fn a_missing_directory_is_one_difference_and_extras_are_listed() {
        let p = vec![dir("."), dir("d"), file("d/1", b""), file("d/2", b"")];
        let m = vec![dir("."), file("d-extra", b""), file("e", b"")];
        assert_eq!(
            kinds(&compare(&p, &m)),
            vec![
                ("d".into(), "only-on-primary"),
                ("d-extra".into(), "only-on-mirror"),
                ("e".into(), "only-on-mirror"),
            ]
        );
    }

    #[test]
    fn a_sibling_with_a_common_prefix_is_not_below_a_missing_directory() {
        let p = vec![dir("."), dir("d"), file("d/x", b""), file("d.txt", b"")];
        let m = vec![dir(".")];
        assert_eq!(
            kinds(&compare(&p, &m)),
            vec![
                ("d".into(), "only-on-primary"),
                ("d.txt".into(), "only-on-primary")
            ]
        );
    }

    #[test]
    fn symlinks_devices_xattrs_links_and_holes() {
        let mut l = file("l", b"");
        l.kind = Kind::Symlink;
        l.hash = None;
        l.target = Some(b"there".to_vec());
        let mut dev = file("dev", b"");
        dev.kind = Kind::CharDev;
        dev.rdev = 0x103;
        let mut x = file("x", b"");
        x.xattrs = vec![(b"user.a".to_vec(), [1; 32]), (b"user.b".to_vec(), [2; 32])];
        let mut h1 = file("h1", b"data");
        h1.nlink = 2;
        h1.link_leader = Some(b"h1".to_vec());
        let mut h2 = h1.clone();
        h2.path = b"h2".to_vec();
        let sparse = file("sparse", b"s");
        let p = vec![dir("."), dev, h1, h2, l, sparse, x];
        let mut m = p.clone();
        m[1].rdev = 0x104;
        // h2 became a separate copy on the mirror.
        m[2].nlink = 1;
        m[2].link_leader = None;
        m[3].nlink = 1;
        m[3].link_leader = None;
        m[4].target = Some(b"elsewhere".to_vec());
        m[5].blocks = 8 + HOLE_SLACK_SECTORS + 1;
        m[6].xattrs = vec![(b"user.a".to_vec(), [9; 32])];
        let d = compare(&p, &m);
        assert_eq!(
            kinds(&d),
            vec![
                ("dev".into(), "device"),
                ("h1".into(), "links"),
                ("h2".into(), "links"),
                ("l".into(), "link-target"),
                ("sparse".into(), "holes"),
                ("x".into(), "xattrs"),
            ]
        );
        assert_eq!(d[2].primary, "2 links, same file as h1");
        assert!(d[5].primary.contains("user.a=") && d[5].primary.contains("user.b="));
        assert!(d[5].mirror.starts_with("user.a=blake3 0909"));
        // Within the slack, allocation is not a difference.
        let mut m2 = p.clone();
        m2[5].blocks = 8 + HOLE_SLACK_SECTORS;
        assert!(compare(&p, &m2).is_empty());
    }

    #[test]
    fn the_summary_counts_by_kind() {
        let p = vec![dir("."), file("a", b"1"), file("b", b"2")];
        let m = vec![dir("."), file("c", b"")];
        let s = summary(&compare(&p, &m));
        assert_eq!(
            s,
            vec![(DiffKind::OnlyOnPrimary, 2), (DiffKind::OnlyOnMirror, 1)]
        );
    }

    #[test]
    fn path_order_keeps_a_directory_and_what_is_below_it_together() {
        let mut v = vec!["d.txt", "d/x", "d", "c", "d/x/y"];
        v.sort_by(|a, b| path_order(a.as_bytes(), b.as_bytes()));
        assert_eq!(v, vec!["c", "d", "d/x", "d/x/y", "d.txt"]);
    }

    #[test]
    fn unsorted_input_does_not_panic() {
        let p = vec![file("z", b""), dir("."), file("a", b"")];
        let m = vec![file("a", b""), file("z", b"")];
        let _ = compare(&p, &m);
    }
}
