//! The decoder's window of data packets: what is held of the newest `seqs` numbers, within a
//! byte budget shared with the scheme's unfinished repairs; and the steps every scheme's
//! decoder takes when a packet arrives, before and after its own (`Windowed`, `receive_data`,
//! `admit_repair`).

use std::collections::VecDeque;

use super::{members_valid, DecoderStats, Recovery, Refused, Repair, Scheme, Window, DATA_MAX};

const SPARE_MAX: usize = 64;

/// What is known of one seq.
#[derive(Debug, Default)]
pub(crate) enum Slot {
    /// Nothing: not received, and no repair named it.
    #[default]
    Unknown,
    /// A repair named it; neither received nor rebuilt yet.
    Wanted,
    /// Received or rebuilt.
    Held(Vec<u8>),
}

pub(crate) struct Store {
    pub(crate) window: Window,
    /// Seq of `slots[0]`; `None` until the first packet.
    base: Option<u64>,
    slots: VecDeque<Slot>,
    /// Bytes of held data plus what the scheme charged for its repairs.
    pub(crate) bytes: usize,
    /// Buffers of evicted packets, reused for the next ones (a packet a malloc and a free
    /// less); at most `SPARE_MAX`, outside the byte budget (at most 64 x `DATA_MAX`).
    spare: Vec<Vec<u8>>,
    pub(crate) stats: DecoderStats,
}

/// Where a seq falls.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// In the window (which may have moved forward to take it).
    In,
    /// Older than the window.
    Late,
}

impl Store {
    pub(crate) fn new(window: Window) -> Store {
        Store {
            window: Window {
                seqs: window.seqs.max(1),
                bytes: window.bytes,
            },
            base: None,
            slots: VecDeque::new(),
            bytes: 0,
            spare: Vec::new(),
            stats: DecoderStats::default(),
        }
    }

    /// The oldest seq the window holds.
    pub(crate) fn base(&self) -> u64 {
        self.base.unwrap_or(0)
    }

    /// Makes room for `seq`, moving the window forward if it is newer than the window's top;
    /// what falls out is reported to `out`.
    pub(crate) fn admit(&mut self, seq: u64, out: &mut Vec<Recovery>) -> Admit {
        let base = *self
            .base
            // The first packet need not be the oldest: leave room for earlier ones.
            .get_or_insert(seq.saturating_sub(self.window.seqs / 2));
        if seq < base {
            return Admit::Late;
        }
        let top = base.saturating_add(self.window.seqs - 1);
        if seq > top {
            self.evict_below(seq - (self.window.seqs - 1), out);
        }
        Admit::In
    }

    fn index(&self, seq: u64) -> Option<usize> {
        let base = self.base?;
        let i = seq.checked_sub(base)?;
        (i < self.window.seqs).then_some(i as usize)
    }

    pub(crate) fn get(&self, seq: u64) -> Option<&Slot> {
        self.index(seq).and_then(|i| self.slots.get(i))
    }

    pub(crate) fn held(&self, seq: u64) -> Option<&[u8]> {
        match self.get(seq) {
            Some(Slot::Held(d)) => Some(d),
            _ => None,
        }
    }

