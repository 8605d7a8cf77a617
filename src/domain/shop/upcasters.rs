//! The steps between shop versions. Each is a pure function of one message.
//!
//! v1 -> v2: decimal strings become integer cents; the currency, which v1 did not record, was always
//! EUR; `user_id` is renamed `customer_id`.
//! v2 -> v3: local times with a zone name become UTC timestamps (an ambiguous local time, in the hour a
//! clock falls back, is read as the earlier instant, as the v2 writers did); the one-line address
//! "Street 1, 12345 City, DE" becomes a nested `Address`.

use super::events::ShopEvent;
use super::proto::{v1, v2, v3};
use reproject::envelope::micros_timestamp;
use reproject::upcast::{convert, RegistryBuilder, StepError};

/// The currency every v1 amount was in.
pub const V1_CURRENCY: &str = "EUR";

pub fn register(builder: RegistryBuilder<ShopEvent>) -> RegistryBuilder<ShopEvent> {
    builder
        .step("shop.v1.OrderPlaced", "shop.v2.OrderPlaced", placed_v1)
        .step("shop.v2.OrderPlaced", "shop.v3.OrderPlaced", placed_v2)
        .latest("shop.v3.OrderPlaced", ShopEvent::Placed)
        .step("shop.v1.ItemAdded", "shop.v2.ItemAdded", item_added_v1)
        .step("shop.v2.ItemAdded", "shop.v3.ItemAdded", item_added_v2)
        .latest("shop.v3.ItemAdded", ShopEvent::ItemAdded)
        .step(
            "shop.v1.ItemRemoved",
            "shop.v2.ItemRemoved",
            item_removed_v1,
        )
        .step(
            "shop.v2.ItemRemoved",
            "shop.v3.ItemRemoved",
            item_removed_v2,
        )
        .latest("shop.v3.ItemRemoved", ShopEvent::ItemRemoved)
        .step("shop.v1.OrderPaid", "shop.v2.OrderPaid", paid_v1)
        .step("shop.v2.OrderPaid", "shop.v3.OrderPaid", paid_v2)
        .latest("shop.v3.OrderPaid", ShopEvent::Paid)
        .step("shop.v1.OrderShipped", "shop.v2.OrderShipped", shipped_v1)
        .step("shop.v2.OrderShipped", "shop.v3.OrderShipped", shipped_v2)
        .latest("shop.v3.OrderShipped", ShopEvent::Shipped)
        .step(
            "shop.v1.OrderCancelled",
            "shop.v2.OrderCancelled",
            cancelled_v1,
        )
        .step(
            "shop.v2.OrderCancelled",
            "shop.v3.OrderCancelled",
            cancelled_v2,
        )
        .latest("shop.v3.OrderCancelled", ShopEvent::Cancelled)
        .step(
            "shop.v1.OrderRefunded",
            "shop.v2.OrderRefunded",
            refunded_v1,
        )
        .step(
            "shop.v2.OrderRefunded",
            "shop.v3.OrderRefunded",
            refunded_v2,
        )
        .latest("shop.v3.OrderRefunded", ShopEvent::Refunded)
}

fn required(field: &str, value: String) -> Result<String, StepError> {
    if value.is_empty() {
        Err(StepError::new(format!("required field {field} is missing")))
    } else {
        Ok(value)
    }
}

/// "12.50" -> 1250. Exactly the format v1 writers used: digits, optionally a dot and one or two
/// digits, optionally a leading minus. Anything else ("12,50", "1e3", "") is refused, not guessed.
pub fn parse_decimal_cents(field: &str, text: &str) -> Result<i64, StepError> {
    convert::decimal_cents(text)
        .map_err(|reason| StepError::new(format!("{field} {text:?} {reason}")))
}

/// "2022-07-01 12:00:00 Europe/Berlin" -> UTC. A local time the clock repeated (falling back) is
/// the earlier instant, as the v2 writers did; one it skipped is refused.
pub fn parse_local_time(field: &str, text: &str) -> Result<prost_types::Timestamp, StepError> {
    let failed = |reason: String| StepError::new(format!("{field} {text:?}: {reason}"));
    let (local, zone) = convert::split_zoned(text).map_err(failed)?;
    let micros = convert::local_time_micros(local, zone).map_err(failed)?;
    Ok(micros_timestamp(micros))
}

