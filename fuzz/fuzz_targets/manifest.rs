//! `cargo fuzz run manifest` (or `ops/fuzz SECONDS manifest`): see `fleetcast_fuzz::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetcast_fuzz::manifest(data));
