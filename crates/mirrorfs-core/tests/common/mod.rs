//! What the simulation tests share: their environment knobs and how one seed's panic is
//! reported.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// The number in environment variable `name`, if set; a value that is not one stops the test.
pub fn env_num(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={v:?} is not a number: {e}"),
    }
}

/// Runs one seed; a panic inside the simulation is reported like a failed invariant.
pub fn one_seed<T>(seed: u64, run: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Err(format!("seed {seed}: panicked: {msg}"))
        }
    }
}