/// "Hauptstr. 5, 10115 Berlin, DE" -> Address. Empty means no address was given.
pub fn parse_address(text: &str) -> Result<Option<v3::Address>, StepError> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || {
        StepError::new(format!(
            "ship_to {text:?} is not \"Street, Postcode City, CC\""
        ))
    };
    let mut parts = text.rsplitn(3, ", ");
    let country = parts.next().ok_or_else(bad)?;
    let town = parts.next().ok_or_else(bad)?;
    let street = parts.next().ok_or_else(bad)?;
    let (postal_code, city) = town.split_once(' ').ok_or_else(bad)?;
    if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad());
    }
    Ok(Some(v3::Address {
        street: street.to_string(),
        postal_code: postal_code.to_string(),
        city: city.to_string(),
        country: country.to_string(),
    }))
}

fn placed_v1(e: v1::OrderPlaced) -> Result<v2::OrderPlaced, StepError> {
    Ok(v2::OrderPlaced {
        order_id: required("order_id", e.order_id)?,
        customer_id: required("user_id", e.user_id)?,
        placed_at: required("placed_at", e.placed_at)?,
        ship_to: e.ship_to,
        currency: V1_CURRENCY.to_string(),
    })
}

fn placed_v2(e: v2::OrderPlaced) -> Result<v3::OrderPlaced, StepError> {
    Ok(v3::OrderPlaced {
        placed_at: Some(parse_local_time("placed_at", &e.placed_at)?),
        ship_to: parse_address(&e.ship_to)?,
        order_id: required("order_id", e.order_id)?,
        customer_id: required("customer_id", e.customer_id)?,
        currency: required("currency", e.currency)?,
    })
}

fn item_added_v1(e: v1::ItemAdded) -> Result<v2::ItemAdded, StepError> {
    Ok(v2::ItemAdded {
        unit_price_cents: parse_decimal_cents("unit_price", &e.unit_price)?,
        order_id: required("order_id", e.order_id)?,
        sku: required("sku", e.sku)?,
        quantity: e.quantity,
        currency: V1_CURRENCY.to_string(),
    })
}

fn item_added_v2(e: v2::ItemAdded) -> Result<v3::ItemAdded, StepError> {
    Ok(v3::ItemAdded {
        order_id: e.order_id,
        sku: e.sku,
        quantity: e.quantity,
        unit_price_cents: e.unit_price_cents,
        currency: required("currency", e.currency)?,
    })
}

fn item_removed_v1(e: v1::ItemRemoved) -> Result<v2::ItemRemoved, StepError> {
    Ok(v2::ItemRemoved {
        unit_price_cents: parse_decimal_cents("unit_price", &e.unit_price)?,
        order_id: required("order_id", e.order_id)?,
        sku: required("sku", e.sku)?,
        quantity: e.quantity,
        currency: V1_CURRENCY.to_string(),
    })
}

fn item_removed_v2(e: v2::ItemRemoved) -> Result<v3::ItemRemoved, StepError> {
    Ok(v3::ItemRemoved {
        order_id: e.order_id,
        sku: e.sku,
        quantity: e.quantity,
        unit_price_cents: e.unit_price_cents,
        currency: required("currency", e.currency)?,
    })
}

fn paid_v1(e: v1::OrderPaid) -> Result<v2::OrderPaid, StepError> {
    Ok(v2::OrderPaid {
        amount_cents: parse_decimal_cents("amount", &e.amount)?,
        order_id: required("order_id", e.order_id)?,
        customer_id: required("user_id", e.user_id)?,
        currency: V1_CURRENCY.to_string(),
        paid_at: required("paid_at", e.paid_at)?,
    })
}