    fn slot_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        let i = self.index(seq)?;
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, Slot::default);
        }
        self.slots.get_mut(i)
    }

    /// Marks an admitted seq that is not held as wanted by a repair.
    pub(crate) fn want(&mut self, seq: u64) {
        if let Some(s) = self.slot_mut(seq) {
            if matches!(s, Slot::Unknown) {
                *s = Slot::Wanted;
            }
        }
    }

    /// Holds a copy of a received packet; false if it was already held.
    pub(crate) fn hold_copy(&mut self, seq: u64, data: &[u8]) -> bool {
        if matches!(self.get(seq), Some(Slot::Held(_))) {
            return false;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        self.hold(seq, buf)
    }

    /// Holds the bytes of an admitted seq; false if it was already held.
    pub(crate) fn hold(&mut self, seq: u64, data: Vec<u8>) -> bool {
        let len = data.len();
        match self.slot_mut(seq) {
            Some(s) if !matches!(s, Slot::Held(_)) => *s = Slot::Held(data),
            _ => return false,
        }
        self.bytes += len;
        true
    }

    /// Moves the window's bottom up to `new_base`, reporting wanted seqs as lost.
    pub(crate) fn evict_below(&mut self, new_base: u64, out: &mut Vec<Recovery>) {
        let Some(base) = self.base else { return };
        if new_base <= base {
            return;
        }
        let drop = usize::try_from(new_base - base)
            .unwrap_or(usize::MAX)
            .min(self.slots.len());
        for (i, slot) in self.slots.drain(..drop).enumerate() {
            match slot {
                Slot::Unknown => {}
                Slot::Wanted => {
                    self.stats.lost += 1;
                    out.push(Recovery::Lost {
                        seq: base + i as u64,
                    });
                }
                Slot::Held(d) => {
                    self.stats.evicted_data += 1;
                    self.bytes -= d.len();
                    if self.spare.len() < SPARE_MAX {
                        self.spare.push(d);
                    }
                }
            }
        }
        self.base = Some(new_base);
    }

    pub(crate) fn over_budget(&self) -> bool {
        self.bytes > self.window.bytes
    }

    /// The oldest seq with something known of it (held or wanted).
    pub(crate) fn oldest_used(&self) -> Option<u64> {
        let i = self
            .slots
            .iter()
            .position(|s| !matches!(s, Slot::Unknown))?;
        Some(self.base() + i as u64)
    }
}

/// A scheme's decoder around a `Store`: what the shared arrival steps need of it.
pub(crate) trait Windowed {
    /// The repairs this decoder takes.
    fn scheme(&self) -> Scheme;
    fn store(&mut self) -> &mut Store;
    /// Drops the scheme's unfinished repairs that reach below the window's bottom.
    fn drop_repairs_below_base(&mut self);
    /// The first member of the oldest unfinished repair.
    fn oldest_repair(&self) -> Option<u64>;
    /// Keeps the window's bounds, the scheme's unfinished repairs counted: repairs below its
    /// bottom go, and past the byte budget the oldest seq in use (held, wanted, or a repair's
    /// first member) goes, one at a time.
    fn prune(&mut self, out: &mut Vec<Recovery>) {
        self.drop_repairs_below_base();
        while self.store().over_budget() {
            let oldest_repair = self.oldest_repair();
            let oldest = match (self.store().oldest_used(), oldest_repair) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(s) => s,
                    None => break,
                },
            };
            self.store().evict_below(oldest + 1, out);
            self.drop_repairs_below_base();
        }
    }
    /// What the scheme requires of a repair's fields besides its members.
    fn fields_valid(&self, _repair: &Repair) -> bool {
        true
    }
}

/// A data packet arriving: held, unless it is larger than FEC protects (never protected),
/// older than the window (counted late) or already held (counted a duplicate). True if it is
/// newly held: the scheme then takes it, and prunes after.
pub(crate) fn receive_data<D: Windowed>(
    d: &mut D,
    seq: u64,
    data: &[u8],
    out: &mut Vec<Recovery>,
) -> bool {
    if data.len() > DATA_MAX {
        // Never protected (encoders refuse it): nothing to hold it for.
        return false;
    }
    if d.store().admit(seq, out) == Admit::Late {
        d.store().stats.late += 1;
        return false;
    }
    d.prune(out);
    if !d.store().hold_copy(seq, data) {
        d.store().stats.duplicates += 1;
        return false;
    }
    true
}

/// A repair arriving: refused if it is of another scheme, its members or fields are not
/// valid, or it spans more than the window; `None` (counted late) if it reaches below the
/// window; else its first member, with the window moved to take it and pruned: the scheme then
/// takes it, and prunes after.
pub(crate) fn admit_repair<D: Windowed>(
    d: &mut D,
    repair: &Repair,
    out: &mut Vec<Recovery>,
) -> Result<Option<u64>, Refused> {
    if repair.scheme != d.scheme() {
        return Err(Refused::OtherScheme(repair.scheme));
    }
    let (Some(&first), Some(&last)) = (repair.members.first(), repair.members.last()) else {
        return Err(Refused::Contradicts);
    };
    if !members_valid(&repair.members) || !d.fields_valid(repair) {
        return Err(Refused::Contradicts);
    }
    if last - first >= d.store().window.seqs {
        return Err(Refused::TooWide);
    }
    if d.store().admit(last, out) == Admit::Late || first < d.store().base() {
        d.store().stats.late += 1;
        return Ok(None);
    }
    d.prune(out);
    Ok(Some(first))
}
