//! `fleetcast`: the operator and CI command (see [`fleetcast_cli::command_line`]).

fn main() -> std::process::ExitCode {
    fleetcast_cli::main()
}
