//! Forward error correction for the UDP data path (issue 8), sans I/O: repair packets that let
//! a receiver rebuild lost data packets without a round trip.
//!
//! ```text
//!  sender:   data packet (seq, bytes) ─▶ FecEncoder::push ─▶ Repair ─▶ codec::encode ─▶ Kind::Repair
//!  receiver: data packet ─▶ FecDecoder::on_data ─┐
//!            Kind::Repair ─▶ codec::parse ─▶ FecDecoder::on_repair ─┴▶ Recovery (data rebuilt / lost)
//! ```
//!
//! A *seq* is the number the sender gives a data packet; FEC makes no assumption about the
//! numbers except that they increase: a repair packet lists its members explicitly (first seq and
//! the gaps), so the sealed packet number can serve as the seq even though repair packets take
//! numbers between data packets. Two schemes, behind the same [`FecEncoder`] / [`FecDecoder`]:
//!
//! - **Layered interleaving** (`layered`, Maelstrom): c layers of XOR repairs, each over r data
//!   packets; layer i takes every d_i-th packet, so a burst of up to d_i losses costs each of its
//!   repairs at most one member. Repairs of one layer are staggered so that one goes out about
//!   every r data packets. Default (r, c) = (8, 3) at distances 1, 10, 100.
//! - **Reed–Solomon blocks** (`rs`): k data + m parity packets per block, any k of the k + m
//!   rebuild the block; over the `reed-solomon-erasure` (GF(2⁸)) or `reed-solomon-simd`
//!   (GF(2¹⁶), FFT) crate. Default (k, m) = (8, 3): the same 37.5 % overhead as (8, 3) layered.
//!
//! The decoder holds a bounded window (`Window`): the data packets and unfinished repairs of the
//! newest `seqs` numbers, at most `bytes` bytes; what falls out is counted, and a packet a repair
//! named that was neither received nor rebuilt when it falls out is reported as
//! [`Recovery::Lost`] (the caller NAKs it). A rebuilt packet is checked (length in range, the
//! padding zero) before it is handed on; a repair that does not add up is dropped and counted.
//! Layouts and recovery rules: `docs/protocol.md`, "FEC".

pub mod codec;
pub mod layered;
pub mod rs;
mod window;

#[cfg(test)]
mod tests;

/// The largest data packet FEC protects (its lengths travel as u16).
pub const DATA_MAX: usize = 16_384;
/// The most data packets one repair packet covers (r of a layer, k of a block).
pub const MEMBERS_MAX: usize = 64;
/// The most layers (c) of layered interleaving.
pub const LAYERS_MAX: usize = 8;
/// The most parity packets (m) of a Reed–Solomon block.
pub const PARITY_MAX: usize = 32;
/// The members of one repair lie within this many seqs (first to last).
pub const SPAN_MAX: u64 = 1 << 16;

/// Which code made a repair packet (its first byte on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Layered interleaving: XOR of the members.
    Xor = 1,
    /// Reed–Solomon over GF(2⁸), `reed-solomon-erasure`.
    RsErasure = 2,
    /// Reed–Solomon over GF(2¹⁶), `reed-solomon-simd`.
    RsSimd = 3,
}

impl Scheme {
    pub fn from_u8(b: u8) -> Option<Scheme> {
        match b {
            1 => Some(Scheme::Xor),
            2 => Some(Scheme::RsErasure),
            3 => Some(Scheme::RsSimd),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scheme::Xor => "layered-xor",
            Scheme::RsErasure => "rs-erasure",
            Scheme::RsSimd => "rs-simd",
        }
    }
}

/// One repair packet, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub scheme: Scheme,
    /// XOR: the layer. RS: this parity packet's index in its block (< `parity_count`).
    pub index: u8,
    /// RS: the block's parity packets (m). XOR: 0.
    pub parity_count: u8,
    /// XOR: the XOR of the members' lengths. RS: 0 (each shard carries its length).
    pub len_xor: u16,
    /// The data packets covered, strictly increasing, within `SPAN_MAX`.
    pub members: Vec<u64>,
    /// XOR: the members XORed, each zero-padded to the longest. RS: the parity shard.
    pub payload: Vec<u8>,
}

