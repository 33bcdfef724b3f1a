//! Relative paths inside a mirrored tree.
//!
//! Every path that crosses a trust boundary (read back from the journal, or later received from a
//! peer) is parsed into a [`RelPath`]. A `RelPath` can never name anything outside the tree's root:
//! it is relative, has no `.` or `..` components, no empty components, no NUL byte, and is bounded in
//! length. Symlinks inside the tree are handled by the appliers, which never follow them.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;

/// Longest path accepted from a tree's root, in bytes. A single system call takes at most
/// `PATH_MAX - 1` (4,095) bytes, but a tree can be deeper: a relative path of 4,095 bytes from a
/// directory deep inside it is fine on ext4, so trees resolve long paths a chunk at a time.
/// Bounded so that a record stays small (paths are encoded with a `u16` length).
pub const PATH_BYTES_MAX: usize = 16383;
/// Longest symlink target, in bytes (Linux `PATH_MAX` less the terminating NUL).
pub const TARGET_BYTES_MAX: usize = 4095;
/// Longest single component, in bytes (Linux `NAME_MAX`).
pub const NAME_BYTES_MAX: usize = 255;

/// Why a byte string is not an acceptable [`RelPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("path is longer than {PATH_BYTES_MAX} bytes")]
    TooLong,
    #[error("path component is longer than {NAME_BYTES_MAX} bytes")]
    NameTooLong,
    #[error("path is absolute")]
    Absolute,
    #[error("path has an empty, '.' or '..' component")]
    BadComponent,
    #[error("path contains a NUL byte")]
    Nul,
}

/// A validated path relative to a tree's root. The empty path names the root itself.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// The root of the tree.
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    /// Validates `bytes` as a relative path.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        Self::validate(&bytes)?;
        Ok(RelPath(bytes))
    }

    fn validate(bytes: &[u8]) -> Result<(), PathError> {
        if bytes.is_empty() {
            return Ok(());
        }
        if bytes.len() > PATH_BYTES_MAX {
            return Err(PathError::TooLong);
        }
        if bytes.contains(&0) {
            return Err(PathError::Nul);
        }
        if bytes[0] == b'/' {
            return Err(PathError::Absolute);
        }
        for comp in bytes.split(|b| *b == b'/') {
            Self::validate_name(comp)?;
        }
        Ok(())
    }

    fn validate_name(comp: &[u8]) -> Result<(), PathError> {
        if comp.is_empty() || comp == b"." || comp == b".." || comp.contains(&b'/') {
            return Err(PathError::BadComponent);
        }
        if comp.contains(&0) {
            return Err(PathError::Nul);
        }
        if comp.len() > NAME_BYTES_MAX {
            return Err(PathError::NameTooLong);
        }
        Ok(())
    }

    /// `self/name`, validated.
    pub fn join(&self, name: &[u8]) -> Result<Self, PathError> {
        Self::validate_name(name)?;
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        if v.len() > PATH_BYTES_MAX {
            return Err(PathError::TooLong);
        }
        Ok(RelPath(v))
    }

    /// The parent directory, or `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => Some(RelPath(self.0[..i].to_vec())),
            None => Some(RelPath::root()),
        }
    }

    /// The last component, or `None` for the root.
    pub fn file_name(&self) -> Option<&[u8]> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => Some(&self.0[i + 1..]),
            None => Some(&self.0),
        }
    }

    /// True when `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        if other.0.is_empty() {
            return true;
        }
        self.0.starts_with(&other.0)
            && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/')
    }

    /// `self` with the prefix `from` replaced by `to`; `None` if `self` is not below `from`.
    pub fn rebase(&self, from: &RelPath, to: &RelPath) -> Option<RelPath> {
        if !self.starts_with(from) {
            return None;
        }
        let rest = &self.0[from.0.len()..];
        let rest = rest.strip_prefix(b"/").unwrap_or(rest);
        if rest.is_empty() {
            return Some(to.clone());
        }
        let mut v = to.0.clone();
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(rest);
        Some(RelPath(v))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_os_str(&self) -> &OsStr {
        OsStr::from_bytes(&self.0)
    }

    /// The path as given to `*at` system calls relative to the root's descriptor (`.` for the root).
    pub fn as_at_path(&self) -> &OsStr {
        if self.0.is_empty() {
            OsStr::new(".")
        } else {
            self.as_os_str()
        }
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str(".")
        } else {
            f.write_str(&String::from_utf8_lossy(&self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escapes() {
        assert_eq!(RelPath::new("/etc"), Err(PathError::Absolute));
        assert_eq!(RelPath::new("a/../b"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new(".."), Err(PathError::BadComponent));
        assert_eq!(RelPath::new("a//b"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new("a/"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new("./a"), Err(PathError::BadComponent));
        assert_eq!(RelPath::new(b"a\0b".to_vec()), Err(PathError::Nul));
        assert_eq!(RelPath::new(vec![b'x'; 256]), Err(PathError::NameTooLong));
        assert!(RelPath::new(vec![b'x'; 255]).is_ok());
        assert!(RelPath::new(b"caf\xe9/\xff".to_vec()).is_ok());
        assert!(RelPath::root().join(b"..").is_err());
        assert!(RelPath::root().join(b"a/b").is_err());
        // Longer than PATH_MAX (a deep tree) but bounded.
        let long = vec!["x".repeat(255); 40].join("/");
        assert!(long.len() > 4096 && RelPath::new(long).is_ok());
        let too_long = vec!["x".repeat(255); 70].join("/");
        assert_eq!(RelPath::new(too_long), Err(PathError::TooLong));
    }

    #[test]
    fn parent_name_rebase() {
        let p = RelPath::new("a/b/c").expect("valid");
        assert_eq!(p.parent(), Some(RelPath::new("a/b").expect("valid")));
        assert_eq!(p.file_name(), Some(&b"c"[..]));
        assert_eq!(
            RelPath::new("a").expect("valid").parent(),
            Some(RelPath::root())
        );
        let from = RelPath::new("a").expect("valid");
        let to = RelPath::new("z/y").expect("valid");
        assert_eq!(
            p.rebase(&from, &to),
            Some(RelPath::new("z/y/b/c").expect("valid"))
        );
        assert!(!RelPath::new("ab").expect("valid").starts_with(&from));
        assert_eq!(RelPath::new("ab").expect("valid").rebase(&from, &to), None);
    }
}
