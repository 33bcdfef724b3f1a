//! What a journal record travels as over the UDP data path, shared by the binary's shells
//! (`net::udp`, `net::serve::udp`) and the network simulation: the body of a one-record
//! `Records` message (settled watermark and journal frame, `docs/protocol.md`), so the mirror
//! checks and appends records from datagrams exactly as a TCP batch.

use super::UdpReceiver;
use crate::link::LinkError;
use crate::op::Record;
use crate::wire::{error_code, msg_type, Msg};

/// The body record `record` travels as, with the primary's settled watermark `settled`.
pub fn record_body(settled: u64, record: Record) -> Vec<u8> {
    Msg::Records {
        settled: settled.max(record.seq),
        records: vec![record],
    }
    .encode_body()
}

/// One record from the UDP path: the body of a one-record `Records` message carrying `seq`,
/// and its settled watermark. Anything else came authenticated from the primary, so it is the
/// primary's error: the session ends.
pub fn decode_record(seq: u64, body: &[u8]) -> Result<(u64, Record), LinkError> {
    let bad = |why: String| LinkError {
        code: error_code::BAD_FRAME,
        message: format!("record {seq} over UDP: {why}"),
        retry: true,
    };
    match Msg::decode_body(msg_type::RECORDS, body) {
        Ok(Msg::Records {
            settled,
            mut records,
        }) if records.len() == 1 && records[0].seq == seq => {
            let r = records.remove(0);
            Ok((settled, r))
        }
        Ok(_) => Err(bad("not exactly that record".into())),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Every record the receiver has whole, in journal order, as one `Records` batch for the
/// session's checks (`Session::on_message`), with the highest settled watermark they carried;
/// `None` if no record is whole.
pub fn take_batch(rx: &mut UdpReceiver) -> Result<Option<Msg>, LinkError> {
    let mut records = Vec::new();
    let mut settled = 0;
    while let Some((seq, body)) = rx.pop_record() {
        let (s, r) = decode_record(seq, &body)?;
        settled = settled.max(s);
        records.push(r);
    }
    Ok((!records.is_empty()).then_some(Msg::Records { settled, records }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Op;

    #[test]
    fn a_record_body_decodes_to_the_record_and_its_settled_watermark() {
        let r = Record {
            seq: 7,
            op: Op::Abort { seq: 6 },
        };
        let body = record_body(3, r.clone());
        // The watermark is never below the record's own seq.
        assert_eq!(decode_record(7, &body), Ok((7, r.clone())));
        let body = record_body(9, r.clone());
        assert_eq!(decode_record(7, &body), Ok((9, r)));
        let wrong = decode_record(8, &body).expect_err("another seq is refused");
        assert_eq!(wrong.code, error_code::BAD_FRAME);
        assert!(decode_record(7, &body[..body.len() - 1]).is_err());
    }
}
