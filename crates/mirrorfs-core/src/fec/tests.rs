//! The FEC schemes end to end: an encoder's stream through a lossy channel into a decoder.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use rand::{Rng, SeedableRng};

use super::encoder;
use super::layered::{LayeredDecoder, LayeredEncoder, Layers};
use super::rs::{Erasure, RsDecoder, RsEncoder, Simd};
use super::*;

/// One packet on the wire, numbered like sealed packets: data and repairs share the numbers.
#[derive(Debug, Clone)]
enum Wire {
    Data { seq: u64, bytes: Vec<u8> },
    Repair(Vec<u8>),
}

/// The packets an encoder sends for `packets` (then a flush), in sending order.
fn send(enc: &mut dyn FecEncoder, packets: &[Vec<u8>]) -> (Vec<Wire>, BTreeMap<u64, Vec<u8>>) {
    let mut wire = Vec::new();
    let mut sent = BTreeMap::new();
    let mut repairs = Vec::new();
    let mut pn = 1u64;
    for p in packets {
        enc.push(pn, p, &mut repairs).expect("push");
        sent.insert(pn, p.clone());
        wire.push(Wire::Data {
            seq: pn,
            bytes: p.clone(),
        });
        pn += 1;
        for r in repairs.drain(..) {
            wire.push(Wire::Repair(codec::encode(&r)));
            pn += 1;
        }
    }
    enc.flush(&mut repairs);
    wire.extend(repairs.drain(..).map(|r| Wire::Repair(codec::encode(&r))));
    (wire, sent)
}

/// What a receiver ends with.
#[derive(Debug, Default)]
struct Outcome {
    received: BTreeSet<u64>,
    rebuilt: BTreeMap<u64, Vec<u8>>,
    lost: BTreeSet<u64>,
    stats: DecoderStats,
}

/// Feeds the wire packets not in `drop` to `dec`, then slides the window past them all.
fn receive(dec: &mut dyn FecDecoder, wire: &[Wire], drop: &BTreeSet<usize>) -> Outcome {
    let mut o = Outcome::default();
    let mut out = Vec::new();
    let mut top = 0;
    for (i, w) in wire.iter().enumerate() {
        if drop.contains(&i) {
            continue;
        }
        match w {
            Wire::Data { seq, bytes } => {
                o.received.insert(*seq);
                top = top.max(*seq);
                dec.on_data(*seq, bytes, &mut out);
            }
            Wire::Repair(b) => {
                let r = codec::parse(b).expect("our own repairs parse");
                dec.on_repair(r, &mut out)
                    .expect("our own repairs are taken");
            }
        }
        take(&mut o, &mut out);
    }
    // A packet far ahead moves the window past everything: what is still wanted is lost.
    dec.on_data(top + 1_000_000, b"end", &mut out);
    take(&mut o, &mut out);
    o.stats = dec.stats();
    o
}

fn take(o: &mut Outcome, out: &mut Vec<Recovery>) {
    for r in out.drain(..) {
        match r {
            // Reordered, a packet may be rebuilt before it arrives; never after.
            Recovery::Rebuilt { seq, data } => {
                assert!(
                    !o.received.contains(&seq),
                    "{seq} was received, yet rebuilt"
                );
                assert!(o.rebuilt.insert(seq, data).is_none(), "{seq} rebuilt twice");
            }
            Recovery::Lost { seq } => {
                assert!(!o.received.contains(&seq), "{seq} was received, yet lost");
                assert!(o.lost.insert(seq), "{seq} lost twice");
            }
        }
    }
}

/// Nothing wrong is handed on: every rebuilt packet is the one sent and is not also reported
/// lost (`take` checks that neither had been received).
fn check_sound(o: &Outcome, sent: &BTreeMap<u64, Vec<u8>>) {
    for (seq, data) in &o.rebuilt {
        assert_eq!(
            sent.get(seq),
            Some(data),
            "rebuilt {seq} differs from what was sent"
        );
        assert!(!o.lost.contains(seq), "{seq} rebuilt and lost");
    }
    for seq in &o.lost {
        assert!(sent.contains_key(seq), "lost {seq} was never sent as data");
    }
    assert_eq!(o.stats.inconsistent, 0);
}

fn packets(n: usize, size: impl Fn(usize) -> usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|i| (0..size(i)).map(|_| rng.gen()).collect())
        .collect()
}

