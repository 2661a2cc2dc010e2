//! fleetcast's wire contract, version 1: every event, the subject and bucket names, the signed
//! release manifest, and the two encodings. It knows nothing of NATS or tokio, so every service
//! (and any outside tool) can depend on it without pulling in a transport.

pub mod codec;
pub mod ident;
pub mod keys;
pub mod manifest;
pub mod names;
pub mod patches;
pub mod schema;
pub mod selector;
pub mod tracker;
pub mod tree;
pub mod trust;
pub mod v1;

pub use codec::{CONTENT_TYPE, DecodeError, Encoding, wire_name};
pub use ident::{AgentId, AppName, InvalidName, RingName, TokenName};
pub use keys::{KeyError, PublicKey, SecretKey, Signature, TrustError, TrustedKeys};
pub use manifest::{FileEntry, Manifest, SignedManifest, VerifiedManifest};
pub use selector::{Selector, SelectorError};
pub use trust::{Role, Root, SignedMetadata, Timestamp, TrustedRoot};
