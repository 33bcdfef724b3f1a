//! The emulator on real namespaces (root): what the router does to real traffic, cross-checked
//! with nftables counters on the receiving side, and that it cleans up after itself.

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use mirrorfs_wan::{Impairment, Side, Wan};

const PORT: u16 = 7_001;

fn udp_in(wan: &Wan, side: Side, port: u16) -> UdpSocket {
    let addr = format!("{}:{port}", Wan::addr(side));
    wan.within(side, move || {
        let s = UdpSocket::bind(&addr)?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(s)
    })
    .expect("a UDP socket in the namespace")
}

/// `nft` inside side B: a counter of the UDP packets that reach port `PORT`.
fn nft_b(wan: &Wan, script: &str) -> String {
    let o = Command::new("ip")
        .args(["netns", "exec", wan.ns(Side::B), "nft"])
        .args(script.split_whitespace())
        .output()
        .expect("run nft");
    assert!(
        o.status.success(),
        "nft {script}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn delay_holds_each_round_trip_back_by_twice_the_one_way_delay() {
    let delay = Duration::from_millis(25);
    let imp = Impairment {
        delay,
        ..Impairment::default()
    };
    let wan = Wan::start(imp.clone(), imp, 1).expect("start the WAN");
    let b = udp_in(&wan, Side::B, PORT);
    let a = udp_in(&wan, Side::A, PORT);
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..10 {
            let (n, from) = b.recv_from(&mut buf).expect("B receives");
            b.send_to(&buf[..n], from).expect("B echoes");
        }
    });
    let to = format!("{}:{PORT}", Wan::addr(Side::B));
    let mut buf = [0u8; 64];
    for i in 0..10u8 {
        let t = Instant::now();
        a.send_to(&[i; 32], &to).expect("A sends");
        let (n, _) = a.recv_from(&mut buf).expect("the echo comes back");
        let rtt = t.elapsed();
        assert_eq!(&buf[..n], &[i; 32]);
        assert!(rtt >= 2 * delay, "round trip {rtt:?} under twice {delay:?}");
    }
    echo.join().expect("echo thread");
    let rep = wan.stop().expect("stop");
    assert_eq!((rep.a_to_b.delivered, rep.b_to_a.delivered), (10, 10));
}

#[test]
fn a_cut_at_a_site_delivers_what_already_left_and_nothing_after() {
    let delay = Duration::from_millis(50);
    let imp = Impairment {
        delay,
        ..Impairment::default()
    };
    let wan = Wan::start(imp.clone(), imp, 1).expect("start the WAN");
    let b = udp_in(&wan, Side::B, PORT);
    let a = udp_in(&wan, Side::A, PORT);
    let to = format!("{}:{PORT}", Wan::addr(Side::B));
    for i in 0..10u8 {
        a.send_to(&[i; 32], &to).expect("A sends");
    }
    // The router has read them (microseconds): they are on the 50 ms wire when A is cut.
    std::thread::sleep(Duration::from_millis(10));
    let t_cut = Instant::now();
    wan.cut(Side::A);
    for i in 10..20u8 {
        a.send_to(&[i; 32], &to)
            .expect("A's kernel still takes datagrams");
    }
    // B's datagram towards A dies at the cut too.
    b.send_to(&[99; 32], format!("{}:{PORT}", Wan::addr(Side::A)))
        .expect("B sends");
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while let Ok((n, _)) = b.recv_from(&mut buf) {
        assert_eq!(n, 32);
        got.push(buf[0]);
    }
    assert_eq!(
        got,
        (0..10).collect::<Vec<u8>>(),
        "the ten sent before the cut, no more"
    );
    assert!(
        t_cut.elapsed() >= Duration::from_millis(500),
        "waited out the read timeout"
    );
    assert!(
        a.recv_from(&mut buf).is_err(),
        "nothing reaches the cut site"
    );
    let rep = wan.stop().expect("stop");
    assert_eq!(rep.delivered_after_cut, [10, 0]);
    assert_eq!(rep.cut_sent_udp, [10, 0]);
    assert_eq!(rep.cut_due, [1, 0]);
}

