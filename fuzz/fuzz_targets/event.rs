//! `cargo fuzz run event` (or `ops/fuzz SECONDS event`): see `fleetcast_fuzz::event`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetcast_fuzz::event(data));
