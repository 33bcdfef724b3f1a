//! Power-loss detection: the boot a state directory last ran in, and whether it stopped cleanly.
//!
//! A state directory records the kernel's boot id when a run starts (`STATE/boot_id`) and leaves
//! `STATE/clean` when it stops cleanly. A later start that finds another boot id and no `clean`
//! knows the machine lost power (or crashed) in between, so unsynced writes may be gone: the
//! cursors then trust only their last checkpoint (`docs/journal.md`). Used by the mount and by the
//! mirror daemon alike.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::site::state_dir::StateDir;
use crate::site::statefile;

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether this machine lost power (or crashed) since mirrorfs last ran with `state`: the boot
/// id changed and the previous run did not stop cleanly. Changes nothing: call [`record_boot`]
/// once every cursor has been opened (and so has taken the power loss into account), so that a
/// start killed before that still knows about the power loss next time.
pub fn power_lost(state: &Path) -> bool {
    let last_boot = fs::read_to_string(StateDir::at(state).boot_id_file()).unwrap_or_default();
    let clean = StateDir::at(state).is_clean();
    !clean && !last_boot.is_empty() && last_boot.trim() != boot_id()
}

/// Records this boot as the one mirrorfs runs in, and that the run is not (yet) clean: both
/// durable (S5 in docs/journal.md). A `clean` marker whose removal a power loss undid would make
/// the next start trust unsynced cursors and skip the in-doubt record's resolution. The boot id
/// is overwritten in place, so a full disk does not stop a start; a torn one reads as another
/// boot, which is the safe side.
pub fn record_boot(state: &Path) -> Result<()> {
    let sd = StateDir::at(state);
    sd.clear_clean()
        .with_context(|| format!("cannot remove {}", state.join("clean").display()))?;
    statefile::overwrite_durable(&sd.boot_id_file(), boot_id().as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", sd.boot_id_file().display()))
}