fn paid_v2(e: v2::OrderPaid) -> Result<v3::OrderPaid, StepError> {
    Ok(v3::OrderPaid {
        paid_at: Some(parse_local_time("paid_at", &e.paid_at)?),
        order_id: e.order_id,
        amount_cents: e.amount_cents,
        currency: required("currency", e.currency)?,
        customer_id: required("customer_id", e.customer_id)?,
    })
}

fn shipped_v1(e: v1::OrderShipped) -> Result<v2::OrderShipped, StepError> {
    Ok(v2::OrderShipped {
        order_id: required("order_id", e.order_id)?,
        carrier: e.carrier,
        shipped_at: required("shipped_at", e.shipped_at)?,
    })
}

fn shipped_v2(e: v2::OrderShipped) -> Result<v3::OrderShipped, StepError> {
    Ok(v3::OrderShipped {
        shipped_at: Some(parse_local_time("shipped_at", &e.shipped_at)?),
        order_id: e.order_id,
        carrier: e.carrier,
    })
}

fn cancelled_v1(e: v1::OrderCancelled) -> Result<v2::OrderCancelled, StepError> {
    Ok(v2::OrderCancelled {
        order_id: required("order_id", e.order_id)?,
        reason: e.reason,
        cancelled_at: required("cancelled_at", e.cancelled_at)?,
    })
}

fn cancelled_v2(e: v2::OrderCancelled) -> Result<v3::OrderCancelled, StepError> {
    Ok(v3::OrderCancelled {
        cancelled_at: Some(parse_local_time("cancelled_at", &e.cancelled_at)?),
        order_id: e.order_id,
        reason: e.reason,
    })
}

fn refunded_v1(e: v1::OrderRefunded) -> Result<v2::OrderRefunded, StepError> {
    Ok(v2::OrderRefunded {
        amount_cents: parse_decimal_cents("amount", &e.amount)?,
        order_id: required("order_id", e.order_id)?,
        customer_id: required("user_id", e.user_id)?,
        currency: V1_CURRENCY.to_string(),
        refunded_at: required("refunded_at", e.refunded_at)?,
    })
}

