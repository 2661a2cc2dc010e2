//! `cargo fuzz run chunk_index` (or `ops/fuzz SECONDS chunk_index`): see `fleetcast_fuzz::chunk_index`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetcast_fuzz::chunk_index(data));
