fn main() -> std::process::ExitCode {
    reproject_ledger::command_line(reproject_ledger::Ledger::default())
}
