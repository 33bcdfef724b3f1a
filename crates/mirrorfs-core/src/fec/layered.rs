//! Layered interleaving (Maelstrom): c layers of XOR repairs over r data packets each.
//!
//! Layer i at distance d sorts the data packets by their position n in the stream into d
//! classes (n mod d); a class's packets are XORed in groups of r, so one repair covers packets
//! n, n + d, …, n + (r − 1)d, and a burst of up to d consecutive losses costs each repair of
//! the layer at most one member. Stagger: the first group of class j in layer i has only
//! r − ((j + i·r/c) mod r) members, so the groups of a layer complete about one every r
//! packets, and the layers are offset from one another, instead of d repairs leaving at once.
//!
//! Decoding is peeling: a repair with exactly one member neither received nor rebuilt rebuilds
//! it (the XOR of the payload and the other members; its length is the lengths' XOR likewise);
//! a rebuilt packet counts as received for every other repair naming it, so losses cascade out
//! across layers. Work is lazy: a repair whose members all arrive is dropped without an XOR.

use std::collections::{BTreeMap, HashMap};

use super::window::{admit_repair, receive_data, Slot, Store, Windowed};
use super::{
    xor_into, ConfigError, DecoderStats, EncodeError, FecDecoder, FecEncoder, Recovery, Refused,
    Repair, Scheme, Window, DATA_MAX, LAYERS_MAX, MEMBERS_MAX, SPAN_MAX,
};

/// Layered interleaving's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layers {
    /// Data packets per repair (r).
    pub r: usize,
    /// Each layer's interleave distance (c = the number of layers).
    pub distances: Vec<u32>,
}

impl Default for Layers {
    /// Maelstrom's (r, c) = (8, 3), as in the SMFS evaluation.
    fn default() -> Layers {
        Layers {
            r: 8,
            distances: vec![1, 10, 100],
        }
    }
}

/// One open XOR group.
#[derive(Debug, Default)]
struct Group {
    members: Vec<u64>,
    len_xor: u16,
    acc: Vec<u8>,
    /// Members at which it completes.
    target: usize,
}

struct Layer {
    distance: u64,
    /// One open group per class.
    classes: Vec<Group>,
}

pub struct LayeredEncoder {
    r: usize,
    layers: Vec<Layer>,
    /// Data packets taken so far (the next one's position n).
    pushed: u64,
    last: Option<u64>,
}

impl LayeredEncoder {
    pub fn new(p: Layers) -> Result<LayeredEncoder, ConfigError> {
        if p.r == 0 || p.r > MEMBERS_MAX {
            return Err(ConfigError::Members(p.r));
        }
        let c = p.distances.len();
        if c == 0 || c > LAYERS_MAX || p.distances.contains(&0) {
            return Err(ConfigError::Layers(p.distances));
        }
        let layers = p
            .distances
            .iter()
            .enumerate()
            .map(|(i, &d)| Layer {
                distance: u64::from(d),
                classes: (0..d as usize)
                    .map(|j| Group {
                        target: p.r - (j + i * p.r / c) % p.r,
                        ..Group::default()
                    })
                    .collect(),
            })
            .collect();
        Ok(LayeredEncoder {
            r: p.r,
            layers,
            pushed: 0,
            last: None,
        })
    }
}

fn close(group: &mut Group, layer: usize, r: usize, out: &mut Vec<Repair>) {
    if group.members.is_empty() {
        return;
    }
    out.push(Repair {
        scheme: Scheme::Xor,
        index: layer as u8,
        parity_count: 0,
        len_xor: group.len_xor,
        members: std::mem::take(&mut group.members),
        payload: std::mem::take(&mut group.acc),
    });
    group.len_xor = 0;
    group.target = r;
}

impl FecEncoder for LayeredEncoder {
    fn push(&mut self, seq: u64, data: &[u8], out: &mut Vec<Repair>) -> Result<(), EncodeError> {
        if data.len() > DATA_MAX {
            return Err(EncodeError::TooLarge { len: data.len() });
        }
        if let Some(last) = self.last.filter(|l| seq <= *l) {
            return Err(EncodeError::SeqNotIncreasing { seq, last });
        }
        self.last = Some(seq);
        let n = self.pushed;
        self.pushed += 1;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let g = &mut layer.classes[(n % layer.distance) as usize];
            // Seqs that jumped far (a long pause in numbering) close the group early: a
            // repair's members stay within SPAN_MAX.
            if g.members.first().is_some_and(|f| seq - f > SPAN_MAX) {
                close(g, i, self.r, out);
            }
            g.members.push(seq);
            g.len_xor ^= data.len() as u16;
            xor_into(&mut g.acc, data);
            if g.members.len() >= g.target {
                close(g, i, self.r, out);
            }
        }
        Ok(())
    }

    fn flush(&mut self, out: &mut Vec<Repair>) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for g in &mut layer.classes {
                close(g, i, self.r, out);
            }
        }
    }

    fn oldest_open(&self) -> Option<u64> {
        let firsts = self.layers.iter().flat_map(|l| &l.classes);
        firsts.filter_map(|g| g.members.first().copied()).min()
    }
}

/// A repair waiting for members.
struct Pending {
    members: Vec<u64>,
    len_xor: u16,
    payload: Vec<u8>,
    /// Members neither received nor rebuilt.
    missing: usize,
}

