//! The seeded write-token simulation (see `mirrorfs_core::sim::run_tokens_seed`): two writable
//! sites exchange token messages and journal records over an ordered link that is cut and
//! restored, both write a few objects at once (also two objects in one change, as a rename or a
//! link takes both names' tokens; and through two names of one hard-linked file, each write also
//! taking the shared token of hard-linked files), and either site crashes (also between a
//! `Persist` and the action after it) and recovers its token table; under `--partition quorum`
//! (a third of the seeds) a witness grants the partition lease, and partitions isolate either
//! site or the witness; the invariants are checked after every step and at the final heal.
//!
//! ```text
//! cargo test --release -p mirrorfs-core --test sim_tokens -- --nocapture           # seeds 0..300
//! MIRRORFS_SIM_TOKENS_SEEDS=10000 cargo test --release -p mirrorfs-core --test sim_tokens
//! MIRRORFS_SIM_TOKENS_SEED=42 cargo test --release -p mirrorfs-core --test sim_tokens -- --nocapture
//! ```
//! `MIRRORFS_SIM_TOKENS_STEPS` changes the steps per seed (default 3000); with
//! `MIRRORFS_SIM_TOKENS_SEED`, `MIRRORFS_SIM_TOKENS_TRACE=1` prints every event of that seed.

use std::time::Instant;

mod common;

use common::{env_num, one_seed};
use mirrorfs_core::sim::{run_tokens_seed, trace_tokens_seed, TokensStats};

const DEFAULT_SEEDS: u64 = 300;
const DEFAULT_STEPS: u64 = 3000;

#[test]
fn seeded_write_token_simulation() {
    let steps = env_num("MIRRORFS_SIM_TOKENS_STEPS").unwrap_or(DEFAULT_STEPS) as usize;
    let seeds: Vec<u64> = match env_num("MIRRORFS_SIM_TOKENS_SEED") {
        Some(s) => vec![s],
        None => (0..env_num("MIRRORFS_SIM_TOKENS_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect(),
    };
    if seeds.len() == 1 && std::env::var_os("MIRRORFS_SIM_TOKENS_TRACE").is_some() {
        let (r, log) = trace_tokens_seed(seeds[0], steps);
        for line in &log {
            println!("{line}");
        }
        println!("{r:?}");
    }
    let start = Instant::now();
    let mut total = TokensStats::default();
    let mut failures: Vec<(u64, String)> = Vec::new();
    for &seed in &seeds {
        match one_seed(seed, || run_tokens_seed(seed, steps)) {
            Ok(s) => total += s,
            Err(e) => failures.push((seed, e)),
        }
    }
    println!(
        "sim_tokens: {} seeds, {} writes ({} in {} two-object changes, {} in {} writes through a hard link; {} with the token, {} unguarded across a split), refused: {} read-only, {} timed out, {} table or queue full; {} lost with a crashed site; {} grants delivered, {} crashes ({} between two actions of a batch), {} link cuts; longest wait {} ms; split writes reconciled: {} concurrent peer records ({} skipped by the winner, {} copies aside by the loser); quorum: {} seeds, {} leases granted, {} isolations, {} witness restarts, {} writes during splits (all at the lease holder), {} refused for the quorum (EROFS), {} concurrent peer records reconciled; in {:.1} s; {} failed",
        total.seeds,
        total.writes,
        2 * total.pairs,
        total.pairs,
        2 * total.linked,
        total.linked,
        total.guarded,
        total.unguarded,
        total.refused_read_only,
        total.refused_timeout,
        total.refused_full,
        total.lost_with_crash,
        total.grants,
        total.crashes,
        total.crashes_mid_batch,
        total.disconnects,
        total.wait_max_ms,
        total.concurrent,
        total.skipped,
        total.copies,
        total.quorum_seeds,
        total.lease_grants,
        total.isolations,
        total.witness_crashes,
        total.split_writes,
        total.refused_no_quorum,
        total.quorum_concurrent,
        start.elapsed().as_secs_f64(),
        failures.len()
    );
    if let Some((seed, first)) = failures.first() {
        for (s, e) in failures.iter().take(10) {
            eprintln!("FAILED seed {s}: {e}");
        }
        panic!(
            "{} of {} seeds failed; first, seed {seed}: {first}\nreplay: MIRRORFS_SIM_TOKENS_SEED={seed} cargo test --release -p mirrorfs-core --test sim_tokens -- --nocapture",
            failures.len(),
            seeds.len()
        );
    }
    assert!(total.writes > 0 || seeds.is_empty(), "no write ran");
    assert!(
        total.pairs > 0 || seeds.len() < 10,
        "no two-object change ran"
    );
    assert!(
        total.linked > 0 || seeds.len() < 10,
        "no write through a hard link ran"
    );
    assert!(
        total.grants > 0 || seeds.is_empty(),
        "no token changed hands"
    );
    // Invariant 6 is not vacuous over the default seeds (a single seed may have no split write).
    assert!(
        total.concurrent > 0 || seeds.len() < 100,
        "no concurrent write was reconciled"
    );
    // The quorum's invariants are not vacuous either: the majority wrote during splits, the
    // minority was refused.
    if seeds.len() >= 100 {
        assert!(total.quorum_seeds > 0, "no seed ran the quorum");
        assert!(total.lease_grants > 0, "the witness granted no lease");
        assert!(total.split_writes > 0, "nobody wrote during a split");
        assert!(
            total.refused_no_quorum > 0,
            "no write was refused for the quorum"
        );
    }
}

/// Seeds that found a bug, replayed on every run. 1873 and 1954: a change of two objects took
/// its first token without it in majority, waited for the second and got it after the majority
/// had ended; the first object was written without its token and without the witness's lease
/// (fixed: `core::quorum::Decision::goes_together`, checked when the last token is taken).
#[test]
fn seeds_that_found_bugs() {
    for seed in [1873, 1954] {
        let r = run_tokens_seed(seed, DEFAULT_STEPS as usize);
        assert!(r.is_ok(), "seed {seed}: {r:?}");
    }
}
