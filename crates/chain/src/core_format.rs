//! Bitcoin Core's wire formats that both [`crate::BitcoindSource`] and
//! any stand-in for Core (lockstep-sim's `SimNode`) need: the RPC error
//! codes (`src/rpc/protocol.h`), the reject strings `sendrawtransaction`
//! answers with, in both directions, so that a rejection crosses HTTP as
//! the same [`RejectReason`], and the REST interface's serialised block
//! filter. The contract lives here, beside the client, so that a server
//! built on it agrees with the client by construction.

use bitcoin::consensus::encode::deserialize_partial;
use bitcoin::hashes::Hash as _;
use bitcoin::{Amount, BlockHash, OutPoint, Transaction, VarInt};

use crate::source::{FeeRule, InvalidTx, Missing, RejectReason, SourceError, invalid};

/// `RPC_MISC_ERROR`: what Core answers for "Index is not enabled…" and
/// for a call with the wrong number of parameters.
pub const RPC_MISC_ERROR: i64 = -1;
/// `RPC_TYPE_ERROR`: a parameter of the wrong JSON type.
pub const RPC_TYPE_ERROR: i64 = -3;
/// `RPC_INVALID_ADDRESS_OR_KEY`: "Block not found", "No such mempool or
/// blockchain transaction".
pub const RPC_INVALID_ADDRESS_OR_KEY: i64 = -5;
/// `RPC_INVALID_PARAMETER`: a parameter out of range or malformed.
pub const RPC_INVALID_PARAMETER: i64 = -8;
/// `RPC_DESERIALIZATION_ERROR`: a transaction that does not decode.
pub const RPC_DESERIALIZATION_ERROR: i64 = -22;
/// `RPC_VERIFY_ERROR` (`RPC_TRANSACTION_ERROR`): missing or spent inputs.
pub const RPC_VERIFY_ERROR: i64 = -25;
/// `RPC_VERIFY_REJECTED` (`RPC_TRANSACTION_REJECTED`): the mempool refused it.
pub const RPC_VERIFY_REJECTED: i64 = -26;
/// `RPC_VERIFY_ALREADY_IN_CHAIN` (`RPC_VERIFY_ALREADY_IN_UTXO_SET`).
pub const RPC_VERIFY_ALREADY_IN_CHAIN: i64 = -27;
/// `RPC_IN_WARMUP`: the node is still starting.
pub const RPC_IN_WARMUP: i64 = -28;
/// `RPC_INVALID_REQUEST`: not a JSON-RPC request.
pub const RPC_INVALID_REQUEST: i64 = -32600;
/// `RPC_METHOD_NOT_FOUND`.
pub const RPC_METHOD_NOT_FOUND: i64 = -32601;
/// `RPC_PARSE_ERROR`: the body is not JSON.
pub const RPC_PARSE_ERROR: i64 = -32700;

/// Core's `TransactionErrorString(ALREADY_IN_UTXO_SET)` (Core 28 and later;
/// earlier versions said "Transaction already in block chain").
pub const ALREADY_IN_UTXO_SET: &str = "Transaction outputs already in utxo set";

/// Core's `FormatMoney`: BTC with at least two decimals, trailing zeros of
/// the eight trimmed (`0.00001`, `1.00`).
pub fn format_money(amount: Amount) -> String {
    let sat = amount.to_sat();
    let mut s = format!("{}.{:08}", sat / 100_000_000, sat % 100_000_000);
    while s.ends_with('0') && s.len() - s.find('.').unwrap_or(0) > 3 {
        s.pop();
    }
    s
}

/// Core's `CFeeRate::ToString()`: the rate in BTC/kvB with eight decimals.
fn format_fee_rate(fee: Amount, vsize: u64) -> String {
    let per_kvb = fee.to_sat().saturating_mul(1000) / vsize.max(1);
    format!(
        "{}.{:08} BTC/kvB",
        per_kvb / 100_000_000,
        per_kvb % 100_000_000
    )
}

