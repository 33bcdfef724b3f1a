//! `--targets fio` (issue 9): a few standard `fio` jobs against the native directory, bindfs
//! and mirrorfs with one local mirror, side by side in one run, each figure's ratio to native.
//!
//! Jobs (`--ioengine=psync`, buffered, one fresh directory per job and target; fio lays its
//! files out before it starts timing): 4 KiB random writes with 1 and with 4 jobs (each job its
//! own file), 4 KiB random reads from a cold cache (the file laid out by a first fio run with
//! `create_only=1`, then `sync; echo 3 > /proc/sys/vm/drop_caches`, so that neither the
//! mount's nor the backing file's pages are cached) and 1 MiB sequential writes with
//! `end_fsync=1`. Each job stops when its size is done or after
//! its time limit, whichever comes first; the figures are fio's own (`--output-format=json`,
//! `--group_reporting`). After the jobs on mirrorfs, the mirror must hold the same files as
//! the backing directory, byte for byte, or the run fails.
//!
//! A machine without fio reports the target as skipped, with the command that installs it.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::mounts::Mount;
use crate::report::{fmt_num, render_markdown, render_plain};
use crate::workloads::{drop_caches, mirror_catch_up, sync_all};

/// How long the mirror may take to hold what the jobs wrote.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);

/// What a job's figure counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Iops,
    MibPerS,
}

impl Unit {
    fn label(self) -> &'static str {
        match self {
            Unit::Iops => "IOPS",
            Unit::MibPerS => "MiB/s",
        }
    }
}

/// One fio job.
struct Job {
    /// fio's job name, also its directory's.
    name: &'static str,
    label: &'static str,
    rw: &'static str,
    bs: &'static str,
    numjobs: u32,
    /// Per fio job (each of `numjobs` has a file this size).
    size_mib: u64,
    end_fsync: bool,
    /// Lay the files out first, then drop every cache, then run the timed job.
    cold: bool,
    unit: Unit,
}

/// MiB of the random jobs' files and of the sequential job's file.
fn sizes_mib(quick: bool) -> (u64, u64) {
    if quick {
        (32, 64)
    } else {
        (256, 1024)
    }
}

/// The longest a job runs (fio's `--runtime`), so that a slow target still ends.
fn runtime_s(quick: bool) -> u64 {
    if quick {
        10
    } else {
        60
    }
}

fn jobs(quick: bool) -> Vec<Job> {
    let (rand_mib, seq_mib) = sizes_mib(quick);
    vec![
        Job {
            name: "randwrite-4k-1",
            label: "4 KiB random write, 1 job",
            rw: "randwrite",
            bs: "4k",
            numjobs: 1,
            size_mib: rand_mib,
            end_fsync: false,
            cold: false,
            unit: Unit::Iops,
        },
        Job {
            name: "randwrite-4k-4",
            label: "4 KiB random write, 4 jobs",
            rw: "randwrite",
            bs: "4k",
            numjobs: 4,
            size_mib: rand_mib / 4,
            end_fsync: false,
            cold: false,
            unit: Unit::Iops,
        },
        Job {
            name: "randread-4k-1",
            label: "4 KiB random read, 1 job",
            rw: "randread",
            bs: "4k",
            numjobs: 1,
            size_mib: rand_mib,
            end_fsync: false,
            cold: true,
            unit: Unit::Iops,
        },
        Job {
            name: "seqwrite-1m-fsync",
            label: "1 MiB sequential write, end_fsync=1",
            rw: "write",
            bs: "1m",
            numjobs: 1,
            size_mib: seq_mib,
            end_fsync: true,
            cold: false,
            unit: Unit::MibPerS,
        },
    ]
}

/// What fio reported for one job (all its processes together).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Figures {
    /// Read and write operations per second.
    pub iops: f64,
    /// Read and written bytes per second.
    pub bytes_per_s: f64,
}

