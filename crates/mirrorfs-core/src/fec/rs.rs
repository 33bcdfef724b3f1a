//! Reed–Solomon blocks: every k data packets (in the order pushed) get m parity packets, and
//! any k of the k + m rebuild the block. A shard is the packet's length (u16) and its bytes,
//! zero-padded to the block's longest packet (+ 2, rounded up to even: `reed-solomon-simd`
//! wants even shards), so packets of any size share a block and come back at their length.
//!
//! Two backends: `Erasure` (`reed-solomon-erasure`, GF(2⁸), pure Rust without its C
//! `simd-accel` feature, which would compile for one CPU model) and `Simd`
//! (`reed-solomon-simd`, GF(2¹⁶) with FFTs, picks SSSE3/AVX2/NEON at run time).

use std::collections::{BTreeMap, HashMap};

use super::window::{admit_repair, receive_data, Store, Windowed};
use super::{
    ConfigError, DecoderStats, EncodeError, FecDecoder, FecEncoder, Recovery, Refused, Repair,
    Scheme, Window, DATA_MAX, MEMBERS_MAX, PARITY_MAX, SPAN_MAX,
};

/// A Reed–Solomon implementation.
pub trait Backend: Send + 'static {
    const SCHEME: Scheme;
    fn new() -> Self;
    /// The m parity shards of `data` (k shards of one even length).
    fn encode(&mut self, data: &[Vec<u8>], m: usize) -> Option<Vec<Vec<u8>>>;
    /// Fills the `None`s of `data` (k shards) from those present and `parity` (m shards);
    /// false if there are too few or the backend refuses.
    fn reconstruct(&mut self, data: &mut [Option<Vec<u8>>], parity: &[Option<Vec<u8>>]) -> bool;
}

/// `reed-solomon-erasure`, GF(2⁸).
pub struct Erasure {
    /// Codecs by (k, m): each builds its matrix once. Bounded: cleared past 16 shapes.
    codecs: HashMap<(usize, usize), reed_solomon_erasure::galois_8::ReedSolomon>,
}

impl Erasure {
    fn codec(
        &mut self,
        k: usize,
        m: usize,
    ) -> Option<&reed_solomon_erasure::galois_8::ReedSolomon> {
        if !self.codecs.contains_key(&(k, m)) {
            if self.codecs.len() >= 16 {
                self.codecs.clear();
            }
            let c = reed_solomon_erasure::galois_8::ReedSolomon::new(k, m).ok()?;
            self.codecs.insert((k, m), c);
        }
        self.codecs.get(&(k, m))
    }
}

impl Backend for Erasure {
    const SCHEME: Scheme = Scheme::RsErasure;

    fn new() -> Erasure {
        Erasure {
            codecs: HashMap::new(),
        }
    }

    fn encode(&mut self, data: &[Vec<u8>], m: usize) -> Option<Vec<Vec<u8>>> {
        let len = data.first()?.len();
        let mut parity = vec![vec![0u8; len]; m];
        self.codec(data.len(), m)?
            .encode_sep(data, &mut parity)
            .ok()?;
        Some(parity)
    }

    fn reconstruct(&mut self, data: &mut [Option<Vec<u8>>], parity: &[Option<Vec<u8>>]) -> bool {
        let k = data.len();
        let mut shards: Vec<Option<Vec<u8>>> = data.iter_mut().map(Option::take).collect();
        shards.extend(parity.iter().cloned());
        let ok = match self.codec(k, parity.len()) {
            Some(c) => c.reconstruct_data(&mut shards).is_ok(),
            None => false,
        };
        for (d, s) in data.iter_mut().zip(shards) {
            *d = s;
        }
        ok && data.iter().all(Option::is_some)
    }
}

/// `reed-solomon-simd`, GF(2¹⁶).
pub struct Simd {
    encoder: Option<reed_solomon_simd::ReedSolomonEncoder>,
    decoder: Option<reed_solomon_simd::ReedSolomonDecoder>,
}

