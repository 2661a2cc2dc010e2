//! Binary patches between two versions of a file: zstd with the old file as its reference
//! window and long-distance matching, which is what `zstd --patch-from --long` does. zstd is
//! already how chunks are stored, applies a patch at decompression speed in memory bounded by
//! the two files, and its CLI is the reference `ops/bench agent` measures patches against
//! (`rebuilt_patch_from_bytes`).

use std::io::{self, Write};

/// The level patches are made at: they are made once per release and fetched by every host.
pub const PATCH_LEVEL: i32 = 19;
/// The largest window zstd decodes (2 GiB): patches are made only for files under it.
const MAX_WINDOW_LOG: u32 = 31;

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("the file is over {0} bytes: no patch is made for it")]
    TooBig(u64),
    #[error("the patch cannot be applied: {0}")]
    Corrupt(String),
    #[error("the patch makes more than the file's {0} bytes")]
    TooLong(u64),
}

/// The window that covers the base and the new file whole, so every match in the base is in
/// reach (as the zstd CLI sizes it for `--patch-from`).
fn window_log(len: usize) -> u32 {
    let bits = usize::BITS - len.max(1 << 10).saturating_sub(1).leading_zeros();
    bits.clamp(10, MAX_WINDOW_LOG)
}

/// A patch that turns `base` into `new`.
pub fn make(base: &[u8], new: &[u8], level: i32) -> Result<Vec<u8>, PatchError> {
    let largest = base.len().max(new.len());
    if window_log(largest) >= MAX_WINDOW_LOG && largest > (1 << MAX_WINDOW_LOG) {
        return Err(PatchError::TooBig(1 << MAX_WINDOW_LOG));
    }
    let corrupt = |e: io::Error| PatchError::Corrupt(e.to_string());
    let mut encoder = zstd::stream::write::Encoder::with_ref_prefix(
        Vec::with_capacity(new.len() / 4),
        level,
        base,
    )
    .map_err(corrupt)?;
    let window = window_log(largest);
    encoder.window_log(window).map_err(corrupt)?;
    encoder.long_distance_matching(true).map_err(corrupt)?;
    // A larger match-finder hash for large files: measured on two builds of a 46 MiB Rust
    // binary, 734 KB instead of 921 KB (the zstd CLI's own patch: 763 KB), for 48 MB more
    // memory (310 MB peak with both files, about the CLI's 316).
    if window >= 25 {
        encoder
            .set_parameter(zstd::zstd_safe::CParameter::HashLog((window - 2).min(24)))
            .map_err(corrupt)?;
    }
    encoder
        .set_pledged_src_size(Some(new.len() as u64))
        .map_err(corrupt)?;
    encoder.write_all(new).map_err(corrupt)?;
    encoder.finish().map_err(corrupt)
}

/// Applies a patch to `base`; never makes more than `size` bytes (a hostile patch cannot
/// expand without bound). Decoded in one call into a buffer of exactly `size` bytes, so zstd
/// needs no window buffer of its own: memory is the base, the patch and the file. The caller
/// checks the result against the file's signed hash.
pub fn apply(base: &[u8], patch: &[u8], size: u64) -> Result<Vec<u8>, PatchError> {
    let size = usize::try_from(size).map_err(|_| PatchError::TooLong(size))?;
    let mut context = zstd::zstd_safe::DCtx::create();
    context
        .ref_prefix(base)
        .map_err(|code| PatchError::Corrupt(zstd::zstd_safe::get_error_name(code).into()))?;
    let mut out = Vec::with_capacity(size);
    match context.decompress(&mut out, patch) {
        Ok(_) => Ok(out),
        // A frame that makes more than `size` bytes does not fit the buffer.
        Err(code) if zstd::zstd_safe::get_error_name(code).contains("too small") => {
            Err(PatchError::TooLong(size as u64))
        }
        Err(code) => Err(PatchError::Corrupt(
            zstd::zstd_safe::get_error_name(code).into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::tests::pseudo_random as noise;

    #[test]
    fn a_patch_of_a_small_change_is_small_and_makes_the_new_file() {
        let base = noise(3 << 20, 7);
        let mut new = base.clone();
        // A few edits spread over the file, and an insertion that shifts everything after it.
        for at in [1000, 900_000, 2_000_000] {
            new[at..at + 64].copy_from_slice(&noise(64, at as u64));
        }
        new.splice(1_500_000..1_500_000, noise(4096, 3));
        let patch = make(&base, &new, 3).expect("patch");
        assert!(patch.len() < 16 * 1024, "patch is {} bytes", patch.len());
        assert_eq!(
            apply(&base, &patch, new.len() as u64).expect("applies"),
            new
        );
    }

    #[test]
    fn a_patch_applied_to_another_base_or_damaged_never_makes_the_file() {
        let base = noise(200_000, 1);
        let mut new = base.clone();
        new[100..200].fill(0);
        let patch = make(&base, &new, 3).expect("patch");
        let other = noise(200_000, 2);
        assert_ne!(
            apply(&other, &patch, new.len() as u64).ok(),
            Some(new.clone())
        );
        let mut damaged = patch.clone();
        let mid = damaged.len() / 2;
        damaged[mid] ^= 0xff;
        assert_ne!(
            apply(&base, &damaged, new.len() as u64).ok(),
            Some(new.clone())
        );
        assert!(matches!(
            apply(&base, &patch, new.len() as u64 - 1),
            Err(PatchError::TooLong(_))
        ));
    }
}