/// The RPC error code and message Core's `sendrawtransaction` answers a
/// transaction with, for a reason SimChain gives (Core's
/// `TxValidationState::ToString()`: the reject reason, then `, ` and the
/// debug message where Core has one).
pub fn reject_to_rpc(tx: &Transaction, reason: &RejectReason) -> (i64, String) {
    let txid = tx.compute_txid();
    match reason {
        // Core cannot tell an output spent in a block from one it never
        // saw: both are "inputs missing or spent" (PreChecks).
        RejectReason::ConflictConfirmed { .. } | RejectReason::MissingInputs { .. } => (
            RPC_VERIFY_ERROR,
            "bad-txns-inputs-missingorspent".to_owned(),
        ),
        RejectReason::AlreadyConfirmed => {
            (RPC_VERIFY_ALREADY_IN_CHAIN, ALREADY_IN_UTXO_SET.to_owned())
        }
        RejectReason::InsufficientFee { rule } => {
            let detail = match rule {
                FeeRule::FeeRate {
                    fee,
                    vsize,
                    conflict_fee,
                    conflict_vsize,
                    ..
                } => format!(
                    "rejecting replacement {txid}; new feerate {} <= old feerate {}",
                    format_fee_rate(*fee, *vsize),
                    format_fee_rate(*conflict_fee, *conflict_vsize)
                ),
                FeeRule::AbsoluteFee {
                    fee, replaced_fees, ..
                } => format!(
                    "rejecting replacement {txid}, less fees than conflicting txs; {} < {}",
                    format_money(*fee),
                    format_money(*replaced_fees)
                ),
                FeeRule::RelayFee {
                    additional,
                    required,
                } => format!(
                    "rejecting replacement {txid}, not enough additional fees to relay; {} < {}",
                    format_money(*additional),
                    format_money(*required)
                ),
                FeeRule::Reported(message) => message.clone(),
            };
            (RPC_VERIFY_REJECTED, format!("insufficient fee, {detail}"))
        }
        RejectReason::TooManyReplacements { count, max } => (
            RPC_VERIFY_REJECTED,
            format!(
                "too many potential replacements, rejecting replacement {txid}; too many potential replacements ({count} > {max})"
            ),
        ),
        RejectReason::SpendsConflictingTx { outpoint } => (
            RPC_VERIFY_REJECTED,
            format!(
                "bad-txns-spends-conflicting-tx, {txid} spends conflicting transaction {}",
                outpoint.txid
            ),
        ),
        RejectReason::Invalid(invalid) => (RPC_VERIFY_REJECTED, invalid_to_string(invalid)),
        RejectReason::Other(message) => (RPC_VERIFY_REJECTED, message.clone()),
    }
}

/// Core's reject string for a consensus or standardness failure.
fn invalid_to_string(invalid: &InvalidTx) -> String {
    match invalid {
        InvalidTx::NoInputs => "bad-txns-vin-empty".to_owned(),
        InvalidTx::NoOutputs => "bad-txns-vout-empty".to_owned(),
        InvalidTx::Coinbase => "coinbase".to_owned(),
        InvalidTx::DuplicateInput(_) => "bad-txns-inputs-duplicate".to_owned(),
        InvalidTx::OutputsExceedInputs { inputs, outputs } => format!(
            "bad-txns-in-belowout, value in ({}) < value out ({})",
            format_money(*inputs),
            format_money(*outputs)
        ),
        InvalidTx::ValueOutOfRange => "bad-txns-vout-toolarge".to_owned(),
        InvalidTx::PrematureCoinbaseSpend { .. } => {
            "bad-txns-premature-spend-of-coinbase".to_owned()
        }
        InvalidTx::Script { reason, .. } => {
            format!("mandatory-script-verify-flag-failed ({reason})")
        }
    }
}