impl Backend for Simd {
    const SCHEME: Scheme = Scheme::RsSimd;

    fn new() -> Simd {
        Simd {
            encoder: None,
            decoder: None,
        }
    }

    fn encode(&mut self, data: &[Vec<u8>], m: usize) -> Option<Vec<Vec<u8>>> {
        let (k, len) = (data.len(), data.first()?.len());
        let enc = match &mut self.encoder {
            Some(e) => {
                e.reset(k, m, len).ok()?;
                e
            }
            slot => slot.insert(reed_solomon_simd::ReedSolomonEncoder::new(k, m, len).ok()?),
        };
        for d in data {
            enc.add_original_shard(d).ok()?;
        }
        let result = enc.encode().ok()?;
        Some(result.recovery_iter().map(<[u8]>::to_vec).collect())
    }

    fn reconstruct(&mut self, data: &mut [Option<Vec<u8>>], parity: &[Option<Vec<u8>>]) -> bool {
        let (k, m) = (data.len(), parity.len());
        let Some(len) = parity.iter().flatten().map(Vec::len).next() else {
            return false;
        };
        let dec = match &mut self.decoder {
            Some(d) => match d.reset(k, m, len) {
                Ok(()) => d,
                Err(_) => return false,
            },
            slot => match reed_solomon_simd::ReedSolomonDecoder::new(k, m, len) {
                Ok(d) => slot.insert(d),
                Err(_) => return false,
            },
        };
        for (i, d) in data.iter().enumerate() {
            if let Some(d) = d {
                if dec.add_original_shard(i, d).is_err() {
                    return false;
                }
            }
        }
        for (i, p) in parity.iter().enumerate() {
            if let Some(p) = p {
                if dec.add_recovery_shard(i, p).is_err() {
                    return false;
                }
            }
        }
        let Ok(result) = dec.decode() else {
            return false;
        };
        for (i, shard) in result.restored_original_iter() {
            if let Some(slot) = data.get_mut(i) {
                *slot = Some(shard.to_vec());
            }
        }
        data.iter().all(Option::is_some)
    }
}

/// A packet as a shard of `len` bytes: its length, its bytes, zeros.
fn shard(data: &[u8], len: usize) -> Vec<u8> {
    let mut s = Vec::with_capacity(len);
    s.extend_from_slice(&(data.len() as u16).to_be_bytes());
    s.extend_from_slice(data);
    s.resize(len, 0);
    s
}

/// The packet a rebuilt shard holds; `None` if its length is out of range or the padding is
/// not zero (the shards did not add up).
fn unshard(s: &[u8]) -> Option<Vec<u8>> {
    let len = usize::from(u16::from_be_bytes([*s.first()?, *s.get(1)?]));
    let body = s.get(2..)?;
    if len > body.len() || body[len..].iter().any(|b| *b != 0) {
        return None;
    }
    Some(body[..len].to_vec())
}

pub struct RsEncoder<B: Backend> {
    k: usize,
    m: usize,
    backend: B,
    /// The open block: seqs and packets.
    seqs: Vec<u64>,
    packets: Vec<Vec<u8>>,
    last: Option<u64>,
}

impl<B: Backend> RsEncoder<B> {
    pub fn new(k: usize, m: usize) -> Result<RsEncoder<B>, ConfigError> {
        if k == 0 || k > MEMBERS_MAX {
            return Err(ConfigError::Members(k));
        }
        if m == 0 || m > PARITY_MAX {
            return Err(ConfigError::Parity(m));
        }
        Ok(RsEncoder {
            k,
            m,
            backend: B::new(),
            seqs: Vec::with_capacity(k),
            packets: Vec::with_capacity(k),
            last: None,
        })
    }

