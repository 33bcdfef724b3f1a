//! `STATE/volume.json`: the volume's metadata — which volume a directory holds, its generation
//! history, and the state of its copy. Shared by the mount (a primary's state), the mirror daemon
//! and local mirrors' identity marks; its fsync point is **M1** (`docs/journal.md`).

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use mirrorfs_core::history::{Generation, History};
use mirrorfs_core::link::hex;
use mirrorfs_core::wire::MirrorState;
use serde::{Deserialize, Serialize};

/// `STATE/volume.json`: what DIR holds. Written atomically (temp file, fsync, rename, fsync of
/// the directory: **M1**) before the tree changes in a way that depends on it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub volume_id: String,
    pub generation: u64,
    /// The state of the copy (serialised as today's strings).
    pub state: CopyState,
    pub sync_id: u32,
    #[serde(default)]
    pub promoted: bool,
    /// The generations this copy went through, oldest first (`core::history`). Empty in files
    /// written before histories existed: then generation `generation` alone, id 0.
    #[serde(default)]
    pub history: Vec<GenerationMeta>,
}

/// `volume.json`'s `state`: what the directory's tree is. Serialised as the strings older
/// state directories hold; any other string makes `read_meta` fail naming the file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    /// Holds no copy yet.
    Empty,
    /// A mirror's copy that an initial sync or a resync is filling.
    Syncing,
    /// A mirror's copy equal to the primary's journal up to its cursor.
    Consistent,
    /// A mirror's copy known to have diverged; the next link resyncs it.
    NeedsResync,
    /// A primary's backing directory: its tree is its journal's end.
    Primary,
}

impl CopyState {
    /// The string written to `volume.json` (and shown by `status`).
    pub fn as_str(self) -> &'static str {
        match self {
            CopyState::Empty => "empty",
            CopyState::Syncing => "syncing",
            CopyState::Consistent => "consistent",
            CopyState::NeedsResync => "needs_resync",
            CopyState::Primary => "primary",
        }
    }
}

impl std::fmt::Display for CopyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One generation in `volume.json`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenerationMeta {
    pub number: u64,
    pub id: u64,
    pub start: u64,
}

impl Meta {
    pub fn empty() -> Meta {
        Meta {
            volume_id: String::new(),
            generation: 0,
            state: CopyState::Empty,
            sync_id: 0,
            promoted: false,
            history: Vec::new(),
        }
    }

    pub fn volume_id(&self) -> [u8; 16] {
        parse_id(&self.volume_id).unwrap_or([0; 16])
    }

    /// The copy's generation history.
    pub fn history(&self) -> History {
        let mut generations: Vec<Generation> = self
            .history
            .iter()
            .map(|g| Generation {
                number: g.number,
                id: g.id,
                start: g.start,
            })
            .collect();
        if generations.is_empty() && self.generation > 0 {
            generations.push(Generation {
                number: self.generation,
                id: 0,
                start: 1,
            });
        }
        History {
            volume_id: self.volume_id(),
            generations,
        }
    }

    /// Takes `h` as the copy's volume and history.
    pub fn set_history(&mut self, h: &History) {
        self.volume_id = hex(&h.volume_id);
        self.generation = h.current().map_or(0, |g| g.number);
        self.history = h
            .generations
            .iter()
            .map(|g| GenerationMeta {
                number: g.number,
                id: g.id,
                start: g.start,
            })
            .collect();
    }

    /// A primary's backing directory (an old primary served as a mirror): its tree is its
    /// journal's end.
    pub fn former_primary(&self) -> bool {
        self.state == CopyState::Primary
    }

    pub fn mirror_state(&self) -> MirrorState {
        match self.state {
            CopyState::Consistent | CopyState::Primary => MirrorState::Consistent,
            CopyState::Syncing => MirrorState::Syncing,
            CopyState::NeedsResync => MirrorState::NeedsResync,
            CopyState::Empty => MirrorState::Empty,
        }
    }
}

/// A random 64-bit id (a new generation's).
pub fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("cannot read /dev/urandom")?;
    Ok(u64::from_le_bytes(b) | 1)
}

/// Parses 32 hex digits.
pub fn parse_id(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

pub fn read_meta(state: &Path) -> Result<Meta> {
    let p = state.join("volume.json");
    match fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("{} is damaged; move it away to start afresh", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Meta::empty()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

/// **M1**: writes `volume.json` durably.
pub fn write_meta(state: &Path, m: &Meta) -> Result<()> {
    let tmp = state.join("volume.json.tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(m)?)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, state.join("volume.json"))?;
    fs::File::open(state)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_state_reads_and_writes_todays_strings() {
        for (s, want) in [
            ("empty", CopyState::Empty),
            ("syncing", CopyState::Syncing),
            ("consistent", CopyState::Consistent),
            ("needs_resync", CopyState::NeedsResync),
            ("primary", CopyState::Primary),
        ] {
            let json = format!(r#"{{"volume_id":"","generation":0,"state":"{s}","sync_id":0}}"#);
            let m: Meta = serde_json::from_str(&json).expect("parse");
            assert_eq!(m.state, want);
            assert_eq!(want.as_str(), s);
            let back = serde_json::to_value(&m).expect("ser");
            assert_eq!(back["state"], s);
        }
    }

    #[test]
    fn unknown_copy_state_names_the_file() {
        let dir = std::env::temp_dir().join(format!("mfs-meta-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(
            dir.join("volume.json"),
            br#"{"volume_id":"","generation":0,"state":"weird","sync_id":0}"#,
        )
        .expect("write");
        let e = read_meta(&dir).expect_err("unknown state");
        assert!(format!("{e:#}").contains("volume.json"), "{e:#}");
        assert!(format!("{e:#}").contains("weird"), "{e:#}");
        let _ = fs::remove_dir_all(&dir);
    }
}