/// Wire positions of the data packets with these seqs.
fn positions_of(wire: &[Wire], seqs: &[u64]) -> BTreeSet<usize> {
    wire.iter()
        .enumerate()
        .filter(|(_, w)| matches!(w, Wire::Data { seq, .. } if seqs.contains(seq)))
        .map(|(i, _)| i)
        .collect()
}

fn layered() -> LayeredEncoder {
    LayeredEncoder::new(Layers::default()).expect("default layers")
}

fn repairs_of_layer(wire: &[Wire], layer: u8) -> BTreeSet<usize> {
    wire.iter()
        .enumerate()
        .filter(|(_, w)| match w {
            Wire::Repair(b) => codec::parse(b).map(|r| r.index == layer).unwrap_or(false),
            Wire::Data { .. } => false,
        })
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn each_layer_alone_rebuilds_a_single_loss() {
    let data = packets(2_000, |_| 1_400, 1);
    let (wire, sent) = send(&mut layered(), &data);
    let victim: u64 = *sent.keys().nth(1_234).expect("seq");
    for layer in 0..3u8 {
        // Only this layer's repairs arrive.
        let mut drop = positions_of(&wire, &[victim]);
        for other in (0..3u8).filter(|l| *l != layer) {
            drop.extend(repairs_of_layer(&wire, other));
        }
        let o = receive(&mut LayeredDecoder::new(Window::default()), &wire, &drop);
        check_sound(&o, &sent);
        assert_eq!(
            o.rebuilt.keys().collect::<Vec<_>>(),
            [&victim],
            "layer {layer}"
        );
        assert!(o.lost.is_empty(), "layer {layer}");
    }
}

#[test]
fn a_burst_of_ten_is_masked_by_the_deeper_layers() {
    let data = packets(3_000, |_| 1_400, 2);
    let (wire, sent) = send(&mut layered(), &data);
    // Ten consecutive data packets, at every start over a full cycle of the deepest layer
    // (8 x 100 data packets): layer 1 rebuilds them.
    let seqs: Vec<u64> = sent.keys().copied().collect();
    for start in 1_000..1_800 {
        let victims = &seqs[start..start + 10];
        let o = receive(
            &mut LayeredDecoder::new(Window::default()),
            &wire,
            &positions_of(&wire, victims),
        );
        check_sound(&o, &sent);
        assert_eq!(
            o.rebuilt.keys().copied().collect::<Vec<_>>(),
            victims,
            "from {start}"
        );
    }
    // Ten consecutive packets on the wire, data and repairs alike: masked unless the burst
    // takes a data packet together with the repairs of two layers that it completes (the
    // stagger makes that rare).
    let mut masked = 0;
    let starts = (1_000..2_100).step_by(3);
    let tries = starts.len();
    for start in starts {
        let drop: BTreeSet<usize> = (start..start + 10).collect();
        let lost_data = drop
            .iter()
            .filter(|i| matches!(wire[**i], Wire::Data { .. }))
            .count();
        let o = receive(&mut LayeredDecoder::new(Window::default()), &wire, &drop);
        check_sound(&o, &sent);
        // A data packet whose repairs of every layer were all in the burst too is named by
        // nothing that arrived: the receiver learns of it from the fragment gap (NAK).
        assert!(o.rebuilt.len() + o.lost.len() <= lost_data, "from {start}");
        masked += usize::from(o.rebuilt.len() == lost_data);
    }
    eprintln!("bursts of 10 on the wire: {masked} of {tries} masked");
    assert!(masked * 100 >= tries * 90, "{masked} of {tries} masked");
    // Up to 100 consecutive data packets with their repairs arriving: layer 2 alone rebuilds
    // them (each of its repairs misses one member).
    let seqs: Vec<u64> = sent.keys().copied().skip(1_234).take(100).collect();
    let drop = positions_of(&wire, &seqs);
    let o = receive(&mut LayeredDecoder::new(Window::default()), &wire, &drop);
    check_sound(&o, &sent);
    assert_eq!(o.rebuilt.keys().copied().collect::<Vec<_>>(), seqs);
}

#[test]
fn two_losses_in_one_group_are_reported_lost_not_guessed() {
    let mut enc = LayeredEncoder::new(Layers {
        r: 8,
        distances: vec![1],
    })
    .expect("layers");
    let data = packets(64, |i| 100 + i, 3);
    let (wire, sent) = send(&mut enc, &data);
    // Data seqs 1..=8 form the first group (no stagger in layer 0); lose two of them.
    let victims: Vec<u64> = sent.keys().copied().take(8).skip(3).take(2).collect();
    let o = receive(
        &mut LayeredDecoder::new(Window::default()),
        &wire,
        &positions_of(&wire, &victims),
    );
    check_sound(&o, &sent);
    assert!(o.rebuilt.is_empty());
    assert_eq!(o.lost, victims.iter().copied().collect());
    assert_eq!(o.stats.lost, 2);
}

#[test]
fn packets_of_every_size_come_back_at_their_length() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(4);
    let sizes: Vec<usize> = (0..1_000)
        .map(|_| match rng.gen_range(0..10) {
            0 => 0,
            1 => DATA_MAX,
            _ => rng.gen_range(1..1_500),
        })
        .collect();
    let data = packets(sizes.len(), |i| sizes[i], 5);
    for scheme in [Scheme::Xor, Scheme::RsErasure, Scheme::RsSimd] {
        let (wire, sent) = send(encoder(scheme).as_mut(), &data);
        // Every 9th data packet: one per RS block at most, one per layer-0 group at most.
        let drop: BTreeSet<usize> = wire
            .iter()
            .enumerate()
            .filter(|(_, w)| matches!(w, Wire::Data { seq, .. } if seq % 9 == 0))
            .map(|(i, _)| i)
            .collect();
        let o = receive(decoder(scheme, Window::default()).as_mut(), &wire, &drop);
        check_sound(&o, &sent);
        assert_eq!(o.rebuilt.len(), drop.len(), "{scheme:?}");
        assert!(o.lost.is_empty(), "{scheme:?}");
    }
}