    fn close(&mut self, out: &mut Vec<Repair>) {
        if self.seqs.is_empty() {
            return;
        }
        let longest = self.packets.iter().map(Vec::len).max().unwrap_or(0);
        let len = (longest + 2).next_multiple_of(2);
        let shards: Vec<Vec<u8>> = self.packets.iter().map(|p| shard(p, len)).collect();
        let members = std::mem::take(&mut self.seqs);
        self.packets.clear();
        // The backends accept every shape the constructor allows; were one to refuse, the
        // block goes unprotected (its losses are NAKed) rather than the stream stopping.
        let Some(parity) = self.backend.encode(&shards, self.m) else {
            return;
        };
        for (i, payload) in parity.into_iter().enumerate() {
            out.push(Repair {
                scheme: B::SCHEME,
                index: i as u8,
                parity_count: self.m as u8,
                len_xor: 0,
                members: members.clone(),
                payload,
            });
        }
    }
}

impl<B: Backend> FecEncoder for RsEncoder<B> {
    fn push(&mut self, seq: u64, data: &[u8], out: &mut Vec<Repair>) -> Result<(), EncodeError> {
        if data.len() > DATA_MAX {
            return Err(EncodeError::TooLarge { len: data.len() });
        }
        if let Some(last) = self.last.filter(|l| seq <= *l) {
            return Err(EncodeError::SeqNotIncreasing { seq, last });
        }
        self.last = Some(seq);
        if self.seqs.first().is_some_and(|f| seq - f > SPAN_MAX) {
            self.close(out);
        }
        self.seqs.push(seq);
        self.packets.push(data.to_vec());
        if self.seqs.len() == self.k {
            self.close(out);
        }
        Ok(())
    }

    fn flush(&mut self, out: &mut Vec<Repair>) {
        self.close(out);
    }

    fn oldest_open(&self) -> Option<u64> {
        self.seqs.first().copied()
    }
}

/// A block some of whose packets are missing.
struct Block {
    members: Vec<u64>,
    shard_len: usize,
    parity: Vec<Option<Vec<u8>>>,
    parity_held: usize,
    /// Members neither received nor rebuilt.
    missing: usize,
}

pub struct RsDecoder<B: Backend> {
    store: Store,
    backend: B,
    /// Blocks by first member.
    blocks: BTreeMap<u64, Block>,
    /// Missing seq → its block.
    waiting: HashMap<u64, u64>,
}

impl<B: Backend> RsDecoder<B> {
    pub fn new(window: Window) -> RsDecoder<B> {
        RsDecoder {
            store: Store::new(window),
            backend: B::new(),
            blocks: BTreeMap::new(),
            waiting: HashMap::new(),
        }
    }

    fn discard(&mut self, first: u64) -> Option<Block> {
        let b = self.blocks.remove(&first)?;
        self.store.bytes -= b.parity.iter().flatten().map(Vec::len).sum::<usize>();
        for m in &b.members {
            if self.waiting.get(m) == Some(&first) {
                self.waiting.remove(m);
            }
        }
        Some(b)
    }

    /// Rebuilds a block's missing packets once it holds as many shards as it has members.
    fn try_rebuild(&mut self, first: u64, out: &mut Vec<Recovery>) {
        let ready = self
            .blocks
            .get(&first)
            .is_some_and(|b| b.missing <= b.parity_held);
        if !ready {
            return;
        }
        let Some(block) = self.discard(first) else {
            return;
        };
        let mut data = Vec::with_capacity(block.members.len());
        for &m in &block.members {
            match self.store.held(m) {
                Some(d) if d.len() + 2 > block.shard_len => {
                    self.store.stats.inconsistent += 1;
                    return;
                }
                Some(d) => data.push(Some(shard(d, block.shard_len))),
                None => data.push(None),
            }
        }
        let missing: Vec<usize> = (0..data.len()).filter(|i| data[*i].is_none()).collect();
        if !self.backend.reconstruct(&mut data, &block.parity) {
            self.store.stats.inconsistent += 1;
            return;
        }
        for i in missing {
            let packet = data[i].as_deref().and_then(unshard);
            let Some(packet) = packet else {
                self.store.stats.inconsistent += 1;
                continue;
            };
            let seq = block.members[i];
            self.store.hold(seq, packet.clone());
            self.store.stats.rebuilt += 1;
            out.push(Recovery::Rebuilt { seq, data: packet });
        }
    }