/// Core's short reject reason (`TxValidationState::GetRejectReason()`), as
/// `testmempoolaccept` reports it: the first part of [`reject_to_rpc`]'s
/// message, and `missing-inputs` for missing or spent inputs.
pub fn reject_reason_short(reason: &RejectReason) -> String {
    match reason {
        RejectReason::ConflictConfirmed { .. } | RejectReason::MissingInputs { .. } => {
            "missing-inputs".to_owned()
        }
        RejectReason::AlreadyConfirmed => "txn-already-known".to_owned(),
        RejectReason::InsufficientFee { .. } => "insufficient fee".to_owned(),
        RejectReason::TooManyReplacements { .. } => "too many potential replacements".to_owned(),
        RejectReason::SpendsConflictingTx { .. } => "bad-txns-spends-conflicting-tx".to_owned(),
        RejectReason::Invalid(invalid) => {
            let full = invalid_to_string(invalid);
            match full.split_once([',', ' ']) {
                Some((short, _)) => short.to_owned(),
                None => full,
            }
        }
        RejectReason::Other(message) => message.clone(),
    }
}

/// The [`RejectReason`] for Core's `sendrawtransaction` error `message`
/// about `tx`, as close to what SimChain says as Core's words allow:
///
/// - `bad-txns-inputs-missingorspent` is
///   [`RejectReason::MissingInputs`] with the transaction's first input,
///   because Core does not say which input, nor whether it is spent in a
///   block or unknown (SimChain says [`RejectReason::ConflictConfirmed`]
///   for the former).
/// - `insufficient fee` keeps Core's explanation in
///   [`FeeRule::Reported`]: Core prints fee rates, not the fees and sizes
///   [`FeeRule::FeeRate`] holds, nor how many transactions it would evict.
/// - Anything else Core may say (policy rules SimChain does not simulate)
///   is [`RejectReason::Other`] with Core's words.
pub fn rpc_to_reject(tx: &Transaction, code: i64, message: &str) -> RejectReason {
    let first_input = tx
        .input
        .first()
        .map_or(OutPoint::null(), |i| i.previous_output);
    if code == RPC_VERIFY_ALREADY_IN_CHAIN {
        return RejectReason::AlreadyConfirmed;
    }
    let (short, detail) = match message.split_once(", ") {
        Some((short, detail)) => (short, Some(detail)),
        None => (message, None),
    };
    let invalid = RejectReason::Invalid;
    match short {
        "bad-txns-inputs-missingorspent" | "missing-inputs" => RejectReason::MissingInputs {
            outpoint: first_input,
        },
        "txn-already-known" => RejectReason::AlreadyConfirmed,
        "insufficient fee" => RejectReason::InsufficientFee {
            rule: FeeRule::Reported(detail.unwrap_or_default().to_owned()),
        },
        "too many potential replacements" => RejectReason::TooManyReplacements {
            count: parse_replacement_count(detail).unwrap_or(crate::MAX_REPLACEMENTS + 1),
            max: crate::MAX_REPLACEMENTS,
        },
        "bad-txns-spends-conflicting-tx" => {
            let conflict = detail
                .and_then(|d| d.rsplit(' ').next())
                .and_then(|t| t.parse().ok());
            let outpoint = tx
                .input
                .iter()
                .map(|i| i.previous_output)
                .find(|o| Some(o.txid) == conflict)
                .unwrap_or(first_input);
            RejectReason::SpendsConflictingTx { outpoint }
        }
        "bad-txns-vin-empty" => invalid(InvalidTx::NoInputs),
        "bad-txns-vout-empty" => invalid(InvalidTx::NoOutputs),
        "coinbase" => invalid(InvalidTx::Coinbase),
        "bad-txns-inputs-duplicate" => {
            let mut seen = std::collections::HashSet::new();
            let dup = tx
                .input
                .iter()
                .map(|i| i.previous_output)
                .find(|o| !seen.insert(*o))
                .unwrap_or(first_input);
            invalid(InvalidTx::DuplicateInput(dup))
        }
        "bad-txns-in-belowout" => match parse_below_out(detail) {
            Some((inputs, outputs)) => invalid(InvalidTx::OutputsExceedInputs { inputs, outputs }),
            None => RejectReason::Other(message.to_owned()),
        },
        "bad-txns-vout-toolarge" | "bad-txns-txouttotal-toolarge" | "bad-txns-vout-negative" => {
            invalid(InvalidTx::ValueOutOfRange)
        }
        _ if message.starts_with("mandatory-script-verify-flag-failed")
            || message.starts_with("non-mandatory-script-verify-flag") =>
        {
            let reason = message
                .split_once('(')
                .and_then(|(_, r)| r.strip_suffix(')'))
                .unwrap_or(message)
                .to_owned();
            invalid(InvalidTx::Script { input: 0, reason })
        }
        _ => RejectReason::Other(message.to_owned()),
    }
}

