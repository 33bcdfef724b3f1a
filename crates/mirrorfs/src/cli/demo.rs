//! `mirrorfs demo`: a self-contained demonstration on temporary directories.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

struct DemoMount {
    child: Option<Child>,
}

impl Drop for DemoMount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill with a valid pid of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(t0.elapsed())
}

pub fn demo() -> Result<()> {
    let base = std::env::temp_dir().join(format!("mirrorfs-demo-{}", std::process::id()));
    let (backing, mnt, mirror) = (base.join("backing"), base.join("mnt"), base.join("mirror"));
    for d in [&backing, &mnt, &mirror] {
        fs::create_dir_all(d)?;
    }
    fs::write(
        backing.join("already-here.txt"),
        b"this file existed before the mount\n",
    )?;
    let exe = std::env::current_exe()?;
    println!("== mirrorfs demo in {}", base.display());
    println!(
        "$ mirrorfs mount {} {} --mirror {}",
        backing.display(),
        mnt.display(),
        mirror.display()
    );
    let child = Command::new(&exe)
        .arg("mount")
        .arg(&backing)
        .arg(&mnt)
        .arg("--mirror")
        .arg(&mirror)
        .stdin(Stdio::null())
        .spawn()?;
    let mut guard = DemoMount { child: Some(child) };
    wait_for("the mount", Duration::from_secs(20), || {
        crate::sys::is_mountpoint(&mnt)
    })?;
    let lag = wait_for("the initial sync", Duration::from_secs(20), || {
        fs::read(mirror.join("already-here.txt")).ok().as_deref()
            == Some(&b"this file existed before the mount\n"[..])
    })?;
    println!(
        "mounted. The live initial sync copied the existing file to the mirror within {:.1} ms: {:?}",
        lag.as_secs_f64() * 1e3,
        fs::read_to_string(mirror.join("already-here.txt"))?.trim()
    );

    let t = Instant::now();
    fs::write(mnt.join("hello.txt"), b"hello, mirror\n")?;
    let lag = wait_for("hello.txt on the mirror", Duration::from_secs(10), || {
        fs::read(mirror.join("hello.txt")).ok().as_deref() == Some(b"hello, mirror\n")
    })?;
    println!("wrote hello.txt through the mount; identical on the mirror {:.2} ms after close ({:.2} ms incl. write)", lag.as_secs_f64() * 1e3, t.elapsed().as_secs_f64() * 1e3);

    fs::create_dir_all(mnt.join("project/src"))?;
    for i in 0..200 {
        fs::write(
            mnt.join(format!("project/src/file{i:03}.rs")),
            format!("// file {i}\nfn main() {{}}\n"),
        )?;
    }
    fs::rename(
        mnt.join("project/src/file000.rs"),
        mnt.join("project/main.rs"),
    )?;
    std::os::unix::fs::symlink("src/file001.rs", mnt.join("project/link.rs"))?;
    fs::hard_link(
        mnt.join("project/src/file002.rs"),
        mnt.join("project/hard.rs"),
    )?;
    let lag = wait_for("200 files on the mirror", Duration::from_secs(20), || {
        mirror.join("project/hard.rs").exists()
    })?;
    println!("created 200 files, renamed one, added a symlink and a hard link; mirror caught up {:.2} ms after the last change", lag.as_secs_f64() * 1e3);

    println!("$ mirrorfs status {}", mnt.display());
    std::thread::sleep(Duration::from_millis(600));
    let _ = Command::new(&exe).arg("status").arg(&mnt).status();

    println!("$ (unmount: SIGTERM)");
    drop(guard.child.take().map(|mut c| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait()
    }));
    let out = Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg("--exclude=.mirrorfs")
        .arg(&backing)
        .arg(&mirror)
        .output();
    match out {
        Ok(o) if o.status.success() => println!("diff -r backing mirror: identical"),
        Ok(o) => println!(
            "diff -r backing mirror found differences:\n{}",
            String::from_utf8_lossy(&o.stdout)
        ),
        Err(e) => println!("(diff not available: {e})"),
    }
    fs::remove_dir_all(&base)?;
    println!("== demo done; temporary directories removed");
    Ok(())
}
