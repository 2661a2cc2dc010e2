//! What a package is and how it becomes chunks, as pure logic (no NATS, no async): file names,
//! hostile-archive validation, file manifests, content-defined chunking, chunk verification.

pub mod archive;
pub mod chunking;
pub mod name;

pub use archive::{ArchiveError, ArchiveLimits, Entry, EntryKind, Package};
pub use chunking::{ChunkError, ChunkId, VerifiedChunk};
pub use name::{PackageName, parse_package_file_name};
