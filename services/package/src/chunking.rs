//! Content-defined chunking of a file's *uncompressed* content (FastCDC 2020), chunk names
//! (BLAKE3 of the content), compression (zstd) and verification of a fetched chunk.
//!
//! Chunking the uncompressed bytes is what makes a small change in a file change only the few
//! chunks around it, whatever the archive's own compression did.

use std::io::{self, Read};

use fleetcast_events::v1::ChunkRef;

pub const MIN_CHUNK: usize = 16 * 1024;
pub const AVG_CHUNK: usize = 64 * 1024;
pub const MAX_CHUNK: usize = 256 * 1024;
/// zstd level for chunks worth compressing: zstd's default, a good speed/ratio point.
pub const ZSTD_LEVEL: i32 = 3;

/// A chunk's name: the BLAKE3 of its uncompressed content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    pub fn from_hex(hex: &str) -> Result<Self, ChunkError> {
        blake3::Hash::from_hex(hex)
            .map(|h| ChunkId(*h.as_bytes()))
            .map_err(|_| ChunkError::BadId(hex.chars().take(80).collect()))
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..12])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("{0:?} is not a chunk id (64 hex digits)")]
    BadId(String),
    #[error("chunk {id} does not decompress: {reason}")]
    Decompress { id: String, reason: String },
    #[error("chunk {id} has {got} bytes, the index says {want}")]
    Length { id: String, got: usize, want: u32 },
    #[error("chunk {id} content does not match its name")]
    Hash { id: String },
}

/// A chunk whose content matched its name. Only [`verify`] makes one.
#[derive(Debug)]
pub struct VerifiedChunk {
    id: ChunkId,
    data: Vec<u8>,
}

impl VerifiedChunk {
    pub fn id(&self) -> ChunkId {
        self.id
    }
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
}

/// Splits a stream into content-defined chunks. Memory stays at about two maximum chunks.
pub fn chunks<R: Read>(reader: R) -> impl Iterator<Item = io::Result<(ChunkId, Vec<u8>)>> {
    fastcdc::v2020::StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK).map(|r| {
        r.map(|c| (ChunkId::of(&c.data), c.data))
            .map_err(|e| match e {
                fastcdc::v2020::Error::IoError(io) => io,
                other => io::Error::other(other.to_string()),
            })
    })
}

pub fn chunk_ref(id: &ChunkId, len: usize) -> ChunkRef {
    ChunkRef {
        id: id.to_hex(),
        len: len as u32,
    }
}

/// First byte of a stored chunk: how the rest is encoded.
const STORED_RAW: u8 = 0;
const STORED_ZSTD: u8 = 1;
/// Bytes sampled to decide whether a chunk is worth compressing.
const SAMPLE: usize = 8 * 1024;

/// A chunk as stored: one encoding byte, then the content raw or as a zstd frame. A chunk whose
/// first 8 KiB do not shrink at zstd level 1 (already compressed, encrypted or random data) is
/// stored raw: compressing it would cost CPU and save nothing.
pub fn encode_stored(data: &[u8]) -> io::Result<Vec<u8>> {
    let sample = &data[..data.len().min(SAMPLE)];
    let worth_it =
        sample.len() < 512 || zstd::bulk::compress(sample, 1)?.len() < sample.len() * 15 / 16;
    if worth_it {
        let mut out = Vec::with_capacity(data.len() / 2 + 64);
        out.push(STORED_ZSTD);
        out.extend_from_slice(&zstd::bulk::compress(data, ZSTD_LEVEL)?);
        if out.len() <= data.len() {
            return Ok(out);
        }
    }
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(STORED_RAW);
    out.extend_from_slice(data);
    Ok(out)
}

