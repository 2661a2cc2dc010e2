//! What the fuzz targets share: the fixed test signing key and clock, and the property checks
//! each target runs on one input. The targets in `fuzz_targets/` only hand libFuzzer's bytes
//! to these functions, so `make-corpus` can run every seed through the same code once.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::OnceLock;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use fleetcast_events::v1::{self, ChunkIndex};
use fleetcast_events::{
    Encoding, Manifest, SecretKey, SignedManifest, SignedMetadata, TrustedKeys, TrustedRoot,
};
use fleetcast_package::chunking::{self, ChunkId, MAX_CHUNK};
use fleetcast_package::{ArchiveLimits, Package};
use time::OffsetDateTime;

/// The fuzzing key: 32 bytes of 7 as the seed. Test data only; it signs the seed manifests.
pub const TEST_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

pub fn test_key() -> &'static SecretKey {
    static KEY: OnceLock<SecretKey> = OnceLock::new();
    KEY.get_or_init(|| SecretKey::from_text(TEST_KEY).expect("the test key parses"))
}

/// A fixed "now" (2026-01-01T00:00:00Z), so an input behaves the same on every run.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("a valid instant")
}

/// Archive validation: whatever the bytes, `Package::open` and everything a valid package
/// offers (file manifest, package config, entry readers) return errors, never panic, and stay
/// within the declared sizes.
pub fn archive(data: &[u8]) {
    // One unnamed temporary file per process (nothing left behind when libFuzzer exits),
    // reopened by path through /proc (Linux) since `Package::open` takes a path.
    static FILE: OnceLock<std::fs::File> = OnceLock::new();
    let mut file = FILE.get_or_init(|| tempfile::tempfile().expect("a temporary file"));
    file.set_len(0).expect("truncate");
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.write_all(data).expect("write");
    let path = std::path::PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(file)
    ));
    let Ok(mut package) = Package::open(&path, &ArchiveLimits::default()) else {
        return;
    };
    let entries = package.entries().to_vec();
    for entry in &entries {
        assert!(
            fleetcast_events::manifest::check_relative_path(&entry.path).is_ok(),
            "accepted an unsafe path {:?}",
            entry.path
        );
    }
    if let Ok(files) = package.file_manifest() {
        for f in &files {
            let entry = entries.iter().find(|e| e.path == f.path);
            assert!(entry.is_some(), "manifest lists {:?}, not an entry", f.path);
        }
    }
    let _ = package.config();
    for entry in &entries {
        if let Ok(mut reader) = package.entry_reader(entry.index) {
            let mut sink = Vec::new();
            if reader.read_to_end(&mut sink).is_ok() {
                assert!(
                    sink.len() as u64 <= entry.size,
                    "read past the declared size"
                );
            }
        }
    }
}

/// `text` as a signed manifest carrying one signature by the test key. Built as JSON, the
/// wire form, so it does not depend on how the Rust side spells the signature type.
pub fn signed_json(text: &str) -> serde_json::Value {
    let key = test_key();
    serde_json::json!({
        "manifest": text,
        "signatures": [{
            "key_id": key.public().id(),
            "signature": B64.encode(key.sign(text.as_bytes())),
        }],
    })
}

fn sign_text(text: &str) -> SignedManifest {
    serde_json::from_value(signed_json(text)).expect("a signed manifest decodes")
}

/// Checks what a verified manifest promises, whatever text it came from.
fn check_verified(signed: &SignedManifest, keys: &TrustedKeys) {
    let Ok(verified) = signed.verify(keys, now()) else {
        return;
    };
    assert!(now() <= verified.expires, "accepted an expired manifest");
    let mut seen = std::collections::HashSet::new();
    for f in &verified.files {
        assert!(
            fleetcast_events::manifest::check_relative_path(&f.path).is_ok(),
            "accepted an unsafe path {:?}",
            f.path
        );
        assert!(seen.insert(&f.path), "accepted {:?} twice", f.path);
    }
}

/// Manifest parsing and verification: a signed manifest decoded from JSON (and MessagePack, as
/// it travels inside desired states) verified against the test key; and the manifest text,
/// parsed directly and signed with the test key, so that the checks behind the signature
/// (parsing, expiry, app name, paths) see fuzzed text too, not only the signature check.
pub fn manifest(data: &[u8]) {
    let keys = TrustedKeys::new(vec![test_key().public()]);
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        if let Ok(signed) = encoding.decode::<SignedManifest>(data) {
            let _ = signed.verify(&keys, now());
            check_verified(&signed, &keys);
            check_verified(&sign_text(&signed.manifest), &keys);
        }
    }
    let _ = Encoding::Json.decode::<Manifest>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        check_verified(&sign_text(text), &keys);
        trust_metadata(text, &keys);
    }
}

