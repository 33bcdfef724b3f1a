//! The router: one thread that moves packets between the two TUN devices through the two
//! directions' `Link`s. It reads what each device has, asks the link of that direction what
//! becomes of each packet, keeps the delivered ones in a delay line ordered by their arrival
//! time, and writes each to the other device when it is due.
//!
//! The decisions are `Switch`'s, sans I/O (packets and times in, packets out), so they are
//! tested without devices; `run` is the I/O loop around it. A `Control` shared with other
//! threads changes a direction's loss or cuts a side at once (see `control`): the switch looks
//! at it with every packet.
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
use std::time::Duration;

use crate::control::Control;
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
    /// Per side (0: A): packets it sent after its cut, dropped at once.
    pub cut_sent: [u64; 2],
    /// Per side: of those, UDP datagrams (IPv4 protocol 17), and how long after the cut the
    /// router read the last of them (ns). A datagram read after the sending process died was
    /// queued in the side's kernel before: handed to the socket, but not out of the site.
    pub cut_sent_udp: [u64; 2],
    pub cut_sent_udp_last_ns: [u64; 2],
    /// Per side: packets due to reach it after its cut, dropped.
    pub cut_due: [u64; 2],
    /// Per direction (0: A→B): packets delivered that had left before the sender's cut.
    pub delivered_after_cut: [u64; 2],
}

/// A packet in the delay line: due time (ns since start), order of arrival, direction (0: A→B).
type Due = Reverse<(u64, u64, usize, Vec<u8>)>;

/// The router's decisions, sans I/O: packets offered with the time (ns), packets handed back
/// when due. Side and direction indices: 0 is A (and A→B), 1 is B (and B→A).
pub struct Switch {
    links: [Link; 2],
    control: Arc<Control>,
    /// The control's epoch last applied to the links.
    epoch: u64,
    line: BinaryHeap<Due>,
    in_flight: u64,
    order: u64,
    report: Report,
}

impl Switch {
    pub fn new(links: [Link; 2], control: Arc<Control>) -> Switch {
        Switch {
            links,
            control,
            epoch: 0,
            line: BinaryHeap::new(),
            in_flight: 0,
            order: 0,
            report: Report::default(),
        }
    }

    /// A packet side `from` sent, read at `now`.
    pub fn offer(&mut self, now: u64, from: usize, pkt: &[u8]) {
        if let Some(t) = self.control.cut_time(from) {
            self.report.cut_sent[from] += 1;
            if is_udp(pkt) {
                self.report.cut_sent_udp[from] += 1;
                let last = &mut self.report.cut_sent_udp_last_ns[from];
                *last = (*last).max(now.saturating_sub(t));
            }
            return;
        }
        self.apply_control();
        let Verdict::Deliver(at) = self.links[from].offer(now, pkt.len()) else {
            return;
        };
        let n = pkt.len() as u64;
        if self.in_flight + n > IN_FLIGHT_MAX {
            self.report.overflow += 1;
            return;
        }
        self.in_flight += n;
        self.order += 1;
        self.line
            .push(Reverse((at, self.order, from, pkt.to_vec())));
    }

    /// Loss rates changed since the last packet: the links take them.
    fn apply_control(&mut self) {
        let epoch = self.control.epoch();
        if epoch == self.epoch {
            return;
        }
        self.epoch = epoch;
        for (i, link) in self.links.iter_mut().enumerate() {
            if let Some(loss) = self.control.loss(i) {
                link.set_loss(loss);
            }
        }
    }

    /// When the next packet is due (ns), if any waits.
    pub fn next_due(&self) -> Option<u64> {
        self.line.peek().map(|Reverse((t, ..))| *t)
    }

    /// The next packet due by `now`: the side it goes to and its bytes. Packets due to a cut
    /// side are dropped on the way and counted.
    pub fn pop_due(&mut self, now: u64) -> Option<(usize, Vec<u8>)> {
        loop {
            if self.next_due()? > now {
                return None;
            }
            let Reverse((_, _, dir, pkt)) = self.line.pop()?;
            self.in_flight -= pkt.len() as u64;
            let to = 1 - dir;
            if self.control.cut_time(to).is_some() {
                self.report.cut_due[to] += 1;
                continue;
            }
            if self.control.cut_time(dir).is_some() {
                self.report.delivered_after_cut[dir] += 1;
            }
            return Some((to, pkt));
        }
    }

    /// A packet the receiving device would not take.
    pub fn write_failed(&mut self) {
        self.report.write_errors += 1;
    }

    pub fn report(&self) -> Report {
        Report {
            a_to_b: self.links[0].counts,
            b_to_a: self.links[1].counts,
            ..self.report
        }
    }
}

/// An IPv4 packet carrying UDP.
fn is_udp(pkt: &[u8]) -> bool {
    pkt.first().is_some_and(|b| b >> 4 == 4) && pkt.get(9) == Some(&17)
}