/// Repairs are kept in order of their first member, so the window's bottom prunes them.
type Key = (u64, u64);

pub struct LayeredDecoder {
    store: Store,
    pending: BTreeMap<Key, Pending>,
    /// Missing seq → the pending repairs naming it.
    waiting: HashMap<u64, Vec<Key>>,
    serial: u64,
}

impl LayeredDecoder {
    pub fn new(window: Window) -> LayeredDecoder {
        LayeredDecoder {
            store: Store::new(window),
            pending: BTreeMap::new(),
            waiting: HashMap::new(),
            serial: 0,
        }
    }

    /// Takes a packet that is now held (received or rebuilt), and everything it rebuilds.
    fn arrived(&mut self, seq: u64, out: &mut Vec<Recovery>) {
        let mut work = vec![seq];
        while let Some(s) = work.pop() {
            for key in self.waiting.remove(&s).unwrap_or_default() {
                let Some(p) = self.pending.get_mut(&key) else {
                    continue;
                };
                p.missing -= 1;
                match p.missing {
                    0 => {
                        self.discard(key);
                    }
                    1 => {
                        if let Some(rebuilt) = self.rebuild(key, out) {
                            work.push(rebuilt);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn discard(&mut self, key: Key) -> Option<Pending> {
        let p = self.pending.remove(&key)?;
        self.store.bytes -= p.payload.len();
        Some(p)
    }

    /// Rebuilds the one missing member of a repair; the seq rebuilt, if it added up.
    fn rebuild(&mut self, key: Key, out: &mut Vec<Recovery>) -> Option<u64> {
        let p = self.discard(key)?;
        let mut missing = Vec::with_capacity(1);
        let mut acc = p.payload;
        let mut len = p.len_xor;
        for &m in &p.members {
            match self.store.held(m) {
                Some(d) => {
                    xor_into(&mut acc, d);
                    len ^= d.len() as u16;
                }
                None => missing.push(m),
            }
        }
        // The count kept may lag (a packet rebuilt in the same cascade but not yet taken off
        // the waiting lists): none missing then, and nothing to do. More than one cannot be,
        // and would make the XOR wrong.
        let seq = match missing[..] {
            [seq] => seq,
            [] => return None,
            _ => {
                self.store.stats.inconsistent += 1;
                return None;
            }
        };
        if let Some(w) = self.waiting.get_mut(&seq) {
            w.retain(|k| *k != key);
        }
        let len = usize::from(len);
        // A member longer than the payload, or a payload not zero past the rebuilt length,
        // means the repair and the data disagree: hand on nothing rather than wrong bytes.
        if len > acc.len() || acc[len..].iter().any(|b| *b != 0) {
            self.store.stats.inconsistent += 1;
            return None;
        }
        acc.truncate(len);
        self.store.hold(seq, acc.clone());
        self.store.stats.rebuilt += 1;
        out.push(Recovery::Rebuilt { seq, data: acc });
        Some(seq)
    }
}

impl Windowed for LayeredDecoder {
    fn scheme(&self) -> Scheme {
        Scheme::Xor
    }

    fn store(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Drops the repairs that reach below the window's bottom.
    fn drop_repairs_below_base(&mut self) {
        let base = self.store.base();
        while let Some((&key, _)) = self.pending.first_key_value() {
            if key.0 >= base {
                break;
            }
            let Some(p) = self.discard(key) else { break };
            self.store.stats.evicted_repairs += 1;
            for m in p.members {
                if let Some(w) = self.waiting.get_mut(&m) {
                    w.retain(|k| *k != key);
                    if w.is_empty() {
                        self.waiting.remove(&m);
                    }
                }
            }
        }
    }

    fn oldest_repair(&self) -> Option<u64> {
        self.pending.first_key_value().map(|(k, _)| k.0)
    }
}

impl FecDecoder for LayeredDecoder {
    fn on_data(&mut self, seq: u64, data: &[u8], out: &mut Vec<Recovery>) {
        if receive_data(self, seq, data, out) {
            self.arrived(seq, out);
            self.prune(out);
        }
    }

    fn on_repair(&mut self, repair: Repair, out: &mut Vec<Recovery>) -> Result<(), Refused> {
        let Some(first) = admit_repair(self, &repair, out)? else {
            return Ok(());
        };
        let missing: Vec<u64> = repair
            .members
            .iter()
            .copied()
            .filter(|m| self.store.held(*m).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.serial += 1;
        let key = (first, self.serial);
        for &m in &missing {
            self.store.want(m);
            self.waiting.entry(m).or_default().push(key);
        }
        self.store.bytes += repair.payload.len();
        self.pending.insert(
            key,
            Pending {
                members: repair.members,
                len_xor: repair.len_xor,
                payload: repair.payload,
                missing: missing.len(),
            },
        );
        if missing.len() == 1 {
            if let Some(seq) = self.rebuild(key, out) {
                self.arrived(seq, out);
            }
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

impl LayeredDecoder {
    /// Whether seq is held (received or rebuilt): for tests and the benchmark's checks.
    pub fn holds(&self, seq: u64) -> bool {
        matches!(self.store.get(seq), Some(Slot::Held(_)))
    }
}