fn refunded_v2(e: v2::OrderRefunded) -> Result<v3::OrderRefunded, StepError> {
    Ok(v3::OrderRefunded {
        refunded_at: Some(parse_local_time("refunded_at", &e.refunded_at)?),
        order_id: e.order_id,
        amount_cents: e.amount_cents,
        currency: required("currency", e.currency)?,
        customer_id: required("customer_id", e.customer_id)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_become_cents_and_malformed_ones_are_refused() {
        assert_eq!(parse_decimal_cents("a", "12.50").ok(), Some(1250));
        assert_eq!(parse_decimal_cents("a", "12.5").ok(), Some(1250));
        assert_eq!(parse_decimal_cents("a", "7").ok(), Some(700));
        assert_eq!(parse_decimal_cents("a", "-0.05").ok(), Some(-5));
        for bad in [
            "12,50",
            "",
            "1e3",
            "12.",
            ".5",
            "12.505",
            "--1",
            "12.5x",
            "99999999999999999999",
        ] {
            let err = parse_decimal_cents("unit_price", bad).expect_err(bad);
            assert!(err.to_string().contains("unit_price"), "{err}");
        }
    }

    #[test]
    fn local_times_become_utc_including_across_daylight_saving() {
        let t = parse_local_time("placed_at", "2022-07-01 12:00:00 Europe/Berlin").expect("valid");
        assert_eq!(t.seconds, 1_656_669_600); // 10:00 UTC (CEST is UTC+2)
        let t =
            parse_local_time("placed_at", "2022-01-01 12:00:00 America/New_York").expect("valid");
        assert_eq!(t.seconds, 1_641_056_400); // 17:00 UTC
                                              // 02:30 on 2022-10-30 happened twice in Berlin: the earlier instant (CEST) is taken.
        let t = parse_local_time("x", "2022-10-30 02:30:00 Europe/Berlin").expect("valid");
        assert_eq!(t.seconds, 1_667_089_800);
        assert!(
            parse_local_time("x", "2022-03-27 02:30:00 Europe/Berlin").is_err(),
            "skipped hour"
        );
        let err =
            parse_local_time("paid_at", "2022-01-01 12:00:00 Mars/Olympus").expect_err("zone");
        assert!(err.to_string().contains("unknown time zone"), "{err}");
        assert!(parse_local_time("paid_at", "01/02/2022 12:00 UTC").is_err());
    }

    #[test]
    fn one_line_addresses_become_nested() {
        let a = parse_address("Hauptstr. 5, 10115 Berlin, DE")
            .expect("valid")
            .expect("some");
        assert_eq!(
            (
                a.street.as_str(),
                a.postal_code.as_str(),
                a.city.as_str(),
                a.country.as_str()
            ),
            ("Hauptstr. 5", "10115", "Berlin", "DE")
        );
        let a = parse_address("1 Main St, Apt 4, 10001 New York, US")
            .expect("valid")
            .expect("some");
        assert_eq!(
            (a.street.as_str(), a.city.as_str()),
            ("1 Main St, Apt 4", "New York")
        );
        assert!(parse_address("").expect("empty is fine").is_none());
        assert!(parse_address("somewhere").is_err());
    }

    #[test]
    fn a_v1_event_is_upcast_to_v3_through_both_steps() {
        use prost::Message;
        let registry = super::super::registry().expect("the shop registry is consistent");
        let v1 = v1::OrderPaid {
            order_id: "o-1".into(),
            amount: "25.00".into(),
            paid_at: "2022-07-01 12:00:00 Europe/Berlin".into(),
            user_id: "c-9".into(),
        };
        let (trace, event) =
            registry.upcast_traced("type.googleapis.com/shop.v1.OrderPaid", &v1.encode_to_vec());
        let names: Vec<_> = trace.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "shop.v1.OrderPaid",
                "shop.v2.OrderPaid",
                "shop.v3.OrderPaid"
            ]
        );
        match event.expect("upcasts") {
            ShopEvent::Paid(p) => {
                assert_eq!(
                    (p.amount_cents, p.currency.as_str(), p.customer_id.as_str()),
                    (2500, "EUR", "c-9")
                );
                assert_eq!(p.paid_at.map(|t| t.seconds), Some(1_656_669_600));
            }
            other => panic!("expected Paid, got {other:?}"),
        }
    }
}

/// The registry's own rules, checked with the shop's messages as samples.
#[cfg(test)]
mod registry_tests {
    use super::super::proto::{v1, v2, v3};
    use reproject::upcast::*;

    #[derive(Debug, PartialEq)]
    struct Out(String);

    fn placed_v1_to_v2(e: v1::OrderPlaced) -> Result<v2::OrderPlaced, StepError> {
        Ok(v2::OrderPlaced {
            order_id: e.order_id,
            ..Default::default()
        })
    }
    fn placed_v2_to_v3(e: v2::OrderPlaced) -> Result<v3::OrderPlaced, StepError> {
        Ok(v3::OrderPlaced {
            order_id: e.order_id,
            ..Default::default()
        })
    }
    fn placed_v2_to_v1(e: v2::OrderPlaced) -> Result<v1::OrderPlaced, StepError> {
        Ok(v1::OrderPlaced {
            order_id: e.order_id,
            ..Default::default()
        })
    }
    fn wrong_output(_: v1::OrderPlaced) -> Result<v1::ItemAdded, StepError> {
        Err(StepError::new("never called"))
    }
    fn finish(e: v3::OrderPlaced) -> Out {
        Out(e.order_id)
    }

