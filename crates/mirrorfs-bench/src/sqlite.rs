//! `--targets sqlite`: the transaction rate of SQLite with `synchronous=FULL` (issue 9), one
//! insert and one update per transaction, each transaction fsynced by SQLite, on the native
//! directory and through mirrorfs with one local mirror and with one network mirror (a
//! `mirrorfs serve` daemon on loopback, set up as the `mirrorfs-net` target does: `net::Site`),
//! per `--ack` and `--fsync-waits`, in both journal modes (rollback `DELETE` and `WAL`), side
//! by side in one run; each row's ratio is to native in the same journal mode.
//!
//! It drives the `sqlite3` command-line shell (Debian's `sqlite3` package): one process per
//! row, its statements on stdin, timed from the first transaction to the last (the schema is
//! made before). After each mirrorfs row the mirror's copy of the database is opened:
//! `PRAGMA integrity_check` must say `ok` and every row must be there, or the run fails. A
//! local mirror is checked once the mount is stopped; a network mirror once the daemon has
//! applied everything the primary's journal holds (its live gauges) and both the mount and
//! the daemon are stopped.

use std::ffi::OsString;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::mounts::Mount;
use crate::net::{make_identities, Identities, Site};
use crate::report::{fmt_num, render_markdown, render_plain};

/// The configurations measured through mirrorfs: `--ack` and `--fsync-waits`.
const CONFIGS: [(&str, &str); 4] = [
    ("async", "mode"),
    ("async", "quorum"),
    ("durable", "mode"),
    ("sync", "mode"),
];
const JOURNAL_MODES: [&str; 2] = ["delete", "wal"];
/// The longest wait for a network mirror to apply everything after a row's transactions.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(300);

/// Where a mirrorfs row's mirror is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mirror {
    /// A directory on this machine (`--mirror DIR`).
    Local,
    /// A `mirrorfs serve` daemon on loopback (`--mirror mirror://127.0.0.1:PORT`).
    Network,
}

impl Mirror {
    fn name(self) -> &'static str {
        match self {
            Mirror::Local => "local",
            Mirror::Network => "network",
        }
    }
}

/// Runs the target: a table of transactions per second and ratios to native.
pub fn run(bin: &Path, run_dir: &Path, markdown: bool, quick: bool) -> Result<()> {
    let have = Command::new("sqlite3").arg("-version").output();
    if !have.is_ok_and(|o| o.status.success()) {
        bail!("the sqlite target needs the sqlite3 shell (Debian: apt install sqlite3)");
    }
    let tx = if quick { 200 } else { 1_000 };
    let ids_dir = run_dir.join("sqlite-identities");
    fs::create_dir_all(&ids_dir).with_context(|| format!("cannot create {}", ids_dir.display()))?;
    let ids = make_identities(bin, &ids_dir).context("cannot make identities")?;
    let mut rows = vec![vec![
        "journal".to_string(),
        "mirror".to_string(),
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
            "-".into(),
            "native".into(),
            fmt_num(native),
            "1.00".into(),
        ]);
        for mirror in [Mirror::Local, Mirror::Network] {
            for (ack, waits) in CONFIGS {
                crate::check_interrupted()?;
                let rate = match mirror {
                    Mirror::Local => through_mirrorfs(bin, run_dir, journal, ack, waits, tx)?,
                    Mirror::Network => {
                        through_network(bin, run_dir, &ids, journal, ack, waits, tx)?
                    }
                };
                eprintln!(
                    "[sqlite] {journal} mirrorfs, {} mirror, --ack {ack} --fsync-waits {waits}: \
                     {rate:.0} tx/s",
                    mirror.name()
                );
                rows.push(vec![
                    journal.into(),
                    mirror.name().into(),
                    format!("mirrorfs `--ack {ack} --fsync-waits {waits}`"),
                    fmt_num(rate),
                    format!("{:.2}", rate / native),
                ]);
            }
        }
    }
    println!(
        "SQLite, synchronous=FULL, {tx} transactions of one insert + one update, one local \
         mirror or one network mirror (`mirrorfs serve` on loopback)"
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

/// One network mirror row: a fresh daemon on loopback and a mount with it as its only mirror
/// (`net::Site`), the transactions, then the daemon's copy of the database checked once it has
/// applied everything and both processes are stopped.
fn through_network(
    bin: &Path,
    run_dir: &Path,
    ids: &Identities,
    journal: &str,
    ack: &str,
    waits: &str,
    tx: u64,
) -> Result<f64> {
    let base = run_dir.join(format!("sqlite-net-{journal}-{ack}-{waits}"));
    let site = Site::start(bin, &base, ids, &["--ack", ack, "--fsync-waits", waits])
        .context("cannot start the network mirror and the mount")?;
    let rate = transactions(&site.mnt().join("db"), journal, tx);
    let converged = match &rate {
        Ok(_) => site.wait_converged(CONVERGE_TIMEOUT).map(|_| ()),
        Err(_) => Ok(()),
    };
    let copy = site.mirror().join("db");
    let closed = site.close();
    let rate = rate?;
    converged?;
    closed?;
    check_copy(&copy, tx)?;
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
