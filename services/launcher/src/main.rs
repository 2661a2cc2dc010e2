//! fleetcast-launcher: see the lib (`fleetcast_launcher::daemon`) for what it does.

use std::io::Write;
use std::process::ExitCode;

use fleetcast_launcher::daemon::{self, Cli};

fn main() -> ExitCode {
    match daemon::parse_args(std::env::args_os().skip(1)) {
        Ok(Cli::Help) => {
            let _ = std::io::stdout().write_all(daemon::USAGE.as_bytes());
            ExitCode::SUCCESS
        }
        Ok(Cli::Version) => {
            let _ = writeln!(
                std::io::stdout(),
                "fleetcast-launcher {}",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::SUCCESS
        }
        Ok(Cli::Run(config)) => match daemon::run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "fleetcast-launcher: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "fleetcast-launcher: {e}\n\n{}",
                daemon::USAGE
            );
            ExitCode::from(2)
        }
    }
}
