//! The router: one thread that moves packets between the two TUN devices through the two
//! directions' `Link`s. It reads what each device has, asks the link of that direction what
//! becomes of each packet, keeps the delivered ones in a delay line ordered by their arrival
//! time, and writes each to the other device when it is due.
//!
//! Bounds: at most `READ_BURST` packets are read from one device per turn (the other direction
//! is not starved); the delay line holds at most `IN_FLIGHT_MAX` bytes (a link without a rate
//! cap and with a long delay would otherwise hold whatever is sent): past it a packet is dropped
//! and counted as `overflow`. The thread looks at its stop flag at least every `TICK`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::link::{Counts, Link, Verdict};

/// The largest IP packet a TUN device hands over (its MTU is 1,500; room for a larger one).
const PACKET_MAX: usize = 65_536;
const READ_BURST: usize = 256;
pub const IN_FLIGHT_MAX: u64 = 64 << 20;
const TICK: Duration = Duration::from_millis(20);

/// What the router did, per direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub a_to_b: Counts,
    pub b_to_a: Counts,
    /// Dropped because the delay line was full.
    pub overflow: u64,
    /// Packets the receiving device would not take (its queue full, or it went away).
    pub write_errors: u64,
}

/// A packet in the delay line: due time (ns since start), order of arrival, direction (0: A→B).
type Due = Reverse<(u64, u64, usize, Vec<u8>)>;

/// Moves packets until `stop` is set. `devs[0]` is A's device, `devs[1]` B's; `links[0]` is
/// A→B, `links[1]` B→A.
pub fn run(devs: [File; 2], mut links: [Link; 2], stop: Arc<AtomicBool>) -> io::Result<Report> {
    let start = Instant::now();
    let now = || start.elapsed().as_nanos() as u64;
    let mut line: BinaryHeap<Due> = BinaryHeap::new();
    let mut in_flight = 0u64;
    let mut order = 0u64;
    let mut rep = Report::default();
    let mut devs = devs;
    let mut buf = vec![0u8; PACKET_MAX];
    while !stop.load(Ordering::Relaxed) {
        let wait = line
            .peek()
            .map_or(TICK, |Reverse((t, ..))| {
                Duration::from_nanos(t.saturating_sub(now()))
            })
            .min(TICK);
        let ready = wait_readable(&devs, wait)?;
        for (dir, is_ready) in ready.into_iter().enumerate() {
            if !is_ready {
                continue;
            }
            for _ in 0..READ_BURST {
                let n = match devs[dir].read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                if let Verdict::Deliver(at) = links[dir].offer(now(), n) {
                    if in_flight + n as u64 > IN_FLIGHT_MAX {
                        rep.overflow += 1;
                        continue;
                    }
                    in_flight += n as u64;
                    order += 1;
                    line.push(Reverse((at, order, dir, buf[..n].to_vec())));
                }
            }
        }
        let t = now();
        while line.peek().is_some_and(|Reverse((at, ..))| *at <= t) {
            let Some(Reverse((_, _, dir, pkt))) = line.pop() else {
                break;
            };
            in_flight -= pkt.len() as u64;
            if devs[1 - dir].write(&pkt).is_err() {
                rep.write_errors += 1;
            }
        }
    }
    rep.a_to_b = links[0].counts;
    rep.b_to_a = links[1].counts;
    Ok(rep)
}

/// Waits up to `wait` for either device to have a packet; which ones do.
fn wait_readable(devs: &[File; 2], wait: Duration) -> io::Result<[bool; 2]> {
    let mut fds = [
        libc::pollfd {
            fd: devs[0].as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: devs[1].as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: two valid pollfds and a valid timespec, alive for the call.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false, false]);
        }
        return Err(e);
    }
    let bad = libc::POLLERR | libc::POLLNVAL;
    if fds.iter().any(|f| f.revents & bad != 0) {
        return Err(io::Error::other("a TUN device failed (POLLERR/POLLNVAL)"));
    }
    Ok([
        fds[0].revents & libc::POLLIN != 0,
        fds[1].revents & libc::POLLIN != 0,
    ])
}
