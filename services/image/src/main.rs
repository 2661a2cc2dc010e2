//! The container image's one binary. The image ships it as `fleetcast` (the operator and CI
//! command) with `fleetcast-watcher` … `fleetcast-tracker` as links to it: called by a
//! service's name it is that service. One copy of the code they share instead of five (about
//! 50 MB less). Hosts may install the services' own binaries; they behave the same.

use std::path::Path;
use std::process::ExitCode;

/// A service's whole program (its library's `main`).
type ServiceMain = fn() -> ExitCode;

const SERVICES: [(&str, ServiceMain); 4] = [
    ("fleetcast-watcher", fleetcast_watcher::main),
    ("fleetcast-signer", fleetcast_signer::main),
    ("fleetcast-distributor", fleetcast_distributor::main),
    ("fleetcast-tracker", fleetcast_tracker::main),
];

fn main() -> ExitCode {
    let called_as = std::env::args_os()
        .next()
        .and_then(|arg0| {
            Path::new(&arg0)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    match SERVICES.iter().find(|(name, _)| *name == called_as) {
        Some((_, service)) => service(),
        None => fleetcast_cli::main(),
    }
}