/// Moves packets until `stop` is set. `devs[0]` is A's device, `devs[1]` B's; `links[0]` is
/// A→B, `links[1]` B→A.
pub fn run(
    devs: [File; 2],
    links: [Link; 2],
    control: Arc<Control>,
    stop: Arc<AtomicBool>,
) -> io::Result<Report> {
    let clock = control.clone();
    let now = || clock.now();
    let mut switch = Switch::new(links, control);
    let mut devs = devs;
    let mut buf = vec![0u8; PACKET_MAX];
    while !stop.load(Ordering::Relaxed) {
        let wait = switch
            .next_due()
            .map_or(TICK, |t| Duration::from_nanos(t.saturating_sub(now())))
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
                switch.offer(now(), dir, &buf[..n]);
            }
        }
        while let Some((to, pkt)) = switch.pop_due(now()) {
            if devs[to].write(&pkt).is_err() {
                switch.write_failed();
            }
        }
    }
    Ok(switch.report())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Direction;
    use crate::link::Impairment;
    use crate::netns::Side;

    const MS: u64 = 1_000_000;

    fn switch(delay_ms: u64) -> (Switch, Arc<Control>) {
        let imp = Impairment {
            delay: Duration::from_millis(delay_ms),
            ..Impairment::default()
        };
        let control = Arc::new(Control::default());
        let links = [Link::new(imp.clone(), 1), Link::new(imp, 2)];
        (Switch::new(links, control.clone()), control)
    }

    /// Everything due by `now`, as (to, first byte).
    fn drain(s: &mut Switch, now: u64) -> Vec<(usize, u8)> {
        std::iter::from_fn(|| s.pop_due(now))
            .map(|(to, p)| (to, p[0]))
            .collect()
    }

    #[test]
    fn packets_cross_after_the_delay_in_both_directions() {
        let (mut s, _) = switch(50);
        s.offer(0, 0, &[1; 100]);
        s.offer(MS, 1, &[2; 100]);
        assert_eq!(drain(&mut s, 49 * MS), vec![]);
        assert_eq!(drain(&mut s, 50 * MS), vec![(1, 1)]);
        assert_eq!(s.next_due(), Some(51 * MS));
        assert_eq!(drain(&mut s, 60 * MS), vec![(0, 2)]);
        assert_eq!(s.report().a_to_b.delivered, 1);
    }

    #[test]
    fn a_cut_drops_what_the_site_sends_next_but_delivers_what_already_left() {
        let (mut s, control) = switch(50);
        for i in 0..10u8 {
            s.offer(u64::from(i) * MS, 0, &[i; 100]);
        }
        // B's packet towards A is on its way when A is cut.
        s.offer(5 * MS, 1, &[100; 100]);
        control.cut_at(Side::A, 9 * MS + MS / 2);
        for i in 10..20u8 {
            s.offer(u64::from(i) * MS, 0, &[i; 100]);
        }
        // Two UDP datagrams (IPv4, protocol 17) read after the cut, the last at 25 ms.
        let mut udp = [0u8; 28];
        udp[0] = 0x45;
        udp[9] = 17;
        s.offer(21 * MS, 0, &udp);
        s.offer(25 * MS, 0, &udp);
        let got = drain(&mut s, 200 * MS);
        let want: Vec<(usize, u8)> = (0..10).map(|i| (1, i)).collect();
        assert_eq!(
            got, want,
            "the ten sent before the cut arrive, in order, none after"
        );
        let r = s.report();
        assert_eq!(r.cut_sent, [12, 0]);
        assert_eq!(r.cut_sent_udp, [2, 0]);
        assert_eq!(r.cut_sent_udp_last_ns, [25 * MS - (9 * MS + MS / 2), 0]);
        assert_eq!(r.cut_due, [1, 0], "B's packet to the dead site is dropped");
        assert_eq!(r.delivered_after_cut, [10, 0]);
        assert_eq!(
            r.a_to_b.offered, 10,
            "the link never saw what the cut dropped"
        );
        // B still sends, but nothing reaches A.
        s.offer(300 * MS, 1, &[7; 10]);
        assert_eq!(drain(&mut s, 400 * MS), vec![]);
    }

    #[test]
    fn a_loss_change_applies_from_the_next_packet_in_its_direction_only() {
        let (mut s, control) = switch(0);
        for i in 0..1_000u64 {
            s.offer(i, 0, &[0; 10]);
            s.offer(i, 1, &[0; 10]);
        }
        assert_eq!(s.report().a_to_b.lost_random, 0);
        control
            .set_loss(Direction::AtoB, 0.5)
            .expect("a valid rate");
        for i in 0..1_000u64 {
            s.offer(1_000 + i, 0, &[0; 10]);
            s.offer(1_000 + i, 1, &[0; 10]);
        }
        let lost = s.report().a_to_b.lost_random;
        // 500 expected, binomial sd ~16: six standard deviations either side.
        assert!((400..=600).contains(&lost), "{lost} of 1,000 lost at 50 %");
        assert_eq!(s.report().b_to_a.lost_random, 0, "B→A unchanged");
        control
            .set_loss(Direction::AtoB, 0.0)
            .expect("a valid rate");
        s.offer(5_000, 0, &[0; 10]);
        assert_eq!(s.report().a_to_b.lost_random, lost, "back to no loss");
        assert!(control.set_loss(Direction::BtoA, 1.5).is_err());
    }

    #[test]
    fn the_delay_line_is_bounded() {
        let (mut s, _) = switch(1_000);
        let big = vec![0u8; 60_000];
        let fits = IN_FLIGHT_MAX / 60_000;
        for i in 0..fits + 5 {
            s.offer(i, 0, &big);
        }
        assert_eq!(s.report().overflow, 5);
        assert_eq!(drain(&mut s, 2_000 * MS).len() as u64, fits);
    }
}
