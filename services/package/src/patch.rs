//! Binary patches between two versions of a file: zstd with the old file as its reference
//! window and long-distance matching, which is what `zstd --patch-from --long` does. zstd is
//! already how chunks are stored, applies a patch at decompression speed, and its CLI is the
//! reference `ops/bench agent` measures patches against (`rebuilt_patch_from_bytes`).
//!
//! A patch is a run of frames, each making one segment of the new file ([`SEGMENT`]) from one
//! region of the base: the base around the segment's own place, [`MARGIN`] either side (a
//! rebuilt file keeps its layout, shifted a little). A zstd skippable frame before each frame
//! names its region (`REGION_MAGIC`, then the region's offset and length, u64 little-endian);
//! a frame without one refers to the whole base. So the host applying a patch holds one region
//! and one segment, whatever the file's size, and the maker indexes a region per frame instead
//! of the whole base. Measured on two builds of a 46 MiB Rust binary: 758 KB (the zstd CLI's
//! one-frame patch: 763 KB), made in 24 s; with the whole base per frame, 768 KB in 51 s.

use std::io::{self, Write};

/// The level patches are made at: they are made once per release and fetched by every host.
pub const PATCH_LEVEL: i32 = 19;
/// The largest window zstd decodes (2 GiB): patches are made only for files under it.
const MAX_WINDOW_LOG: u32 = 31;
/// How much of the new file one frame makes.
pub const SEGMENT: usize = 8 << 20;
/// How far either side of a segment's place its base region reaches (4 MiB measured smaller
/// patches than 12 MiB: near matches cost shorter offsets).
pub const MARGIN: usize = 4 << 20;
/// The skippable-frame magic that names a frame's base region (zstd reserves 0x184D2A50 to
/// 0x184D2A5F for frames a decoder skips).
const REGION_MAGIC: u32 = 0x184D_2A5E;
const REGION_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("the file is over {0} bytes: no patch is made for it")]
    TooBig(u64),
    #[error("the patch cannot be applied: {0}")]
    Corrupt(String),
    #[error("the patch makes more than the file's {0} bytes")]
    TooLong(u64),
    #[error("the patch makes {made} bytes, not the file's {size}")]
    TooShort { made: u64, size: u64 },
    #[error("reading the base file: {0}")]
    Base(#[source] io::Error),
    #[error("writing the patched file: {0}")]
    Write(#[source] io::Error),
}

/// The file a patch is applied to, read a region at a time.
pub trait Base {
    fn byte_len(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl Base for [u8] {
    fn byte_len(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let from = usize::try_from(offset).unwrap_or(usize::MAX);
        let part = from
            .checked_add(buf.len())
            .and_then(|end| self.get(from..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(part);
        Ok(())
    }
}

impl Base for std::fs::File {
    fn byte_len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

/// The window that covers a region and a segment whole, so every match in the region is in
/// reach (as the zstd CLI sizes it for `--patch-from`).
fn window_log(len: usize) -> u32 {
    let bits = usize::BITS - len.max(1 << 10).saturating_sub(1).leading_zeros();
    bits.clamp(10, MAX_WINDOW_LOG)
}

fn zstd_error(code: usize) -> PatchError {
    PatchError::Corrupt(zstd::zstd_safe::get_error_name(code).into())
}

/// The region of a base of `base_len` bytes that the segment at `start` (of `len` bytes) of a
/// file of `new_len` bytes refers to: its place scaled to the base, `margin` either side.
fn region(
    base_len: usize,
    new_len: usize,
    start: usize,
    len: usize,
    margin: usize,
) -> (usize, usize) {
    let scaled = |at: usize| (at as u128 * base_len as u128 / new_len.max(1) as u128) as usize;
    let from = scaled(start).saturating_sub(margin);
    let to = scaled(start + len).saturating_add(margin).min(base_len);
    (from.min(to), to)
}

/// A patch that turns `base` into `new`.
pub fn make(base: &[u8], new: &[u8], level: i32) -> Result<Vec<u8>, PatchError> {
    make_in_segments(base, new, level, SEGMENT, MARGIN)
}

fn make_in_segments(
    base: &[u8],
    new: &[u8],
    level: i32,
    segment_len: usize,
    margin: usize,
) -> Result<Vec<u8>, PatchError> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let segment_len = segment_len.max(1);
    let largest_region = (segment_len.min(new.len()) + 2 * margin).min(base.len());
    let reach = largest_region + segment_len.min(new.len());
    if reach > (1 << MAX_WINDOW_LOG) {
        return Err(PatchError::TooBig(1 << MAX_WINDOW_LOG));
    }
    let window = window_log(reach);
    let mut context = CCtx::create();
    for parameter in [
        CParameter::CompressionLevel(level),
        CParameter::WindowLog(window),
        CParameter::EnableLongDistanceMatching(true),
    ] {
        context.set_parameter(parameter).map_err(zstd_error)?;
    }
    // A larger match-finder hash for large files: measured on two builds of a 46 MiB Rust
    // binary as one frame, 734 KB instead of 921 KB, for 48 MB more memory.
    if window >= 25 {
        context
            .set_parameter(CParameter::HashLog((window - 2).min(24)))
            .map_err(zstd_error)?;
    }
    let mut patch = Vec::with_capacity(new.len() / 4);
    let mut frame = Vec::new();
    let mut start = 0;
    // An empty file is one empty frame, so every patch has at least one.
    loop {
        let segment = &new[start..(start + segment_len).min(new.len())];
        let (from, to) = region(base.len(), new.len(), start, segment.len(), margin);
        patch.extend_from_slice(&REGION_MAGIC.to_le_bytes());
        patch.extend_from_slice(&(REGION_LEN as u32).to_le_bytes());
        patch.extend_from_slice(&(from as u64).to_le_bytes());
        patch.extend_from_slice(&((to - from) as u64).to_le_bytes());
        // A prefix serves one frame only: it is referenced again for each.
        context.ref_prefix(&base[from..to]).map_err(zstd_error)?;
        frame.clear();
        frame.reserve(zstd::zstd_safe::compress_bound(segment.len()));
        context.compress2(&mut frame, segment).map_err(zstd_error)?;
        patch.extend_from_slice(&frame);
        start += segment.len();
        if start >= new.len() {
            return Ok(patch);
        }
    }
}

/// A region of the base: offset and length.
type Region = (u64, u64);

/// The region a skippable frame at the start of `rest` names, and what follows it; `None` if
/// `rest` does not start with one.
fn region_frame(rest: &[u8]) -> Result<Option<(Region, &[u8])>, PatchError> {
    let word = |at: usize| {
        rest.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let magic = word(0);
    if magic.is_none_or(|m| m & 0xFFFF_FFF0 != 0x184D_2A50) {
        return Ok(None);
    }
    let corrupt = || PatchError::Corrupt("a skippable frame that names no base region".into());
    if magic != Some(REGION_MAGIC) || word(4) != Some(REGION_LEN as u32) {
        return Err(corrupt());
    }
    let number = |at: usize| {
        rest.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (Some(offset), Some(len)) = (number(8), number(16)) else {
        return Err(corrupt());
    };
    Ok(Some(((offset, len), &rest[8 + REGION_LEN..])))
}

/// Applies a patch to `base`, writing the file to `out` a segment at a time, and returns the
/// BLAKE3 of what it wrote for the caller to check against the file's signed hash. Never makes
/// more or fewer than `size` bytes (a hostile patch cannot expand without bound). Each frame is
/// decoded in one call into a buffer of exactly its size, so zstd needs no window buffer of its
/// own: memory is the patch, one base region and one segment.
pub fn apply(
    base: &(impl Base + ?Sized),
    patch: &[u8],
    size: u64,
    out: &mut impl Write,
) -> Result<blake3::Hash, PatchError> {
    use zstd::zstd_safe::{DCtx, DParameter};
    let base_len = base.byte_len().map_err(PatchError::Base)?;
    let mut hasher = blake3::Hasher::new();
    let mut made = 0u64;
    let mut rest = patch;
    let mut reference = Vec::new();
    let mut buffer = Vec::new();
    // The maker's regions add up to about the base and the file; a patch that reads the base
    // over and over is not one of its patches.
    let mut may_read = base_len
        .saturating_add(size)
        .saturating_mul(2)
        .saturating_add(4 * MARGIN as u64);
    while !rest.is_empty() {
        let (offset, len) = match region_frame(rest)? {
            Some((region, after)) => {
                rest = after;
                region
            }
            None => (0, base_len),
        };
        if offset.checked_add(len).is_none_or(|end| end > base_len) {
            return Err(PatchError::Corrupt(format!(
                "a region of {len} bytes at {offset} outside the base's {base_len}"
            )));
        }
        may_read = may_read
            .checked_sub(len)
            .ok_or_else(|| PatchError::Corrupt("it reads the base over and over".into()))?;
        // Within the base's length, which is on this host's disk or in memory already.
        reference.resize(len as usize, 0);
        base.read_at(&mut reference, offset)
            .map_err(PatchError::Base)?;
        let frame_len = zstd::zstd_safe::find_frame_compressed_size(rest).map_err(zstd_error)?;
        let (frame, after) = rest.split_at(frame_len.min(rest.len()));
        rest = after;
        let frame_size = match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(Some(n)) => n,
            _ => return Err(PatchError::Corrupt("a frame without its size".into())),
        };
        if frame_size > size - made {
            return Err(PatchError::TooLong(size));
        }
        let frame_size = usize::try_from(frame_size).map_err(|_| PatchError::TooLong(size))?;
        buffer.clear();
        buffer.reserve_exact(frame_size);
        // A context per frame: it borrows the frame's region.
        let mut context = DCtx::create();
        // Single-call decoding keeps no window, so the window a frame declares costs nothing.
        context
            .set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG))
            .map_err(zstd_error)?;
        context.ref_prefix(&reference).map_err(zstd_error)?;
        let n = context.decompress(&mut buffer, frame).map_err(zstd_error)?;
        if n != frame_size {
            return Err(PatchError::Corrupt(
                "a frame unlike its declared size".into(),
            ));
        }
        hasher.update(&buffer);
        out.write_all(&buffer).map_err(PatchError::Write)?;
        made += n as u64;
    }
    if made != size {
        return Err(PatchError::TooShort { made, size });
    }
    Ok(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::pseudo_random as noise;

    fn applied(base: &[u8], patch: &[u8], size: u64) -> Result<Vec<u8>, PatchError> {
        let mut out = Vec::new();
        let hash = apply(base, patch, size, &mut out)?;
        assert_eq!(hash, blake3::hash(&out), "the hash is of what was written");
        Ok(out)
    }

    /// A 3 MiB file with a few edits spread over it and an insertion that shifts everything
    /// after it.
    fn edited() -> (Vec<u8>, Vec<u8>) {
        let base = noise(3 << 20, 7);
        let mut new = base.clone();
        for at in [1000, 900_000, 2_000_000] {
            new[at..at + 64].copy_from_slice(&noise(64, at as u64));
        }
        new.splice(1_500_000..1_500_000, noise(4096, 3));
        (base, new)
    }

    #[test]
    fn a_patch_of_a_small_change_is_small_and_makes_the_new_file() {
        let (base, new) = edited();
        // One frame; frames of 512 KiB that each reach the whole base; and frames that each
        // reach 128 KiB either side of their place.
        for (segment, margin) in [
            (SEGMENT, MARGIN),
            (512 << 10, 4 << 20),
            (512 << 10, 128 << 10),
        ] {
            let patch = make_in_segments(&base, &new, 3, segment, margin).expect("patch");
            assert!(patch.len() < 16 * 1024, "patch is {} bytes", patch.len());
            assert_eq!(
                applied(&base, &patch, new.len() as u64).expect("applies"),
                new
            );
        }
        let empty = make(&base, &[], 3).expect("patch");
        assert_eq!(
            applied(&base, &empty, 0).expect("applies"),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn a_patch_reads_its_base_from_a_file_a_region_at_a_time() {
        let (base, new) = edited();
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("base");
        std::fs::write(&path, &base).expect("write");
        let patch = make_in_segments(&base, &new, 3, 512 << 10, 128 << 10).expect("patch");
        let file = std::fs::File::open(&path).expect("open");
        let mut out = Vec::new();
        let hash = apply(&file, &patch, new.len() as u64, &mut out).expect("applies");
        assert_eq!((hash, out), (blake3::hash(&new), new));
    }

    #[test]
    fn a_frame_without_a_region_refers_to_the_whole_base() {
        // A one-frame patch whose region is the whole base, its region frame taken away.
        let (base, new) = edited();
        let patch = make_in_segments(&base, &new, 3, SEGMENT, base.len()).expect("patch");
        assert_eq!(patch[..4], REGION_MAGIC.to_le_bytes());
        let plain = &patch[8 + REGION_LEN..];
        assert_eq!(
            applied(&base, plain, new.len() as u64).expect("applies"),
            new
        );
    }

    #[test]
    fn a_patch_applied_to_another_base_or_damaged_never_makes_the_file() {
        let base = noise(200_000, 1);
        let mut new = base.clone();
        new[100..200].fill(0);
        let patch = make_in_segments(&base, &new, 3, 64 << 10, 16 << 10).expect("patch");
        let other = noise(200_000, 2);
        assert_ne!(
            applied(&other, &patch, new.len() as u64).ok(),
            Some(new.clone())
        );
        let mut damaged = patch.clone();
        let mid = damaged.len() / 2;
        damaged[mid] ^= 0xff;
        assert_ne!(
            applied(&base, &damaged, new.len() as u64).ok(),
            Some(new.clone())
        );
        assert!(matches!(
            applied(&base, &patch, new.len() as u64 - 1),
            Err(PatchError::TooLong(_))
        ));
        assert!(matches!(
            applied(&base, &patch, new.len() as u64 + 1),
            Err(PatchError::TooShort { .. })
        ));
        // A frame cut short, and a patch that is not zstd at all.
        assert!(applied(&base, &patch[..patch.len() - 3], new.len() as u64).is_err());
        assert!(applied(&base, b"not a patch", new.len() as u64).is_err());
        // A region past the base's end, and one named over and over.
        let mut outside = patch.clone();
        outside[8..16].copy_from_slice(&(base.len() as u64).to_le_bytes());
        assert!(matches!(
            applied(&base, &outside, new.len() as u64),
            Err(PatchError::Corrupt(_))
        ));
        // Empty frames that each read the whole base: no work, and no end to reading.
        let nothing = make_in_segments(&base, &[], 3, SEGMENT, base.len()).expect("patch");
        assert!(applied(&base, &nothing.repeat(10), 0).is_ok());
        assert!(matches!(
            applied(&base, &nothing.repeat(200), 0),
            Err(PatchError::Corrupt(_))
        ));
    }
}
