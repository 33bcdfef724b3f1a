//! A site: the order lock and the journal that every change passes through (`volume`), the
//! journal's files (`store`), and the state a site keeps beside them: its identity (`meta`), its
//! state files (`statefile`), the lock on its directories (`dirlock`), power-loss detection
//! (`boot`), the witness's write fence (`fence`), the status it publishes (`status`), the conflicts a reintegration left
//! (`conflicts`), the implicit groups of `--fsync-groups` (`sync_groups`), the write tokens of
//! two writable sites (`tokens`), what a writable site keeps about its peer (`peer`) and the backing directory's stamp that tells a mount of changes
//! made behind its back (`stamp`).

pub mod boot;
pub mod conflicts;
pub mod dirlock;
pub mod engine;
pub mod fence;
pub mod meta;
pub mod metrics;
pub mod peer;
pub mod promote;
pub mod reconcile;
pub mod stamp;
pub mod state_dir;
pub mod statefile;
pub mod status;
pub mod store;
pub mod sync_groups;
pub mod tokens;
pub mod verify_dirty;
pub mod volume;
