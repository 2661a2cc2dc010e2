//! `cargo fuzz run archive` (or `ops/fuzz SECONDS archive`): see `fleetcast_fuzz::archive`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetcast_fuzz::archive(data));