/// Decodes a stored chunk (never past the maximum chunk size, so a hostile store cannot make
/// it expand without bound) and checks its length and name.
pub fn verify(id: &ChunkId, expected_len: u32, stored: &[u8]) -> Result<VerifiedChunk, ChunkError> {
    let bad = |reason: String| ChunkError::Decompress {
        id: id.to_hex(),
        reason,
    };
    let data = match stored.split_first() {
        Some((&STORED_ZSTD, frame)) => {
            zstd::bulk::decompress(frame, MAX_CHUNK).map_err(|e| bad(e.to_string()))?
        }
        Some((&STORED_RAW, raw)) if raw.len() <= MAX_CHUNK => raw.to_vec(),
        Some((&STORED_RAW, raw)) => {
            return Err(bad(format!(
                "{} bytes, over the maximum chunk size",
                raw.len()
            )));
        }
        Some((other, _)) => return Err(bad(format!("unknown encoding {other}"))),
        None => return Err(bad("empty".into())),
    };
    if data.len() != expected_len as usize {
        return Err(ChunkError::Length {
            id: id.to_hex(),
            got: data.len(),
            want: expected_len,
        });
    }
    if ChunkId::of(&data) != *id {
        return Err(ChunkError::Hash { id: id.to_hex() });
    }
    Ok(VerifiedChunk { id: *id, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::pseudo_random;

    #[test]
    fn chunks_cover_the_input_and_stay_in_bounds() {
        let data = pseudo_random(2 << 20, 7);
        let all: Vec<_> = chunks(&data[..]).collect::<io::Result<_>>().expect("chunk");
        let joined: Vec<u8> = all.iter().flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(joined, data);
        assert!(all.iter().all(|(_, d)| d.len() <= MAX_CHUNK));
        assert!(all.len() > 10, "expected ~32 chunks, got {}", all.len());
    }

    #[test]
    fn an_insertion_changes_only_nearby_chunks() {
        let a = pseudo_random(4 << 20, 9);
        let mut b = a.clone();
        b.splice(2 << 20..2 << 20, pseudo_random(1000, 3));
        let ids = |d: &[u8]| -> std::collections::HashSet<ChunkId> {
            chunks(d).map(|r| r.expect("chunk").0).collect()
        };
        let (ia, ib) = (ids(&a), ids(&b));
        let new = ib.difference(&ia).count();
        assert!(new <= 3, "{new} new chunks for one insertion");
    }

    #[test]
    fn verify_accepts_good_and_refuses_bad_chunks() {
        let data = pseudo_random(100_000, 1);
        let id = ChunkId::of(&data);
        let stored = encode_stored(&data).expect("encode");
        assert_eq!(stored[0], STORED_RAW, "random data was compressed");
        assert_eq!(verify(&id, 100_000, &stored).expect("ok").data(), &data[..]);
        let other = encode_stored(&pseudo_random(100_000, 2)).expect("encode");
        assert!(matches!(
            verify(&id, 100_000, &other),
            Err(ChunkError::Hash { .. })
        ));
        assert!(matches!(
            verify(&id, 99, &stored),
            Err(ChunkError::Length { .. })
        ));
        assert!(matches!(
            verify(&id, 100_000, b"garbage"),
            Err(ChunkError::Decompress { .. })
        ));
        let text = b"fleetcast ".repeat(10_000);
        let packed = encode_stored(&text).expect("encode");
        assert!(packed[0] == STORED_ZSTD && packed.len() < 1000);
        assert_eq!(
            verify(&ChunkId::of(&text), text.len() as u32, &packed)
                .expect("ok")
                .data(),
            &text[..]
        );
        let mut bomb = vec![STORED_ZSTD];
        bomb.extend(zstd::bulk::compress(&vec![0u8; 4 * MAX_CHUNK], 3).expect("compress"));
        assert!(matches!(
            verify(&id, 100_000, &bomb),
            Err(ChunkError::Decompress { .. })
        ));
        assert!(ChunkId::from_hex(&id.to_hex()).is_ok_and(|x| x == id));
        assert!(ChunkId::from_hex("zz").is_err());
    }
}