#[test]
fn reed_solomon_rebuilds_up_to_m_losses_per_block_and_reports_more() {
    for scheme in [Scheme::RsErasure, Scheme::RsSimd] {
        let data = packets(16, |i| 50 * i, 6);
        let (wire, sent) = send(encoder(scheme).as_mut(), &data);
        let seqs: Vec<u64> = sent.keys().copied().collect();
        // Block 1 (seqs[0..8]) loses 3: rebuilt. Block 2 loses 4: all four lost.
        let mut victims = vec![seqs[0], seqs[4], seqs[7]];
        victims.extend([seqs[8], seqs[9], seqs[12], seqs[15]]);
        let o = receive(
            decoder(scheme, Window::default()).as_mut(),
            &wire,
            &positions_of(&wire, &victims),
        );
        check_sound(&o, &sent);
        assert_eq!(o.rebuilt.keys().copied().collect::<Vec<_>>(), victims[..3]);
        assert_eq!(o.lost, victims[3..].iter().copied().collect(), "{scheme:?}");
    }
}

#[test]
fn repairs_are_staggered() {
    let mut enc = layered();
    let mut out = Vec::new();
    let mut per_push = Vec::new();
    for seq in 1..=8_000u64 {
        enc.push(seq, &[1; 10], &mut out).expect("push");
        per_push.push(out.len());
        out.clear();
    }
    let total: usize = per_push.iter().sum();
    assert!(
        (2_900..=3_100).contains(&total),
        "c/r of the packets: {total}"
    );
    let most = per_push.iter().max().copied().unwrap_or(0);
    let most_in_8 = per_push
        .windows(8)
        .map(|w| w.iter().sum::<usize>())
        .max()
        .unwrap_or(0);
    // Unstaggered, layer 2 would send 100 repairs after one packet in 800.
    assert!(most <= 3, "{most} repairs after one packet");
    assert!(most_in_8 <= 4, "{most_in_8} repairs in 8 packets");
}

