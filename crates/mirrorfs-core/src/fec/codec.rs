//! The repair packet's bytes: the body of a sealed `datagram::Kind::Repair` packet.
//!
//! Layout (big-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | scheme: 1 XOR (layered), 2 RS GF(2⁸) (`reed-solomon-erasure`), 3 RS GF(2¹⁶) (`reed-solomon-simd`) |
//! | 1 | 1 | XOR: layer (< 8); RS: parity index (< parity count) |
//! | 2 | 1 | member count n (1..=64) |
//! | 3 | 1 | XOR: 0; RS: parity count m (1..=32) |
//! | 4 | 2 | XOR: the members' lengths XORed; RS: 0 |
//! | 6 | 2 | payload length p |
//! | 8 | 8 | first member's seq |
//! | 16 | 4 × (n − 1) | each further member's gap to the one before (≥ 1; all gaps ≤ 65,536 in sum) |
//! | 16 + 4(n − 1) | p | payload: XOR: ≤ 16,384; RS: the shard, even, 2..=16,386 |
//!
//! The bytes come off the network, authenticated but from a peer whose bugs we must survive:
//! `parse` checks every field and the exact length, and never panics.

use super::{Repair, Scheme, DATA_MAX, LAYERS_MAX, MEMBERS_MAX, PARITY_MAX, SPAN_MAX};

/// Bytes before the gaps.
pub const HEADER_LEN: usize = 16;
/// The largest repair body: a full header and the largest payload.
pub const REPAIR_MAX: usize = HEADER_LEN + 4 * (MEMBERS_MAX - 1) + DATA_MAX + 2;

/// Why repair bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RepairError {
    #[error("shorter than its header and gaps")]
    Short,
    #[error("length does not match the header")]
    Length,
    #[error("unknown scheme {0}")]
    UnknownScheme(u8),
    #[error("member count {0} out of range")]
    Members(u8),
    #[error("layer or parity index {index} out of range (parity count {parity_count})")]
    Index { index: u8, parity_count: u8 },
    #[error("a field that must be zero is not")]
    NotZero,
    #[error("members not strictly increasing or spread over more than the span")]
    Span,
    #[error("payload of {0} bytes out of range")]
    Payload(usize),
}

/// The repair's bytes. The caller builds repairs with the encoders, which keep every field in
/// range; `parse(&encode(r)) == Ok(r)` for those.
pub fn encode(r: &Repair) -> Vec<u8> {
    let n = r.members.len();
    let mut v = Vec::with_capacity(HEADER_LEN + 4 * n.saturating_sub(1) + r.payload.len());
    v.push(r.scheme as u8);
    v.push(r.index);
    v.push(n as u8);
    v.push(r.parity_count);
    v.extend_from_slice(&r.len_xor.to_be_bytes());
    v.extend_from_slice(&(r.payload.len() as u16).to_be_bytes());
    v.extend_from_slice(&r.members.first().copied().unwrap_or(0).to_be_bytes());
    for w in r.members.windows(2) {
        v.extend_from_slice(&((w[1] - w[0]) as u32).to_be_bytes());
    }
    v.extend_from_slice(&r.payload);
    v
}

/// Parses and checks repair bytes.
pub fn parse(b: &[u8]) -> Result<Repair, RepairError> {
    let head: &[u8; HEADER_LEN] = b
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(RepairError::Short)?;
    let scheme = Scheme::from_u8(head[0]).ok_or(RepairError::UnknownScheme(head[0]))?;
    let (index, count, parity_count) = (head[1], head[2], head[3]);
    let len_xor = u16::from_be_bytes([head[4], head[5]]);
    let payload_len = usize::from(u16::from_be_bytes([head[6], head[7]]));
    let mut first = [0u8; 8];
    first.copy_from_slice(&head[8..16]);
    let first = u64::from_be_bytes(first);

    let n = usize::from(count);
    if n == 0 || n > MEMBERS_MAX {
        return Err(RepairError::Members(count));
    }
    check_scheme_fields(scheme, index, parity_count, len_xor, n)?;
    let gaps_len = 4 * (n - 1);
    let gaps = b
        .get(HEADER_LEN..HEADER_LEN + gaps_len)
        .ok_or(RepairError::Short)?;
    if b.len() != HEADER_LEN + gaps_len + payload_len {
        return Err(RepairError::Length);
    }
    check_payload(scheme, payload_len)?;
    let members = members(first, gaps)?;
    Ok(Repair {
        scheme,
        index,
        parity_count,
        len_xor,
        members,
        payload: b[HEADER_LEN + gaps_len..].to_vec(),
    })
}

