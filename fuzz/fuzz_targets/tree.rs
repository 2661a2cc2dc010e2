//! `cargo fuzz run tree` (or `ops/fuzz SECONDS tree`): see `fleetcast_fuzz::tree`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetcast_fuzz::tree(data));