/// Roots and timestamps (the other signed metadata): the text as received, and re-signed with
/// the test key so the parsing and checks behind the signature run too. A root taken as the
/// first one must name valid keys and thresholds; no root is the next of itself.
fn trust_metadata(text: &str, keys: &TrustedKeys) {
    if let Ok(signed) = serde_json::from_str::<SignedMetadata>(text) {
        let _ = TrustedRoot::bootstrap(&signed);
        let _ = signed.verify_timestamp(keys, now());
    }
    let signed = SignedMetadata {
        signed: text.to_string(),
        signatures: vec![fleetcast_events::Signature::new(test_key(), text)],
    };
    if let Ok(timestamp) = signed.verify_timestamp(keys, now()) {
        assert!(now() <= timestamp.expires, "accepted an expired timestamp");
    }
    if let Ok(root) = TrustedRoot::bootstrap(&signed) {
        let signing = root
            .root()
            .signing
            .trusted()
            .expect("a taken root's signing role is valid");
        assert!(signing.threshold() >= 1);
        assert!(
            root.next(&signed).is_err(),
            "a root accepted as its own successor"
        );
    }
}

/// Decodes `data` as `T`; a value that decodes must encode again and decode to itself.
fn round_trip<T>(encoding: Encoding, data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(value) = encoding.decode::<T>(data) else {
        return;
    };
    let bytes = encoding
        .encode(&value)
        .unwrap_or_else(|e| panic!("{value:?} decoded but does not encode: {e}"));
    let again: T = encoding
        .decode(&bytes)
        .unwrap_or_else(|e| panic!("{value:?} does not decode after encoding: {e}"));
    assert_eq!(again, value, "changed by a round trip through {encoding:?}");
}

/// Event decoding: every type of `fleetcast_events::v1`, in both encodings.
pub fn event(data: &[u8]) {
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        round_trip::<v1::ReleasePublished>(encoding, data);
        round_trip::<v1::PackageSource>(encoding, data);
        round_trip::<v1::PackageDetected>(encoding, data);
        round_trip::<v1::Rejection>(encoding, data);
        round_trip::<v1::RejectCode>(encoding, data);
        round_trip::<v1::PackageRejected>(encoding, data);
        round_trip::<v1::EventRejected>(encoding, data);
        round_trip::<v1::ReleaseSigned>(encoding, data);
        round_trip::<v1::RollbackRequested>(encoding, data);
        round_trip::<v1::RollbackSigned>(encoding, data);
        round_trip::<v1::ReleaseRejected>(encoding, data);
        round_trip::<v1::ReleaseStored>(encoding, data);
        round_trip::<v1::ReleaseState>(encoding, data);
        round_trip::<v1::ReleaseRecord>(encoding, data);
        round_trip::<v1::ChunkIndex>(encoding, data);
        round_trip::<v1::FileChunks>(encoding, data);
        round_trip::<v1::ChunkRef>(encoding, data);
        round_trip::<v1::DesiredState>(encoding, data);
        round_trip::<v1::SlotRequest>(encoding, data);
        round_trip::<v1::SlotReply>(encoding, data);
        round_trip::<v1::AppState>(encoding, data);
        round_trip::<v1::AgentStatus>(encoding, data);
        round_trip::<v1::AgentHeartbeat>(encoding, data);
        round_trip::<v1::AppHeartbeat>(encoding, data);
    }
}

/// Chunk index decoding and chunk verification: the index as agents read it (MessagePack; JSON
/// too), every chunk id in it parsed; the bytes as a stored chunk checked by
/// `chunking::verify` (never more than the maximum chunk size decompressed); and the bytes as
/// file content: chunked, stored and verified again, which must give them back.
pub fn chunk_index(data: &[u8]) {
    for encoding in [Encoding::MsgPack, Encoding::Json] {
        if let Ok(index) = encoding.decode::<ChunkIndex>(data) {
            for chunk in index.files.iter().flat_map(|f| &f.chunks) {
                if let Ok(id) = ChunkId::from_hex(&chunk.id) {
                    assert_eq!(id.to_hex(), chunk.id.to_ascii_lowercase());
                }
            }
        }
    }
    // As a stored chunk: its length the first four bytes say, its name that of the bytes.
    let len = data
        .get(..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if let Ok(chunk) = chunking::verify(&ChunkId::of(data), len, data) {
        assert!(chunk.data().len() <= MAX_CHUNK);
    }
    if let Some((1, frame)) = data.split_first()
        && let Ok(raw) = zstd::bulk::decompress(frame, MAX_CHUNK)
    {
        // A stored zstd chunk whose content is known: it must verify under its own name.
        let ok = chunking::verify(&ChunkId::of(&raw), raw.len() as u32, data);
        assert!(ok.is_ok(), "a valid zstd chunk was refused: {ok:?}");
    }
    for piece in chunking::chunks(data) {
        let (id, content) = piece.expect("chunking a slice cannot fail");
        assert!(content.len() <= MAX_CHUNK);
        let stored = chunking::encode_stored(&content).expect("encode");
        let back = chunking::verify(&id, content.len() as u32, &stored)
            .unwrap_or_else(|e| panic!("a chunk we stored does not verify: {e}"));
        assert_eq!(back.data(), &content[..]);
    }
}
