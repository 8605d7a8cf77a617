//! v1 -> v2, one pure function per message: cents become micros (x 10,000, refused when it would
//! overflow rather than wrapped), `holder` becomes `owner`, `from_account`/`to_account` become
//! `debit_account`/`credit_account`.

use crate::events::LedgerEvent;
use crate::proto::{v1, v2};
use reproject::upcast::{RegistryBuilder, StepError};

/// Micro-units per cent.
pub const MICROS_PER_CENT: i64 = 10_000;

pub fn register(builder: RegistryBuilder<LedgerEvent>) -> RegistryBuilder<LedgerEvent> {
    builder
        .step(
            "ledger.v1.AccountOpened",
            "ledger.v2.AccountOpened",
            opened_v1,
        )
        .latest("ledger.v2.AccountOpened", LedgerEvent::Opened)
        .step(
            "ledger.v1.TransferPosted",
            "ledger.v2.TransferPosted",
            posted_v1,
        )
        .latest("ledger.v2.TransferPosted", LedgerEvent::Posted)
        .step(
            "ledger.v1.AccountClosed",
            "ledger.v2.AccountClosed",
            closed_v1,
        )
        .latest("ledger.v2.AccountClosed", LedgerEvent::Closed)
}

/// Cents to micros, refused (not wrapped) when the result does not fit.
pub fn cents_to_micros(field: &str, cents: i64) -> Result<i64, StepError> {
    cents.checked_mul(MICROS_PER_CENT).ok_or_else(|| {
        StepError::new(format!(
            "{field} = {cents} cents does not fit in 64-bit micros"
        ))
    })
}

fn opened_v1(e: v1::AccountOpened) -> Result<v2::AccountOpened, StepError> {
    Ok(v2::AccountOpened {
        account_id: e.account_id,
        owner: e.holder,
        currency: e.currency,
        overdraft_limit_micros: cents_to_micros("overdraft_limit_cents", e.overdraft_limit_cents)?,
    })
}

fn posted_v1(e: v1::TransferPosted) -> Result<v2::TransferPosted, StepError> {
    Ok(v2::TransferPosted {
        transfer_id: e.transfer_id,
        debit_account: e.from_account,
        credit_account: e.to_account,
        amount_micros: cents_to_micros("amount_cents", e.amount_cents)?,
        currency: e.currency,
    })
}

fn closed_v1(e: v1::AccountClosed) -> Result<v2::AccountClosed, StepError> {
    Ok(v2::AccountClosed {
        account_id: e.account_id,
        reason: e.reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_v1_transfer_arrives_renamed_and_in_micros() {
        let registry = register(reproject::upcast::Registry::builder())
            .build()
            .expect("registry");
        let v1 = v1::TransferPosted {
            transfer_id: "t".into(),
            from_account: "a".into(),
            to_account: "b".into(),
            amount_cents: 1_250,
            currency: "EUR".into(),
        };
        let event = registry
            .upcast(
                "type.googleapis.com/ledger.v1.TransferPosted",
                &v1.encode_to_vec(),
            )
            .expect("upcast");
        assert_eq!(
            event,
            LedgerEvent::Posted(v2::TransferPosted {
                transfer_id: "t".into(),
                debit_account: "a".into(),
                credit_account: "b".into(),
                amount_micros: 12_500_000,
                currency: "EUR".into(),
            })
        );
    }

    #[test]
    fn cents_that_overflow_micros_are_refused_naming_the_field() {
        let error = cents_to_micros("amount_cents", i64::MAX / 100).expect_err("overflow");
        assert!(error.to_string().contains("amount_cents"), "{error}");
    }
}