fn check_scheme_fields(
    scheme: Scheme,
    index: u8,
    parity_count: u8,
    len_xor: u16,
    members: usize,
) -> Result<(), RepairError> {
    let bad_index = RepairError::Index {
        index,
        parity_count,
    };
    match scheme {
        Scheme::Xor => {
            if usize::from(index) >= LAYERS_MAX {
                return Err(bad_index);
            }
            if parity_count != 0 {
                return Err(RepairError::NotZero);
            }
        }
        Scheme::RsErasure | Scheme::RsSimd => {
            let m = usize::from(parity_count);
            if m == 0 || m > PARITY_MAX || index >= parity_count {
                return Err(bad_index);
            }
            if len_xor != 0 {
                return Err(RepairError::NotZero);
            }
            // GF(2⁸) has 256 shards per block: members + parity fit (64 + 32).
            debug_assert!(members + m <= 256);
        }
    }
    Ok(())
}

fn check_payload(scheme: Scheme, len: usize) -> Result<(), RepairError> {
    let ok = match scheme {
        Scheme::Xor => len <= DATA_MAX,
        // A shard is the packet's length (2 bytes) and its bytes, padded to an even length.
        Scheme::RsErasure | Scheme::RsSimd => {
            (2..=DATA_MAX + 2).contains(&len) && len.is_multiple_of(2)
        }
    };
    if ok {
        Ok(())
    } else {
        Err(RepairError::Payload(len))
    }
}

