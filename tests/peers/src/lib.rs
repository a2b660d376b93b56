//! The sidecar's HTTP peers, for its tests, benchmarks and the demo: a fake
//! Stripe and three SIEM receivers, real HTTP servers on loopback speaking
//! the documented protocols, with fault injection.

pub mod server;
pub mod siem;
pub mod stripe;
