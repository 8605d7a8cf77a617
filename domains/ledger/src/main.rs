fn main() -> std::process::ExitCode {
    reproject::cli::main(reproject_ledger::Ledger::default())
}