fn members(first: u64, gaps: &[u8]) -> Result<Vec<u64>, RepairError> {
    let mut out = Vec::with_capacity(gaps.len() / 4 + 1);
    out.push(first);
    let mut seq = first;
    for g in gaps.chunks_exact(4) {
        let gap = u64::from(u32::from_be_bytes([g[0], g[1], g[2], g[3]]));
        if gap == 0 {
            return Err(RepairError::Span);
        }
        seq = seq.checked_add(gap).ok_or(RepairError::Span)?;
        if seq - first > SPAN_MAX {
            return Err(RepairError::Span);
        }
        out.push(seq);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xor_repair() -> Repair {
        Repair {
            scheme: Scheme::Xor,
            index: 2,
            parity_count: 0,
            len_xor: 1400 ^ 1300,
            members: vec![1_000, 1_100, 1_237, 1_300],
            payload: vec![0xa5; 1400],
        }
    }

    fn rs_repair() -> Repair {
        Repair {
            scheme: Scheme::RsSimd,
            index: 1,
            parity_count: 3,
            len_xor: 0,
            members: (10..18).collect(),
            payload: vec![7; 1402],
        }
    }

    #[test]
    fn repairs_round_trip() {
        for r in [xor_repair(), rs_repair()] {
            let b = encode(&r);
            assert_eq!(
                b.len(),
                HEADER_LEN + 4 * (r.members.len() - 1) + r.payload.len()
            );
            assert_eq!(parse(&b), Ok(r));
        }
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let b = encode(&xor_repair());
        for n in 0..b.len() {
            assert!(parse(&b[..n]).is_err(), "truncated to {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(parse(&long), Err(RepairError::Length));
    }

    #[test]
    fn impossible_fields_are_refused() {
        let b = encode(&xor_repair());
        let with = |at: usize, v: &[u8]| {
            let mut x = b.clone();
            x[at..at + v.len()].copy_from_slice(v);
            parse(&x)
        };
        assert_eq!(with(0, &[0]), Err(RepairError::UnknownScheme(0)));
        assert_eq!(with(0, &[9]), Err(RepairError::UnknownScheme(9)));
        assert!(matches!(with(1, &[8]), Err(RepairError::Index { .. })));
        assert_eq!(with(2, &[0]), Err(RepairError::Members(0)));
        assert_eq!(with(2, &[65]), Err(RepairError::Members(65)));
        assert_eq!(with(3, &[1]), Err(RepairError::NotZero));
        assert_eq!(with(6, &[0xff, 0xff]), Err(RepairError::Length));
        assert_eq!(with(16, &[0, 0, 0, 0]), Err(RepairError::Span), "zero gap");
        assert_eq!(
            with(16, &[0, 1, 0, 0]),
            Err(RepairError::Span),
            "wider than SPAN_MAX"
        );
        assert_eq!(with(8, &[0xff; 8]), Err(RepairError::Span), "seq overflow");
        // An XOR payload longer than DATA_MAX, consistent otherwise.
        let mut r = xor_repair();
        r.payload = vec![0; DATA_MAX + 1];
        assert_eq!(parse(&encode(&r)), Err(RepairError::Payload(DATA_MAX + 1)));

        let rs = encode(&rs_repair());
        let with_rs = |at: usize, v: &[u8]| {
            let mut x = rs.clone();
            x[at..at + v.len()].copy_from_slice(v);
            parse(&x)
        };
        assert!(matches!(with_rs(1, &[3]), Err(RepairError::Index { .. })));
        assert!(matches!(with_rs(3, &[0]), Err(RepairError::Index { .. })));
        assert!(matches!(with_rs(3, &[33]), Err(RepairError::Index { .. })));
        assert_eq!(with_rs(4, &[0, 1]), Err(RepairError::NotZero));
        let mut r = rs_repair();
        r.payload = vec![0; 1401];
        assert_eq!(parse(&encode(&r)), Err(RepairError::Payload(1401)), "odd");
        r.payload = vec![];
        assert_eq!(parse(&encode(&r)), Err(RepairError::Payload(0)));
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let good = encode(&rs_repair());
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            if let Ok(r) = parse(&b) {
                accepted += 1;
                // Whatever is accepted is within every bound.
                assert!(r.members.len() <= MEMBERS_MAX);
                assert!(r.members.windows(2).all(|w| w[0] < w[1]));
                assert!(r.members[r.members.len() - 1] - r.members[0] <= SPAN_MAX);
                assert!(r.index < r.parity_count);
            }
            let n = rng.gen_range(0..64);
            let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            let _ = parse(&junk);
        }
        assert!(
            accepted > 0,
            "payload bytes changed are still valid repairs"
        );
    }

    #[test]
    fn a_repair_travels_as_a_sealed_repair_packet() {
        use crate::datagram::{Kind, Opener, Sealer};
        let key = [3u8; crate::datagram::KEY_LEN];
        let r = xor_repair();
        let (_, d) = Sealer::new(&key, 4)
            .seal(Kind::Repair, &encode(&r))
            .expect("seal");
        let opened = Opener::new(&key, 4).open(&d).expect("open");
        assert_eq!(opened.kind, Kind::Repair);
        assert_eq!(parse(&opened.body), Ok(r));
        let mut big = rs_repair();
        big.members = (0..MEMBERS_MAX as u64).collect();
        big.payload = vec![1; DATA_MAX + 2];
        assert_eq!(encode(&big).len(), REPAIR_MAX);
        assert!(
            Sealer::new(&key, 4)
                .seal(Kind::Repair, &encode(&big))
                .is_some(),
            "the largest repair fits a datagram"
        );
    }
}