    fn err<E: 'static>(builder: RegistryBuilder<E>) -> String {
        match builder.build() {
            Ok(_) => panic!("the registry should have been refused"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_complete_chain_builds_and_upcasts() {
        let registry = Registry::<Out>::builder()
            .step(
                "shop.v1.OrderPlaced",
                "shop.v2.OrderPlaced",
                placed_v1_to_v2,
            )
            .step(
                "shop.v2.OrderPlaced",
                "shop.v3.OrderPlaced",
                placed_v2_to_v3,
            )
            .latest("shop.v3.OrderPlaced", finish)
            .build()
            .expect("valid");
        let bytes = prost::Message::encode_to_vec(&v1::OrderPlaced {
            order_id: "o".into(),
            ..Default::default()
        });
        assert_eq!(
            registry
                .upcast("type.googleapis.com/shop.v1.OrderPlaced", &bytes)
                .expect("upcasts"),
            Out("o".into())
        );
        assert!(matches!(
            registry.upcast("type.googleapis.com/shop.v9.OrderPlaced", &bytes),
            Err(UpcastError::UnknownType { .. })
        ));
        assert!(matches!(
            registry.upcast("shop.v1.OrderPlaced", &[0xff, 0xff]),
            Err(UpcastError::Undecodable { .. })
        ));
    }

    #[test]
    fn a_step_to_an_unregistered_version_is_refused_naming_it() {
        let message = err(Registry::<Out>::builder().step(
            "shop.v1.OrderPlaced",
            "shop.v2.OrderPlaced",
            placed_v1_to_v2,
        ));
        assert!(
            message.contains("shop.v2.OrderPlaced is not registered"),
            "{message}"
        );
    }

    #[test]
    fn two_steps_for_one_version_are_refused() {
        let message = err(Registry::<Out>::builder()
            .step(
                "shop.v1.OrderPlaced",
                "shop.v2.OrderPlaced",
                placed_v1_to_v2,
            )
            .step(
                "shop.v1.OrderPlaced",
                "shop.v2.OrderPlaced",
                placed_v1_to_v2,
            )
            .step(
                "shop.v2.OrderPlaced",
                "shop.v3.OrderPlaced",
                placed_v2_to_v3,
            )
            .latest("shop.v3.OrderPlaced", finish));
        assert!(
            message.contains("shop.v1.OrderPlaced is registered twice"),
            "{message}"
        );
    }

    #[test]
    fn a_cycle_is_refused_with_its_path() {
        let message = err(Registry::<Out>::builder()
            .step(
                "shop.v1.OrderPlaced",
                "shop.v2.OrderPlaced",
                placed_v1_to_v2,
            )
            .step(
                "shop.v2.OrderPlaced",
                "shop.v1.OrderPlaced",
                placed_v2_to_v1,
            ));
        assert!(message.contains("cycle"), "{message}");
        assert!(
            message.contains("shop.v1.OrderPlaced -> shop.v2.OrderPlaced"),
            "{message}"
        );
    }

    #[test]
    fn a_step_whose_output_type_is_not_the_next_versions_is_refused() {
        let message = err(Registry::<Out>::builder()
            .step("shop.v1.OrderPlaced", "shop.v3.OrderPlaced", wrong_output)
            .latest("shop.v3.OrderPlaced", finish));
        assert!(
            message.contains("output type differs") && message.contains("shop.v3.OrderPlaced"),
            "{message}"
        );
    }

    #[test]
    fn a_failing_step_names_both_versions_and_the_reason() {
        let registry = super::super::registry().expect("shop registry");
        let bad = v1::ItemAdded {
            order_id: "o".into(),
            sku: "s".into(),
            quantity: 1,
            unit_price: "12,50".into(),
        };
        let error = registry
            .upcast(
                "type.googleapis.com/shop.v1.ItemAdded",
                &prost::Message::encode_to_vec(&bad),
            )
            .expect_err("12,50 is not a v1 decimal");
        let message = error.to_string();
        assert!(
            message.contains("shop.v1.ItemAdded -> shop.v2.ItemAdded")
                && message.contains("\"12,50\""),
            "{message}"
        );
    }

    #[test]
    fn every_shop_message_reaches_its_latest_version() {
        let registry = super::super::registry().expect("shop registry");
        let chains = registry.chains();
        assert_eq!(chains.len(), 21, "7 events in 3 versions");
        for (start, chain) in chains {
            assert!(
                chain.last().is_some_and(|l| l.starts_with("shop.v3.")),
                "{start}: {chain:?}"
            );
        }
    }
}
