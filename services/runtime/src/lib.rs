//! The small toolkit every fleetcast service shares: layered settings, tracing, shutdown, the
//! NATS connection, the streams/buckets/stores the services need, the consume loop, UTC time
//! windows (agents' update windows, the tracker's maintenance windows), Prometheus metrics and
//! the `/health` + `/metrics` endpoint operators watch.

pub mod agent_bus;
pub mod bus;
pub mod consume;
pub mod fs;
pub mod https;
pub mod memory;
pub mod metrics;
pub mod observe;
pub mod releases;
pub mod retry;
pub mod service;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod trust;
pub mod window;

pub use agent_bus::AgentBus;
pub use bus::{Bus, BusError};
pub use releases::{Desired, Incoming, Records};
pub use settings::{NatsSettings, SettingsError, TlsSettings, load_settings};
pub use shutdown::shutdown_on_signals;
pub use trust::{Trust, TrustBucket};
