//! The ledger as it was released before `daily_volume` v2 fixed its largest-transfer column: kept so
//! that the tests and the README can re-enact "a bug in a projection was fixed, rebuild it".

fn main() -> std::process::ExitCode {
    reproject_ledger::command_line(reproject_ledger::Ledger::before_daily_volume_fix())
}
