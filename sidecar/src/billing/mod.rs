//! Per-tenant billing through Stripe (docs/billing.md):
//! * [`provision`]: a customer and a subscription per tenant, kept on its plan,
//!   cancelled when it is offboarded or purged;
//! * [`meter`]: the usage ledger drained into Stripe Billing Meters, exactly
//!   once, the cursor in the database advanced only through what Stripe took;
//! * [`webhook`]: Stripe's events applied to tenants (plan changes,
//!   suspension on failed payment, resumption when paid);
//! * [`reconcile`]: the ledger against Stripe's meter event summaries.

pub mod meter;
pub mod provision;
pub mod reconcile;
pub mod stripe;
pub mod webhook;

use std::collections::BTreeMap;

use crate::config::PlanPrices;

/// The plan whose configured prices are exactly `prices`; else the plan whose
/// first (base) price is among them. None: no configured plan matches.
pub fn plan_for_prices(plans: &BTreeMap<String, PlanPrices>, prices: &[String]) -> Option<String> {
    let mut wanted: Vec<&String> = prices.iter().collect();
    wanted.sort();
    wanted.dedup();
    for (plan, p) in plans {
        let mut have: Vec<&String> = p.prices.iter().collect();
        have.sort();
        have.dedup();
        if have == wanted {
            return Some(plan.clone());
        }
    }
    plans.iter().find(|(_, p)| p.prices.first().is_some_and(|base| prices.contains(base))).map(|(plan, _)| plan.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_map_back_to_plans() {
        let mut plans = BTreeMap::new();
        plans.insert("free".to_string(), PlanPrices { prices: vec!["price_free".into()] });
        plans.insert("starter".to_string(), PlanPrices { prices: vec!["price_starter".into(), "price_calls".into()] });
        plans.insert("pro".to_string(), PlanPrices { prices: vec!["price_pro".into(), "price_calls".into()] });
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(plan_for_prices(&plans, &p(&["price_calls", "price_pro"])).as_deref(), Some("pro"));
        assert_eq!(plan_for_prices(&plans, &p(&["price_free"])).as_deref(), Some("free"));
        assert_eq!(plan_for_prices(&plans, &p(&["price_starter", "price_calls", "price_extra"])).as_deref(), Some("starter"));
        assert_eq!(plan_for_prices(&plans, &p(&["price_calls"])), None);
    }
}