#[test]
fn the_window_bounds_memory_and_counts_what_it_drops() {
    let data = packets(5_000, |_| 1_400, 7);
    for scheme in [Scheme::Xor, Scheme::RsSimd] {
        let (wire, sent) = send(encoder(scheme).as_mut(), &data);
        let window = Window {
            seqs: 4_096,
            bytes: 64 * 1_400,
        };
        let mut dec = decoder(scheme, window);
        let mut out = Vec::new();
        let mut most = 0;
        for (i, w) in wire.iter().enumerate() {
            match w {
                Wire::Data { seq, bytes } if i % 50 != 0 => dec.on_data(*seq, bytes, &mut out),
                Wire::Data { .. } => {}
                Wire::Repair(b) => {
                    let r = codec::parse(b).expect("parse");
                    dec.on_repair(r, &mut out).expect("taken");
                }
            }
            most = most.max(dec.bytes_held());
        }
        assert!(most <= window.bytes, "{scheme:?} held {most}");
        let s = dec.stats();
        assert!(s.evicted_data > 4_000, "{scheme:?}: {s:?}");
        for r in &out {
            if let Recovery::Rebuilt { seq, data } = r {
                assert_eq!(sent.get(seq), Some(data));
            }
        }
        // A repair wider than the window is refused.
        let mut wide = codec::parse(match &wire[wire.len() - 1] {
            Wire::Repair(b) => b,
            Wire::Data { .. } => unreachable!("the flush ends the stream"),
        })
        .expect("parse");
        wide.members = vec![1, 1 + window.seqs];
        assert_eq!(dec.on_repair(wide, &mut out), Err(Refused::TooWide));
    }
}

#[test]
fn garbage_repairs_are_refused_or_counted_never_applied() {
    let data = packets(8, |i| 10 + i, 8);
    let mut out = Vec::new();
    // A repair of another scheme.
    let (wire, _) = send(encoder(Scheme::RsSimd).as_mut(), &data);
    let Wire::Repair(b) = &wire[8] else {
        unreachable!("the block's parity follows its data")
    };
    let rs = codec::parse(b).expect("parse");
    let mut xor_dec = LayeredDecoder::new(Window::default());
    assert_eq!(
        xor_dec.on_repair(rs.clone(), &mut out),
        Err(Refused::OtherScheme(Scheme::RsSimd))
    );
    assert_eq!(
        RsDecoder::<Erasure>::new(Window::default()).on_repair(rs.clone(), &mut out),
        Err(Refused::OtherScheme(Scheme::RsSimd))
    );
    // Members out of order or repeated (a hand-made repair: parse refuses such bytes).
    for members in [vec![3, 2], vec![2, 2], vec![]] {
        let mut bad = rs.clone();
        bad.members = members.clone();
        assert_eq!(
            RsDecoder::<Simd>::new(Window::default()).on_repair(bad, &mut out),
            Err(Refused::Contradicts),
            "{members:?}"
        );
        let xor = Repair {
            scheme: Scheme::Xor,
            index: 0,
            parity_count: 0,
            len_xor: 0,
            members,
            payload: vec![1; 4],
        };
        assert_eq!(xor_dec.on_repair(xor, &mut out), Err(Refused::Contradicts));
    }
    // Two parity packets that disagree about their block.
    let mut dec = RsDecoder::<Simd>::new(Window::default());
    dec.on_repair(rs.clone(), &mut out).expect("taken");
    let mut other = rs.clone();
    other.index = 1;
    other.members[7] += 1;
    assert_eq!(dec.on_repair(other, &mut out), Err(Refused::Contradicts));
    // An XOR repair whose lengths do not add up: the rebuilt packet would be longer than
    // the payload. Nothing is handed on.
    let mut dec = LayeredDecoder::new(Window::default());
    dec.on_data(1, &[1, 2, 3], &mut out);
    let bad = Repair {
        scheme: Scheme::Xor,
        index: 0,
        parity_count: 0,
        len_xor: 3 ^ 500,
        members: vec![1, 2],
        payload: vec![9; 3],
    };
    dec.on_repair(bad, &mut out).expect("taken");
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(dec.stats().inconsistent, 1);
    assert!(!dec.holds(2));
    // Padding that is not zero past the rebuilt length.
    let bad = Repair {
        scheme: Scheme::Xor,
        index: 0,
        parity_count: 0,
        len_xor: 3 ^ 2,
        members: vec![1, 3],
        payload: vec![9; 3],
    };
    dec.on_repair(bad, &mut out).expect("taken");
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(dec.stats().inconsistent, 2);
}