#[test]
fn random_loss_matches_its_rate_and_the_counts_of_nftables() {
    let imp = Impairment {
        loss: 0.05,
        ..Impairment::default()
    };
    let wan = Wan::start(imp, Impairment::default(), 42).expect("start the WAN");
    nft_b(&wan, "add table inet wan");
    nft_b(
        &wan,
        "add chain inet wan input { type filter hook input priority 0 ; }",
    );
    nft_b(
        &wan,
        &format!("add rule inet wan input udp dport {PORT} counter"),
    );
    let b = udp_in(&wan, Side::B, PORT);
    let a = udp_in(&wan, Side::A, PORT);
    // B receives while A sends (a socket buffer holds only a few hundred small packets); it
    // stops half a second after the last one.
    let rx = std::thread::spawn(move || {
        let mut got = 0u64;
        let mut buf = [0u8; 16];
        while b.recv(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    let sent = 4_000u64;
    let to = format!("{}:{PORT}", Wan::addr(Side::B));
    for i in 0..sent {
        a.send_to(&i.to_le_bytes(), &to).expect("A sends");
        if i % 100 == 99 {
            // Paced, so that no socket buffer on the way drops anything.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let got = rx.join().expect("receiver");
    let listed = nft_b(&wan, "list chain inet wan input");
    let counted: u64 = listed
        .split("packets ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {listed}"));
    let rep = wan.stop().expect("stop");
    assert_eq!(
        rep.a_to_b.offered, sent,
        "the router saw every packet A sent"
    );
    assert_eq!(counted, got, "nftables counted what the socket received");
    assert_eq!(
        rep.a_to_b.delivered, got,
        "the router delivered what B received"
    );
    assert_eq!(rep.a_to_b.lost_random, sent - got);
    // 5 % of 4,000 = 200 expected, standard deviation ~13.8: five of them either side.
    let lost = sent - got;
    assert!((131..=269).contains(&lost), "{lost} of {sent} lost at 5 %");
}

#[test]
fn the_rate_cap_holds_a_tcp_transfer_to_the_rate() {
    // 8 Mbit/s: 1 MiB takes at least ~1.05 s on the wire.
    let imp = Impairment {
        rate_bps: Some(8_000_000),
        queue_bytes: 64 * 1024,
        delay: Duration::from_millis(5),
        ..Impairment::default()
    };
    let wan = Wan::start(imp.clone(), imp, 7).expect("start the WAN");
    let addr = format!("{}:{PORT}", Wan::addr(Side::B));
    let listener = wan
        .within(Side::B, move || TcpListener::bind(&addr))
        .expect("listen in B");
    let size = 1 << 20;
    let rx = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut v).expect("read");
        v.len()
    });
    let to = format!("{}:{PORT}", Wan::addr(Side::B));
    let t = Instant::now();
    let mut s = wan
        .within(Side::A, move || TcpStream::connect(&to))
        .expect("connect from A");
    std::io::Write::write_all(&mut s, &vec![7u8; size]).expect("send");
    drop(s);
    let got = rx.join().expect("receiver");
    let took = t.elapsed();
    assert_eq!(got, size);
    let floor = Duration::from_secs_f64(size as f64 * 8.0 / 8e6);
    assert!(took >= floor, "1 MiB in {took:?} through an 8 Mbit/s cap");
    let rep = wan.stop().expect("stop");
    assert!(rep.a_to_b.bytes_delivered >= size as u64);
}

#[test]
fn stopping_removes_the_namespaces() {
    let wan = Wan::start(Impairment::default(), Impairment::default(), 1).expect("start");
    let names = [wan.ns(Side::A).to_string(), wan.ns(Side::B).to_string()];
    let listed = || {
        let o = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(names.iter().all(|n| listed().contains(n.as_str())));
    drop(wan);
    let now = listed();
    assert!(names.iter().all(|n| !now.contains(n.as_str())), "{now}");
}