/// Why a data packet was not taken by an encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("data packet of {len} bytes is larger than {DATA_MAX}")]
    TooLarge { len: usize },
    #[error("seq {seq} does not follow {last}")]
    SeqNotIncreasing { seq: u64, last: u64 },
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("members per repair must be 1..={MEMBERS_MAX}, got {0}")]
    Members(usize),
    #[error("layers must be 1..={LAYERS_MAX} with distances >= 1, got {0:?}")]
    Layers(Vec<u32>),
    #[error("parity packets per block must be 1..={PARITY_MAX}, got {0}")]
    Parity(usize),
}

/// The sending side: data packets in, repair packets out as their groups complete.
pub trait FecEncoder {
    /// Takes data packet `seq` (seqs strictly increasing) and appends the repairs it completes
    /// to `out` (at most one per layer, or a block's parity).
    fn push(&mut self, seq: u64, data: &[u8], out: &mut Vec<Repair>) -> Result<(), EncodeError>;
    /// Closes every open group early (the stream pauses: the tail must be protected too) and
    /// appends their repairs to `out`.
    fn flush(&mut self, out: &mut Vec<Repair>);
    /// The oldest seq in a group or block not closed yet: every data packet before it has all
    /// its repairs made. `None` when no group is open.
    fn oldest_open(&self) -> Option<u64>;
}

/// The receiving side: data and repair packets in any order, rebuilt packets out.
pub trait FecDecoder {
    /// A data packet received. Appends what it lets the decoder rebuild, and what fell out of
    /// the window unrecovered, to `out`.
    fn on_data(&mut self, seq: u64, data: &[u8], out: &mut Vec<Recovery>);
    /// A repair packet received (already parsed). Refused if it is of another scheme, spans
    /// more than the window, or contradicts what is known of its block.
    fn on_repair(&mut self, repair: Repair, out: &mut Vec<Recovery>) -> Result<(), Refused>;
    fn stats(&self) -> DecoderStats;
    /// Bytes held now (data packets and unfinished repairs): at most `Window::bytes` after
    /// every call.
    fn bytes_held(&self) -> usize;
}

/// What a decoder reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Data packet `seq` rebuilt from repairs (it was not received).
    Rebuilt { seq: u64, data: Vec<u8> },
    /// Data packet `seq`, named by a repair, fell out of the window neither received nor
    /// rebuilt: FEC cannot help, ask for it again.
    Lost { seq: u64 },
}

/// Why a repair packet was refused by a decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    #[error("repair of scheme {0:?} given to another scheme's decoder")]
    OtherScheme(Scheme),
    #[error("repair spans more seqs than the window")]
    TooWide,
    #[error("repair contradicts what is known of its block")]
    Contradicts,
}

/// The decoder's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Seqs held: a packet older than the newest seq by this many or more is dropped.
    pub seqs: u64,
    /// Bytes held (data packets and unfinished repairs); past it the oldest seqs go first.
    pub bytes: usize,
}

impl Default for Window {
    fn default() -> Window {
        // The deepest default layer spans 8 x 100 data packets, ~1,100 packet numbers with
        // the repairs between them; 4,096 is the datagram replay window.
        Window {
            seqs: 4_096,
            bytes: 16 << 20,
        }
    }
}

/// A decoder's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecoderStats {
    /// Data packets rebuilt.
    pub rebuilt: u64,
    /// Data packets given up (`Recovery::Lost`).
    pub lost: u64,
    /// Data packets received twice, or after they were rebuilt.
    pub duplicates: u64,
    /// Data or repair packets older than the window on arrival.
    pub late: u64,
    /// Data packets held that fell out of the window (by age or by the byte bound).
    pub evicted_data: u64,
    /// Unfinished repairs that fell out of the window.
    pub evicted_repairs: u64,
    /// Repairs whose rebuilt packet did not add up (length out of range, padding not zero).
    pub inconsistent: u64,
}

/// The scheme the data path uses (see docs/benchmarks.md, "FEC", for why).
pub const DEFAULT_SCHEME: Scheme = Scheme::Xor;
/// Reed–Solomon's default block: k data + m parity, the overhead of layered (8, 3).
pub const RS_DEFAULT: (usize, usize) = (8, 3);