/// Parses fio's `--output-format=json` report: the sum over its `jobs` (one with
/// `--group_reporting`) of the read and write figures. Text fio printed before the JSON
/// (warnings) is skipped; a job that reports an error is an error.
pub fn parse_fio_json(text: &str) -> Result<Figures> {
    let start = text.find('{').context("no JSON object in fio's output")?;
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).context("cannot parse fio's JSON output")?;
    let jobs = v
        .get("jobs")
        .and_then(serde_json::Value::as_array)
        .context("no `jobs` array in fio's JSON output")?;
    if jobs.is_empty() {
        bail!("fio's JSON output has no jobs");
    }
    let mut sum = Figures {
        iops: 0.0,
        bytes_per_s: 0.0,
    };
    for job in jobs {
        let name = job
            .get("jobname")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?");
        let error = job
            .get("error")
            .and_then(serde_json::Value::as_i64)
            .with_context(|| format!("fio job {name}: no numeric `error`"))?;
        if error != 0 {
            bail!("fio job {name} failed with error {error}");
        }
        for dir in ["read", "write"] {
            let d = job
                .get(dir)
                .with_context(|| format!("fio job {name}: no `{dir}` section"))?;
            let num = |k: &str| {
                d.get(k)
                    .and_then(serde_json::Value::as_f64)
                    .with_context(|| format!("fio job {name}: no numeric `{dir}.{k}`"))
            };
            sum.iops += num("iops")?;
            sum.bytes_per_s += num("bw_bytes")?;
        }
    }
    Ok(sum)
}

/// Runs `job` in `dir`; returns fio's figures.
fn run_job(job: &Job, dir: &Path, quick: bool, log: &Path) -> Result<Figures> {
    fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let runtime_s = runtime_s(quick);
    let mut args: Vec<OsString> = vec![
        "--output-format=json".into(),
        format!("--name={}", job.name).into(),
        {
            let mut a = OsString::from("--directory=");
            a.push(dir.as_os_str());
            a
        },
        "--ioengine=psync".into(),
        format!("--rw={}", job.rw).into(),
        format!("--bs={}", job.bs).into(),
        format!("--size={}m", job.size_mib).into(),
        format!("--numjobs={}", job.numjobs).into(),
        "--group_reporting".into(),
        format!("--runtime={runtime_s}").into(),
        "--randseed=42".into(),
    ];
    if job.end_fsync {
        args.push("--end_fsync=1".into());
    }
    if job.cold {
        let mut layout = args.clone();
        layout.push("--create_only=1".into());
        fio(&layout, dir, job)?;
        drop_caches()?;
    } else {
        // Untimed: no job pays for the previous one's writeback.
        sync_all();
    }
    let out = fio(&args, dir, job)?;
    fs::write(log, out.as_bytes()).with_context(|| format!("cannot write {}", log.display()))?;
    parse_fio_json(&out).with_context(|| format!("fio {} in {}", job.name, dir.display()))
}