/// `…too many potential replacements (N > 100)` → N.
fn parse_replacement_count(detail: Option<&str>) -> Option<usize> {
    let inner = detail?.rsplit_once('(')?.1;
    inner.split_once(" > ")?.0.trim().parse().ok()
}

/// `value in (X) < value out (Y)` → (X, Y).
fn parse_below_out(detail: Option<&str>) -> Option<(Amount, Amount)> {
    let detail = detail?;
    let mut amounts = detail.split('(').skip(1).filter_map(|part| {
        let value = part.split(')').next()?;
        Amount::from_str_in(value, bitcoin::Denomination::Bitcoin).ok()
    });
    Some((amounts.next()?, amounts.next()?))
}

/// Core's serialised `BlockFilter` (REST `blockfilter/basic/<hash>.bin`):
/// the filter type, the block hash, the encoded filter as a byte vector.
pub fn parse_rest_filter(bytes: &[u8], hash: BlockHash) -> Result<Vec<u8>, SourceError> {
    let what = Missing::Filter(hash);
    let (&kind, rest) = bytes
        .split_first()
        .ok_or_else(|| invalid(what, "empty answer"))?;
    if kind != 0 {
        return Err(invalid(what, format!("filter type {kind}, not basic (0)")));
    }
    if rest.len() < 32 || rest[..32] != *hash.as_byte_array() {
        return Err(invalid(what, "the filter is for another block"));
    }
    let (len, used): (VarInt, usize) =
        deserialize_partial(&rest[32..]).map_err(|e| invalid(what, e))?;
    let filter = &rest[32 + used..];
    if filter.len() as u64 != len.0 {
        return Err(invalid(
            what,
            format!("{} filter bytes, {} announced", filter.len(), len.0),
        ));
    }
    Ok(filter.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_money_trims_as_core() {
        assert_eq!(format_money(Amount::from_sat(1000)), "0.00001");
        assert_eq!(format_money(Amount::from_sat(100_000_000)), "1.00");
        assert_eq!(format_money(Amount::from_sat(123_456_789)), "1.23456789");
        assert_eq!(format_money(Amount::from_sat(110_000_000)), "1.10");
    }

    #[test]
    fn below_out_round_trips() {
        let tx = Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::ZERO,
            input: vec![],
            output: vec![],
        };
        let reason = RejectReason::Invalid(InvalidTx::OutputsExceedInputs {
            inputs: Amount::from_sat(1000),
            outputs: Amount::from_sat(150_000_000),
        });
        let (code, message) = reject_to_rpc(&tx, &reason);
        assert_eq!(code, RPC_VERIFY_REJECTED);
        assert_eq!(
            message,
            "bad-txns-in-belowout, value in (0.00001) < value out (1.50)"
        );
        assert_eq!(rpc_to_reject(&tx, code, &message), reason);
        let too_many = RejectReason::TooManyReplacements {
            count: 150,
            max: 100,
        };
        let (code, message) = reject_to_rpc(&tx, &too_many);
        assert_eq!(rpc_to_reject(&tx, code, &message), too_many);
    }
}