/// An encoder of `scheme` with its default parameters: layered (r, c) = (8, 3) at distances
/// 1, 10, 100, or Reed–Solomon `RS_DEFAULT`.
pub fn encoder(scheme: Scheme) -> Box<dyn FecEncoder + Send> {
    let (k, m) = RS_DEFAULT;
    // The defaults are within every bound the constructors check.
    let valid = "the default parameters are valid";
    match scheme {
        Scheme::Xor => match layered::LayeredEncoder::new(layered::Layers::default()) {
            Ok(e) => Box::new(e),
            Err(_) => unreachable!("{valid}"),
        },
        Scheme::RsErasure => match rs::RsEncoder::<rs::Erasure>::new(k, m) {
            Ok(e) => Box::new(e),
            Err(_) => unreachable!("{valid}"),
        },
        Scheme::RsSimd => match rs::RsEncoder::<rs::Simd>::new(k, m) {
            Ok(e) => Box::new(e),
            Err(_) => unreachable!("{valid}"),
        },
    }
}

/// The layered encoder with the first `c` of the default layers ((r, c) = (8, c) at distances
/// 1, 10, 100), or with `c` = 0 none at all: data packets only, to measure what FEC adds.
pub fn layered_encoder(c: usize) -> Result<Box<dyn FecEncoder + Send>, ConfigError> {
    let mut layers = layered::Layers::default();
    if c > layers.distances.len() {
        return Err(ConfigError::Layers(vec![0; c]));
    }
    if c == 0 {
        return Ok(Box::new(NoRepairs { last: None }));
    }
    layers.distances.truncate(c);
    Ok(Box::new(layered::LayeredEncoder::new(layers)?))
}

/// No forward error correction: data packets are checked as any encoder checks them, and no
/// repair is ever made (what the link loses is asked for again by NAK).
struct NoRepairs {
    last: Option<u64>,
}

impl FecEncoder for NoRepairs {
    fn push(&mut self, seq: u64, data: &[u8], _out: &mut Vec<Repair>) -> Result<(), EncodeError> {
        if data.len() > DATA_MAX {
            return Err(EncodeError::TooLarge { len: data.len() });
        }
        if let Some(last) = self.last.filter(|l| seq <= *l) {
            return Err(EncodeError::SeqNotIncreasing { seq, last });
        }
        self.last = Some(seq);
        Ok(())
    }

    fn flush(&mut self, _out: &mut Vec<Repair>) {}

    fn oldest_open(&self) -> Option<u64> {
        None
    }
}

/// A decoder for repairs of `scheme`.
pub fn decoder(scheme: Scheme, window: Window) -> Box<dyn FecDecoder + Send> {
    match scheme {
        Scheme::Xor => Box::new(layered::LayeredDecoder::new(window)),
        Scheme::RsErasure => Box::new(rs::RsDecoder::<rs::Erasure>::new(window)),
        Scheme::RsSimd => Box::new(rs::RsDecoder::<rs::Simd>::new(window)),
    }
}

/// A repair's members as `codec::parse` leaves them: 1..=MEMBERS_MAX, strictly increasing,
/// within SPAN_MAX. Decoders check it again since a `Repair` can be built by hand.
pub(crate) fn members_valid(members: &[u64]) -> bool {
    let (Some(first), Some(last)) = (members.first(), members.last()) else {
        return false;
    };
    members.len() <= MEMBERS_MAX
        && members.windows(2).all(|w| w[0] < w[1])
        && last - first <= SPAN_MAX
}

/// XORs `src` into the start of `acc`; past `acc`'s end, `src` is appended (XOR with the
/// zeros it stands for).
pub(crate) fn xor_into(acc: &mut Vec<u8>, src: &[u8]) {
    let common = acc.len().min(src.len());
    // A plain zip: the compiler turns it into vector XORs.
    for (a, s) in acc[..common].iter_mut().zip(&src[..common]) {
        *a ^= *s;
    }
    acc.extend_from_slice(&src[common..]);
}