    /// Records a parity packet for a block; `Err` if it contradicts what is known.
    fn add_parity(&mut self, repair: Repair) -> Result<Option<u64>, Refused> {
        let first = repair.members[0];
        let index = usize::from(repair.index);
        let m = usize::from(repair.parity_count);
        if let Some(b) = self.blocks.get_mut(&first) {
            if b.members != repair.members
                || b.parity.len() != m
                || b.shard_len != repair.payload.len()
            {
                return Err(Refused::Contradicts);
            }
            if b.parity[index].is_some() {
                return Ok(None);
            }
            self.store.bytes += repair.payload.len();
            b.parity[index] = Some(repair.payload);
            b.parity_held += 1;
            return Ok(Some(first));
        }
        let missing: Vec<u64> = repair
            .members
            .iter()
            .copied()
            .filter(|s| self.store.held(*s).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(None);
        }
        if missing.iter().any(|s| self.waiting.contains_key(s)) {
            // Another block claims a member: blocks never overlap.
            return Err(Refused::Contradicts);
        }
        for &s in &missing {
            self.store.want(s);
            self.waiting.insert(s, first);
        }
        let mut parity = vec![None; m];
        let shard_len = repair.payload.len();
        self.store.bytes += shard_len;
        parity[index] = Some(repair.payload);
        self.blocks.insert(
            first,
            Block {
                members: repair.members,
                shard_len,
                parity,
                parity_held: 1,
                missing: missing.len(),
            },
        );
        Ok(Some(first))
    }
}

impl<B: Backend> Windowed for RsDecoder<B> {
    fn scheme(&self) -> Scheme {
        B::SCHEME
    }

    fn store(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Drops the blocks that reach below the window's bottom, their parity packets with them.
    fn drop_repairs_below_base(&mut self) {
        let base = self.store.base();
        while let Some((&first, _)) = self.blocks.first_key_value() {
            if first >= base {
                break;
            }
            self.discard(first);
            self.store.stats.evicted_repairs += 1;
        }
    }

    fn oldest_repair(&self) -> Option<u64> {
        self.blocks.first_key_value().map(|(k, _)| *k)
    }

    /// A parity packet's index lies within its block's parity packets.
    fn fields_valid(&self, repair: &Repair) -> bool {
        usize::from(repair.index) < usize::from(repair.parity_count)
    }
}

impl<B: Backend> FecDecoder for RsDecoder<B> {
    fn on_data(&mut self, seq: u64, data: &[u8], out: &mut Vec<Recovery>) {
        if !receive_data(self, seq, data, out) {
            return;
        }
        if let Some(first) = self.waiting.remove(&seq) {
            if let Some(b) = self.blocks.get_mut(&first) {
                b.missing -= 1;
                if b.missing == 0 {
                    self.discard(first);
                } else {
                    self.try_rebuild(first, out);
                }
            }
        }
        self.prune(out);
    }

    fn on_repair(&mut self, repair: Repair, out: &mut Vec<Recovery>) -> Result<(), Refused> {
        if admit_repair(self, &repair, out)?.is_none() {
            return Ok(());
        }
        if let Some(first) = self.add_parity(repair)? {
            self.try_rebuild(first, out);
        }
        self.prune(out);
        Ok(())
    }

    fn stats(&self) -> DecoderStats {
        self.store.stats
    }

    fn bytes_held(&self) -> usize {
        self.store.bytes
    }
}
