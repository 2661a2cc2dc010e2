fn main() -> std::process::ExitCode {
    fleetcast_signer::main()
}
