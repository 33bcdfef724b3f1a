//! `--targets sqlite`: the transaction rate of SQLite with `synchronous=FULL` (issue 9), one
//! insert and one update per transaction, each transaction fsynced by SQLite, on the native
//! directory and through mirrorfs with one local mirror, per `--ack` and `--fsync-waits`, in
//! both journal modes (rollback `DELETE` and `WAL`), side by side in one run; each row's ratio
//! is to native in the same journal mode.
//!
//! It drives the `sqlite3` command-line shell (Debian's `sqlite3` package): one process per
//! row, its statements on stdin, timed from the first transaction to the last (the schema is
//! made before). After each mirrorfs row the mount is stopped and the mirror's copy of the
//! database is opened: `PRAGMA integrity_check` must say `ok` and every row must be there, or
//! the run fails.

use std::ffi::OsString;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::mounts::Mount;
use crate::report::{fmt_num, render_markdown, render_plain};

/// The configurations measured through mirrorfs: `--ack` and `--fsync-waits`.
const CONFIGS: [(&str, &str); 4] = [
    ("async", "mode"),
    ("async", "quorum"),
    ("durable", "mode"),
    ("sync", "mode"),
];
const JOURNAL_MODES: [&str; 2] = ["delete", "wal"];

/// Runs the target: a table of transactions per second and ratios to native.
pub fn run(bin: &Path, run_dir: &Path, markdown: bool, quick: bool) -> Result<()> {
    let have = Command::new("sqlite3").arg("-version").output();
    if !have.is_ok_and(|o| o.status.success()) {
        bail!("the sqlite target needs the sqlite3 shell (Debian: apt install sqlite3)");
    }
    let tx = if quick { 200 } else { 1_000 };
    let mut rows = vec![vec![
        "journal".to_string(),
        "target".to_string(),
        "tx/s".to_string(),
        "× native".to_string(),
    ]];
    for journal in JOURNAL_MODES {
        crate::check_interrupted()?;
        let dir = run_dir.join(format!("sqlite-native-{journal}"));
        fs::create_dir_all(&dir)?;
        let native = transactions(&dir.join("db"), journal, tx)?;
        eprintln!("[sqlite] {journal} native: {native:.0} tx/s");
        rows.push(vec![
            journal.into(),
            "native".into(),
            fmt_num(native),
            "1.00".into(),
        ]);
        for (ack, waits) in CONFIGS {
            crate::check_interrupted()?;
            let rate = through_mirrorfs(bin, run_dir, journal, ack, waits, tx)?;
            eprintln!(
                "[sqlite] {journal} mirrorfs --ack {ack} --fsync-waits {waits}: {rate:.0} tx/s"
            );
            rows.push(vec![
                journal.into(),
                format!("mirrorfs `--ack {ack} --fsync-waits {waits}`"),
                fmt_num(rate),
                format!("{:.2}", rate / native),
            ]);
        }
    }
    println!(
        "SQLite, synchronous=FULL, {tx} transactions of one insert + one update, one local mirror"
    );
    if markdown {
        print!("{}", render_markdown(&rows));
    } else {
        print!("{}", render_plain(&rows));
    }
    Ok(())
}

/// One mirrorfs row: mount over a fresh backing directory with a fresh local mirror, run the
/// transactions, unmount, and check the mirror's copy of the database.
fn through_mirrorfs(
    bin: &Path,
    run_dir: &Path,
    journal: &str,
    ack: &str,
    waits: &str,
    tx: u64,
) -> Result<f64> {
    let base = run_dir.join(format!("sqlite-{journal}-{ack}-{waits}"));
    let (backing, mnt, mirror, state) = (
        base.join("backing"),
        base.join("mnt"),
        base.join("mirror"),
        base.join("state"),
    );
    for d in [&backing, &mnt, &mirror, &state] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let extra: Vec<String> = ["--ack", ack, "--fsync-waits", waits, "--state"]
        .iter()
        .map(|s| s.to_string())
        .chain([state.display().to_string()])
        .collect();
    let mount = Mount::mirrorfs(
        bin,
        &backing,
        &mnt,
        &OsString::from(&mirror),
        &extra,
        &base.join("mirrorfs.log"),
    )?;
    let rate = transactions(&mnt.join("db"), journal, tx);
    mount.unmount()?;
    let rate = rate?;
    check_copy(&mirror.join("db"), tx)?;
    Ok(rate)
}

/// Makes the database at `db` in `journal` mode, then runs `tx` transactions; returns
/// transactions per second.
fn transactions(db: &Path, journal: &str, tx: u64) -> Result<f64> {
    let schema = format!(
        "PRAGMA journal_mode={journal};\nCREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER, v TEXT);\n"
    );
    sqlite(db, &schema)?;
    let mut script = String::from("PRAGMA synchronous=FULL;\n");
    for i in 1..=tx {
        script.push_str(&format!(
            "BEGIN;\nINSERT INTO t(id, n, v) VALUES({i}, 0, printf('%.200c', 'x'));\nUPDATE t SET n = n + 1 WHERE id = {};\nCOMMIT;\n",
            i.div_ceil(2)
        ));
    }
    let t0 = Instant::now();
    sqlite(db, &script)?;
    let took = t0.elapsed().max(Duration::from_micros(1));
    Ok(tx as f64 / took.as_secs_f64())
}

/// Runs `script` in the sqlite3 shell on `db` (bailing on the first error); returns its output.
fn sqlite(db: &Path, script: &str) -> Result<String> {
    let mut child = Command::new("sqlite3")
        .args(["-bail", "-batch"])
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run sqlite3")?;
    child
        .stdin
        .take()
        .context("sqlite3 stdin")?
        .write_all(script.as_bytes())
        .context("cannot write to sqlite3")?;
    let out = child.wait_with_output().context("sqlite3")?;
    if !out.status.success() {
        bail!(
            "sqlite3 on {} failed: {}",
            db.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The mirror's copy opens, passes `integrity_check` and holds all `tx` rows.
fn check_copy(db: &Path, tx: u64) -> Result<()> {
    let out = sqlite(db, "PRAGMA integrity_check;\nSELECT count(*) FROM t;\n")?;
    let lines: Vec<&str> = out.lines().collect();
    if lines != ["ok", &tx.to_string()] {
        bail!(
            "the mirror's copy {} is not whole: integrity_check and row count gave {lines:?}, want [\"ok\", \"{tx}\"]",
            db.display()
        );
    }
    Ok(())
}