/// Runs `fio ARGS`; returns its standard output.
fn fio(args: &[OsString], dir: &Path, job: &Job) -> Result<String> {
    let out = Command::new("fio")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run fio")?;
    if !out.status.success() {
        bail!(
            "fio {} in {} failed ({}): {}",
            job.name,
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The figure of `unit` in `f`.
fn value(unit: Unit, f: &Figures) -> f64 {
    match unit {
        Unit::Iops => f.iops,
        Unit::MibPerS => f.bytes_per_s / (1024.0 * 1024.0),
    }
}

/// Runs every job in a fresh directory under `root`; `base` holds the fio logs.
fn run_jobs(jobs: &[Job], root: &Path, base: &Path, quick: bool, what: &str) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for job in jobs {
        crate::check_interrupted()?;
        let f = run_job(
            job,
            &root.join(job.name),
            quick,
            &base.join(format!("{}.json", job.name)),
        )?;
        let v = value(job.unit, &f);
        eprintln!(
            "[fio] {what} {}: {} {}",
            job.name,
            fmt_num(v),
            job.unit.label()
        );
        out.push(v);
    }
    Ok(out)
}

fn native(jobs: &[Job], base: &Path, quick: bool) -> Result<Vec<f64>> {
    let data = base.join("data");
    fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    run_jobs(jobs, &data, base, quick, "native")
}

fn bindfs(jobs: &[Job], base: &Path, quick: bool, extra: &[String]) -> Result<Vec<f64>> {
    let (src, mnt) = (base.join("src"), base.join("mnt"));
    for d in [&src, &mnt] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let mount = Mount::bindfs(&src, &mnt, extra)?;
    let figures = run_jobs(jobs, &mnt, base, quick, "bindfs");
    mount.unmount()?;
    figures
}

fn mirrorfs(jobs: &[Job], bin: &Path, base: &Path, quick: bool) -> Result<Vec<f64>> {
    let dirs: [PathBuf; 4] = ["backing", "mnt", "mirror", "state"].map(|d| base.join(d));
    let [backing, mnt, mirror, state] = &dirs;
    for d in &dirs {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let extra = vec!["--state".to_string(), state.display().to_string()];
    let mount = Mount::mirrorfs(
        bin,
        backing,
        mnt,
        mirror.as_os_str(),
        &extra,
        &base.join("mirrorfs.log"),
    )?;
    let figures = run_jobs(jobs, mnt, base, quick, "mirrorfs");
    let names: Vec<&str> = jobs.iter().map(|j| j.name).collect();
    let caught_up = match &figures {
        Ok(_) => mirror_catch_up(backing, mirror, &names, CATCH_UP_TIMEOUT).map(|_| ()),
        Err(_) => Ok(()),
    };
    mount.unmount()?;
    let figures = figures?;
    caught_up.context("the mirror does not hold what fio wrote")?;
    Ok(figures)
}

/// Runs the target: one table, a column per target and ratios to native.
pub fn run(
    bin: &Path,
    run_dir: &Path,
    markdown: bool,
    quick: bool,
    bindfs_args: &[String],
) -> Result<()> {
    let version = match Command::new("fio").arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => {
            eprintln!("[fio] SKIPPED: fio is not installed (apt-get install -y fio)");
            println!("fio: skipped, fio is not installed (apt-get install -y fio)");
            return Ok(());
        }
    };
    let jobs = jobs(quick);
    let base = run_dir.join("fio");
    let native = native(&jobs, &base.join("native"), quick)?;
    // A FUSE target that cannot be set up leaves its column empty; the others still run.
    let fuse: [(&str, Result<Vec<f64>>); 2] = [
        (
            "bindfs",
            bindfs(&jobs, &base.join("bindfs"), quick, bindfs_args),
        ),
        (
            "mirrorfs",
            mirrorfs(&jobs, bin, &base.join("mirrorfs"), quick),
        ),
    ];
    crate::check_interrupted()?;
    let mut header = vec!["job".to_string(), "unit".to_string(), "native".to_string()];
    for (name, r) in &fuse {
        if let Err(e) = r {
            eprintln!("[fio] {name} SKIPPED: {e:#}");
        }
        header.push((*name).to_string());
        header.push("× native".to_string());
    }
    let mut rows = vec![header];
    for (i, job) in jobs.iter().enumerate() {
        let mut row = vec![
            job.label.to_string(),
            job.unit.label().to_string(),
            fmt_num(native[i]),
        ];
        for (_, r) in &fuse {
            match r {
                Ok(v) => {
                    row.push(fmt_num(v[i]));
                    row.push(format!("{:.2}", v[i] / native[i]));
                }
                Err(_) => {
                    row.push("skipped".to_string());
                    row.push("-".to_string());
                }
            }
        }
        rows.push(row);
    }
    let (rand_mib, seq_mib) = sizes_mib(quick);
    println!(
        "{version}, psync, buffered: random 4 KiB on {rand_mib} MiB (4 jobs: {} MiB each), \
         sequential 1 MiB on {seq_mib} MiB; each job at most {} s; mirrorfs with one local mirror",
        rand_mib / 4,
        runtime_s(quick)
    );
    if markdown {
        print!("{}", render_markdown(&rows));
    } else {
        print!("{}", render_plain(&rows));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fio 3.33's `--output-format=json --group_reporting` report of
    /// `--name=randwrite-4k-4 --rw=randwrite --bs=4k --ioengine=psync --size=8m --numjobs=4`,
    /// cut to the fields around the ones read, after a warning line as fio prints them.
    const SAMPLE: &str = r#"fio: file hash not empty on exit
{
  "fio version" : "fio-3.33",
  "timestamp" : 1796689154,
  "time" : "Tue Dec  8 00:19:14 2026",
  "global options" : {},
  "jobs" : [
    {
      "jobname" : "randwrite-4k-4",
      "groupid" : 0,
      "error" : 0,
      "eta" : 2147483647,
      "elapsed" : 1,
      "job options" : {
        "name" : "randwrite-4k-4",
        "directory" : "/var/tmp/fiotry",
        "rw" : "randwrite",
        "bs" : "4k",
        "ioengine" : "psync",
        "size" : "8m",
        "numjobs" : "4",
        "runtime" : "10",
        "randseed" : "42"
      },
      "read" : {
        "io_bytes" : 0,
        "io_kbytes" : 0,
        "bw_bytes" : 0,
        "bw" : 0,
        "iops" : 0.000000,
        "runtime" : 0,
        "total_ios" : 0,
        "short_ios" : 0,
        "drop_ios" : 0
      },
      "write" : {
        "io_bytes" : 33554432,
        "io_kbytes" : 32768,
        "bw_bytes" : 883011368,
        "bw" : 862315,
        "iops" : 215578.947368,
        "runtime" : 38,
        "total_ios" : 8192,
        "short_ios" : 0,
        "drop_ios" : 0
      },
      "trim" : {
        "io_bytes" : 0,
        "io_kbytes" : 0,
        "bw_bytes" : 0,
        "bw" : 0,
        "iops" : 0.000000,
        "runtime" : 0,
        "total_ios" : 0,
        "short_ios" : 0,
        "drop_ios" : 0
      },
      "job_runtime" : 103,
      "usr_cpu" : 8.737864,
      "sys_cpu" : 14.563107
    }
  ]
}
"#;

    #[test]
    fn fio_json_figures() -> Result<()> {
        let f = parse_fio_json(SAMPLE)?;
        assert!((f.iops - 215_578.947_368).abs() < 1e-6, "{f:?}");
        assert!((f.bytes_per_s - 883_011_368.0).abs() < 1e-6, "{f:?}");
        assert!(
            (value(Unit::MibPerS, &f) - 842.105_263).abs() < 1e-3,
            "{f:?}"
        );
        Ok(())
    }

    #[test]
    fn fio_json_sums_jobs_without_group_reporting() -> Result<()> {
        let one: serde_json::Value =
            serde_json::from_str(&SAMPLE[SAMPLE.find('{').unwrap_or(0)..])?;
        let mut two = one.clone();
        let jobs = one["jobs"].as_array().context("jobs")?.clone();
        two["jobs"] = serde_json::Value::Array([jobs.clone(), jobs].concat());
        let f = parse_fio_json(&two.to_string())?;
        assert!((f.iops - 2.0 * 215_578.947_368).abs() < 1e-6, "{f:?}");
        assert!((f.bytes_per_s - 2.0 * 883_011_368.0).abs() < 1e-6, "{f:?}");
        Ok(())
    }

    #[test]
    fn fio_json_refuses_errors_and_missing_fields() {
        let failed = SAMPLE.replace(r#""error" : 0"#, r#""error" : 5"#);
        let e = parse_fio_json(&failed).err().map(|e| format!("{e:#}"));
        assert!(e.as_deref().is_some_and(|e| e.contains("error 5")), "{e:?}");
        let no_iops = SAMPLE.replace(r#""iops" : 215578.947368,"#, "");
        let e = parse_fio_json(&no_iops).err().map(|e| format!("{e:#}"));
        assert!(
            e.as_deref().is_some_and(|e| e.contains("write.iops")),
            "{e:?}"
        );
        assert!(parse_fio_json("fio: no jobs").is_err());
        assert!(parse_fio_json(r#"{"jobs": []}"#).is_err());
    }
}
