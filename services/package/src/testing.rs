//! Test data: for this crate's tests, the fuzz seed corpus (`fuzz/examples/make-corpus.rs`)
//! and the test harness, with the `testing` feature. No service uses it.

/// Deterministic incompressible bytes (xorshift), so tests need no RNG crate. The same `len`
/// and `seed` give the same bytes on every run and machine: the committed fuzz corpus is made
/// of them.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `bytes` with every occurrence of `from` replaced by `to`, of the same length: a name patched
/// in a finished zip, in its local header and its central directory alike (zip writers refuse
/// to write what hostile archives hold, such as two entries of one name).
pub fn replace_all(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len(), "a replacement of another length");
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + to.len()].copy_from_slice(to);
        }
        i += 1;
    }
    bytes
}
