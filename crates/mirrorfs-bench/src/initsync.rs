//! `--targets initsync`: the initial copy of a tree of small files (issue 9: 100,000 files of
//! 1–8 KiB in 1,000 directories) to an empty local mirror, against `rsync -a` of the same tree
//! to an empty directory, side by side in one run; the ratio is mirrorfs's time over rsync's
//! (target ≤ 0.8).
//!
//! The tree is made once on the local disk (not timed, then `sync`), so both copies read it
//! from a warm page cache. rsync: `rsync -a SRC/ DST/`, timed from its start to its exit.
//! mirrorfs: `mirrorfs mount SRC MNT --mirror EMPTY --state STATE`, timed from the start of the
//! process until its `STATE/status.json` says the mirror is `live` (the copy's `SyncDone`
//! applied; the file is refreshed every 250 ms, so the figure can be up to that late). Neither
//! time includes a final `sync`. The mirror is then compared with the tree (entries, sizes and
//! contents) and the run fails if they differ.

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::mounts::Mount;
use crate::report::{fmt_num, render_markdown, render_plain};
use crate::workloads::{mirror_catch_up, random_buf, sync_all};

/// Files per directory of the tree.
const PER_DIR: u64 = 100;
/// Longest wait for the mirror to become live.
const LIVE_TIMEOUT: Duration = Duration::from_secs(1800);

/// Runs the target: rsync's time, mirrorfs's time and their ratio.
pub fn run(bin: &Path, run_dir: &Path, markdown: bool, files: u64, seed: u64) -> Result<()> {
    let have = Command::new("rsync").arg("--version").output();
    if !have.is_ok_and(|o| o.status.success()) {
        bail!("the initsync target needs rsync (Debian: apt install rsync)");
    }
    let base = run_dir.join("initsync");
    let src = base.join("src");
    let dirs = make_tree(&src, files, seed)?;
    sync_all();
    let rsync = time_rsync(&src, &base.join("rsync-dst"))?;
    eprintln!("[initsync] rsync -a: {:.3} s", rsync.as_secs_f64());
    sync_all();
    let mirrorfs = time_mirrorfs(bin, &base, &src, &dirs)?;
    eprintln!(
        "[initsync] mirrorfs initial copy: {:.3} s",
        mirrorfs.as_secs_f64()
    );
    let ratio = mirrorfs.as_secs_f64() / rsync.as_secs_f64();
    let rows = vec![
        vec!["copy".to_string(), "s".to_string(), "× rsync".to_string()],
        vec![
            "`rsync -a SRC/ EMPTY/`".to_string(),
            fmt_num(rsync.as_secs_f64()),
            "1.00".to_string(),
        ],
        vec![
            "mirrorfs initial copy to an empty local mirror (until `live`)".to_string(),
            fmt_num(mirrorfs.as_secs_f64()),
            format!("{ratio:.2} (target ≤ 0.80)"),
        ],
    ];
    println!(
        "Initial copy of {files} files of 1-8 KiB, {PER_DIR} to a directory ({} directories)",
        dirs.len()
    );
    if markdown {
        print!("{}", render_markdown(&rows));
    } else {
        print!("{}", render_plain(&rows));
    }
    Ok(())
}

/// `files` files of 1–8 KiB (sizes and bytes from `seed`), `PER_DIR` to a directory; returns
/// the directory names.
fn make_tree(src: &Path, files: u64, seed: u64) -> Result<Vec<String>> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let data = random_buf(8192, seed);
    let mut dirs = Vec::new();
    for i in 0..files {
        crate::check_interrupted()?;
        if i % PER_DIR == 0 {
            let name = format!("d{:05}", i / PER_DIR);
            fs::create_dir_all(src.join(&name))
                .with_context(|| format!("cannot create {name} in {}", src.display()))?;
            dirs.push(name);
        }
        let len = rng.gen_range(1024..=8192);
        let dir = dirs.last().context("no directory")?;
        let path = src.join(dir).join(format!("f{i:06}"));
        fs::write(&path, &data[..len])
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dirs)
}

fn time_rsync(src: &Path, dst: &Path) -> Result<Duration> {
    let mut from = OsString::from(src);
    from.push("/");
    let mut to = OsString::from(dst);
    to.push("/");
    let t0 = Instant::now();
    let out = Command::new("rsync")
        .arg("-a")
        .arg(&from)
        .arg(&to)
        .output()
        .context("cannot run rsync")?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!(
            "rsync -a failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

/// Mounts `src` with a new, empty local mirror; the time from the start of the process until
/// its status says the mirror is live. Checks the mirror against `src` afterwards (not timed).
fn time_mirrorfs(bin: &Path, base: &Path, src: &Path, dirs: &[String]) -> Result<Duration> {
    let (mnt, mirror, state) = (base.join("mnt"), base.join("mirror"), base.join("state"));
    for d in [&mnt, &mirror, &state] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let extra = vec!["--state".to_string(), state.display().to_string()];
    let status = state.join("status.json");
    let t0 = Instant::now();
    let mount = Mount::mirrorfs(
        bin,
        src,
        &mnt,
        &OsString::from(&mirror),
        &extra,
        &base.join("mirrorfs.log"),
    )?;
    let took = loop {
        crate::check_interrupted()?;
        if mirror_live(&status) {
            break t0.elapsed();
        }
        if t0.elapsed() > LIVE_TIMEOUT {
            bail!(
                "the mirror was not live {} s after the mount started",
                LIVE_TIMEOUT.as_secs()
            );
        }
        sleep(Duration::from_millis(10));
    };
    let names: Vec<&str> = dirs.iter().map(String::as_str).collect();
    let same = mirror_catch_up(src, &mirror, &names, Duration::from_secs(10));
    mount.unmount()?;
    same.context("the mirror differs from the tree once live")?;
    Ok(took)
}

/// Whether every mirror in a mirrorfs `status.json` is `live`.
fn mirror_live(status_json: &Path) -> bool {
    let Ok(bytes) = fs::read(status_json) else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return false;
    };
    let Some(mirrors) = v.get("mirrors").and_then(serde_json::Value::as_array) else {
        return false;
    };
    !mirrors.is_empty()
        && mirrors
            .iter()
            .all(|m| m.get("state").and_then(serde_json::Value::as_str) == Some("live"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_only_when_every_mirror_says_so() -> Result<()> {
        let d = tempfile::tempdir()?;
        let p = d.path().join("status.json");
        assert!(!mirror_live(&p));
        fs::write(&p, r#"{"mirrors":[{"state":"live"},{"state":"syncing"}]}"#)?;
        assert!(!mirror_live(&p));
        fs::write(&p, r#"{"mirrors":[{"state":"live"},{"state":"live"}]}"#)?;
        assert!(mirror_live(&p));
        fs::write(&p, r#"{"mirrors":[]}"#)?;
        assert!(!mirror_live(&p));
        Ok(())
    }

    #[test]
    fn the_tree_has_the_files_asked_for() -> Result<()> {
        let d = tempfile::tempdir()?;
        let dirs = make_tree(d.path(), 250, 1)?;
        assert_eq!(dirs, ["d00000", "d00001", "d00002"]);
        let n: usize = dirs
            .iter()
            .map(|x| fs::read_dir(d.path().join(x)).map(|r| r.count()))
            .sum::<std::io::Result<usize>>()?;
        assert_eq!(n, 250);
        let len = fs::metadata(d.path().join("d00002").join("f000249"))?.len();
        assert!((1024..=8192).contains(&len));
        Ok(())
    }
}
