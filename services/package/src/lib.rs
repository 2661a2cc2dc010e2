//! What a package is and how it becomes chunks, as pure logic (no NATS, no async): file names,
//! hostile-archive validation, file manifests, content-defined chunking, chunk verification,
//! the package's own `fleetcast.toml`.

pub mod archive;
pub mod chunking;
pub mod installable;
pub mod links;
pub mod name;
pub mod package_config;
pub mod patch;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use archive::{ArchiveError, ArchiveLimits, Entry, EntryKind, Package};
pub use chunking::{ChunkError, ChunkId, VerifiedChunk};
pub use name::{NameError, PackageName, parse_package_file_name};
pub use package_config::{HealthGate, PackageConfig, PackageConfigError};