#[test]
fn late_and_duplicate_packets_are_counted() {
    let mut dec = LayeredDecoder::new(Window {
        seqs: 100,
        bytes: 1 << 20,
    });
    let mut out = Vec::new();
    dec.on_data(1_000, b"a", &mut out);
    dec.on_data(1_000, b"a", &mut out);
    dec.on_data(1_200, b"b", &mut out);
    dec.on_data(1_000, b"a", &mut out);
    let s = dec.stats();
    assert_eq!((s.duplicates, s.late, s.evicted_data), (1, 1, 1));
    assert!(out.is_empty());
}

#[test]
fn bad_configurations_are_refused() {
    assert!(LayeredEncoder::new(Layers {
        r: 0,
        distances: vec![1]
    })
    .is_err());
    assert!(LayeredEncoder::new(Layers {
        r: 8,
        distances: vec![]
    })
    .is_err());
    assert!(LayeredEncoder::new(Layers {
        r: 8,
        distances: vec![1, 0]
    })
    .is_err());
    assert!(RsEncoder::<Simd>::new(8, 0).is_err());
    assert!(RsEncoder::<Erasure>::new(65, 3).is_err());
    let mut enc = layered();
    let mut out = Vec::new();
    assert_eq!(
        enc.push(1, &vec![0; DATA_MAX + 1], &mut out),
        Err(EncodeError::TooLarge { len: DATA_MAX + 1 })
    );
    enc.push(5, b"x", &mut out).expect("push");
    assert_eq!(
        enc.push(5, b"y", &mut out),
        Err(EncodeError::SeqNotIncreasing { seq: 5, last: 5 })
    );
}

fn any_scheme() -> impl Strategy<Value = Scheme> {
    prop_oneof![
        Just(Scheme::Xor),
        Just(Scheme::RsErasure),
        Just(Scheme::RsSimd)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random and bursty loss, with reordering: whatever is rebuilt is what was sent, and
    /// every lost data packet is rebuilt, reported lost, or (named by no repair that
    /// arrived) simply not received.
    #[test]
    fn random_loss_never_yields_wrong_data(
        scheme in any_scheme(),
        seed in any::<u64>(),
        n in 1usize..1_200,
        loss_pct in 0u32..30,
        bursts in 0usize..4,
        swaps in 0usize..50,
    ) {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let sizes: Vec<usize> = (0..n).map(|_| rng.gen_range(0..1_500)).collect();
        let data = packets(n, |i| sizes[i], seed);
        let (mut wire, sent) = send(encoder(scheme).as_mut(), &data);
        for _ in 0..swaps {
            let i = rng.gen_range(0..wire.len());
            let j = (i + rng.gen_range(0..20)).min(wire.len() - 1);
            wire.swap(i, j);
        }
        let mut drop: BTreeSet<usize> = (0..wire.len())
            .filter(|_| rng.gen_range(0..100) < loss_pct)
            .collect();
        for _ in 0..bursts {
            let start = rng.gen_range(0..wire.len());
            drop.extend(start..(start + rng.gen_range(1..120)).min(wire.len()));
        }
        let o = receive(decoder(scheme, Window::default()).as_mut(), &wire, &drop);
        check_sound(&o, &sent);
        prop_assert_eq!(o.stats.rebuilt as usize, o.rebuilt.len());
        prop_assert_eq!(o.stats.lost as usize, o.lost.len());
        if drop.is_empty() {
            // Reordered, a repair may come before its data and rebuild it; never lose it.
            prop_assert!(o.lost.is_empty());
            prop_assert!(swaps > 0 || o.rebuilt.is_empty());
        }
    }
}

#[test]
fn oldest_open_names_the_first_packet_without_all_its_repairs() {
    for scheme in [Scheme::Xor, Scheme::RsErasure, Scheme::RsSimd] {
        let mut enc = crate::fec::encoder(scheme);
        let mut out = Vec::new();
        assert_eq!(enc.oldest_open(), None, "{scheme:?}");
        enc.push(5, &[1; 10], &mut out).expect("push");
        assert_eq!(enc.oldest_open(), Some(5), "{scheme:?}");
        enc.push(7, &[2; 10], &mut out).expect("push");
        assert_eq!(enc.oldest_open(), Some(5), "{scheme:?}");
        enc.flush(&mut out);
        assert_eq!(enc.oldest_open(), None, "{scheme:?}: flushed");
        assert!(!out.is_empty());
    }
}
