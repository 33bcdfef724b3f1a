//! The emulated WAN of one run: two network namespaces, A and B, each with one TUN device and
//! its loopback, and the router thread between the devices. A has `ADDR_A`, B has `ADDR_B`
//! (point to point: each namespace's only route is to the other side). Every `Wan` makes
//! namespaces of its own (the addresses are the same in every pair: namespaces do not see each
//! other); dropping it stops the router and removes them, which removes their devices.
//!
//! Run a program on one side with `command` (`nsenter --net`: only the network namespace
//! changes, so a FUSE mount made there is seen by the whole machine, unlike `ip netns exec`,
//! which also makes a mount namespace of its own).

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use crate::control::{Control, Direction};
use crate::link::{Impairment, Link};
use crate::router::{self, Report};
use crate::tun;

pub const ADDR_A: &str = "10.201.0.1";
pub const ADDR_B: &str = "10.201.0.2";

/// One end of the emulated link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

pub struct Wan {
    ns: [String; 2],
    stop: Arc<AtomicBool>,
    control: Arc<Control>,
    router: Option<JoinHandle<std::io::Result<Report>>>,
}

impl Wan {
    /// Makes the two namespaces and starts the router: `a_to_b` impairs what A sends, `b_to_a`
    /// what B sends; each direction draws from its own stream of `seed`.
    pub fn start(a_to_b: Impairment, b_to_a: Impairment, seed: u64) -> Result<Wan> {
        a_to_b.check().map_err(anyhow::Error::msg).context("A→B")?;
        b_to_a.check().map_err(anyhow::Error::msg).context("B→A")?;
        let id = format!(
            "mwan{}x{}",
            std::process::id() % 1_000_000,
            NEXT.fetch_add(1, Ordering::Relaxed) % 100
        );
        let ns = [format!("{id}a"), format!("{id}b")];
        let mut wan = Wan {
            ns,
            stop: Arc::new(AtomicBool::new(false)),
            control: Arc::new(Control::default()),
            router: None,
        };
        // From here on, drop removes whatever was made.
        let devs = wan.make_sides()?;
        let links = [
            Link::new(a_to_b, seed.wrapping_mul(2)),
            Link::new(b_to_a, seed.wrapping_mul(2).wrapping_add(1)),
        ];
        let (stop, control) = (wan.stop.clone(), wan.control.clone());
        wan.router = Some(
            std::thread::Builder::new()
                .name("wan-router".into())
                .spawn(move || router::run(devs, links, control, stop))
                .context("start the router thread")?,
        );
        Ok(wan)
    }

    fn make_sides(&self) -> Result<[std::fs::File; 2]> {
        let mut devs = Vec::new();
        for (i, ns) in self.ns.iter().enumerate() {
            ip(&["netns", "add", ns])?;
            // IPv4 only: no router solicitations or other stray packets cross the link, so
            // the router's counts are the traffic of the programs on either side.
            sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1")?;
            sysctl(ns, "net.ipv6.conf.default.disable_ipv6=1")?;
            // The device is made here, then moved into its namespace: the descriptor stays
            // attached to it wherever it lives.
            let dev = device_of(ns);
            let f = tun::open(&dev).with_context(|| format!("TUN device {dev}"))?;
            let (me, peer) = if i == 0 {
                (ADDR_A, ADDR_B)
            } else {
                (ADDR_B, ADDR_A)
            };
            ip(&["link", "set", &dev, "netns", ns])?;
            ip(&["-n", ns, "addr", "add", me, "peer", peer, "dev", &dev])?;
            ip(&["-n", ns, "link", "set", &dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            devs.push(f);
        }
        let b = devs.pop();
        let a = devs.pop();
        match (a, b) {
            (Some(a), Some(b)) => Ok([a, b]),
            _ => bail!("two devices were made"),
        }
    }

    /// The name of a side's network namespace (`ip netns` lists it while the WAN runs).
    pub fn ns(&self, side: Side) -> &str {
        &self.ns[side as usize]
    }

    /// The name of a side's TUN device, inside its namespace (for a test that watches the
    /// side's traffic with a packet socket made in `within`).
    pub fn device(&self, side: Side) -> String {
        device_of(self.ns(side))
    }

    /// A side's address.
    pub fn addr(side: Side) -> &'static str {
        match side {
            Side::A => ADDR_A,
            Side::B => ADDR_B,
        }
    }

    /// `program` to run in a side's network namespace (and only that namespace).
    pub fn command(&self, side: Side, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns(side)))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `f` on a thread that joined a side's network namespace, and returns what it made:
    /// a socket keeps the namespace it was made in, so a test or benchmark can hold both ends
    /// of the link in one process.
    pub fn within<T: Send + 'static>(
        &self,
        side: Side,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        within_netns(self.ns(side), f).with_context(|| format!("side {side:?}"))
    }

    /// From now on, `dir` loses packets at random at `loss` (0–1); the router applies it with
    /// the next packet.
    pub fn set_loss(&self, dir: Direction, loss: f64) -> Result<()> {
        self.control.set_loss(dir, loss).map_err(anyhow::Error::msg)
    }

    /// `side`'s connection dies now, as a cut fibre at that site: nothing it sends from now on
    /// gets out and nothing reaches it, while what it sent before is still delivered (the
    /// router checks with every packet). For good.
    pub fn cut(&self, side: Side) {
        self.control.cut(side);
    }

    /// Stops the router and removes the namespaces: what each direction did.
    pub fn stop(mut self) -> Result<Report> {
        self.halt()
    }

    fn halt(&mut self) -> Result<Report> {
        self.stop.store(true, Ordering::Relaxed);
        let rep = match self.router.take() {
            Some(h) => match h.join() {
                Ok(r) => r.context("the router failed"),
                Err(_) => Err(anyhow::anyhow!("the router thread panicked")),
            },
            None => Ok(Report::default()),
        };
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        rep
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// Runs `f` on a thread that joined the named network namespace (`ip netns` names it), and
/// returns what it made: a socket keeps the namespace it was made in. For `Wan::within`, and
/// for tests that compare the emulator with namespaces of their own.
pub fn within_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let h = std::thread::spawn(move || -> std::io::Result<T> {
        let ns = std::fs::File::open(&path)?;
        // SAFETY: a valid descriptor of a network namespace; only this thread moves.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        f()
    });
    match h.join() {
        Ok(r) => r.with_context(|| format!("in network namespace {ns}")),
        Err(_) => bail!("the thread in network namespace {ns} panicked"),
    }
}

/// The TUN device of namespace `ns`.
fn device_of(ns: &str) -> String {
    format!("{ns}t")
}

/// Runs `ip ARGS`; its error output on failure.
fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (iproute2)")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// Sets a sysctl inside namespace `ns`.
fn sysctl(ns: &str, setting: &str) -> Result<()> {
    ip(&["netns", "exec", ns, "sysctl", "-q", "-w", setting])
}
