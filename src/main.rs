//! The stock `reproject` binary: the command line for the example shop, or for a domain defined by
//! files (`--domain DIR`). A team's compiled binary is the same three lines with its own domain
//! (README, "Use it with your own events").

/// The replay allocates small keys and strings for every event on two threads; glibc's allocator
/// spent a fifth of the reader's time in malloc and on arena locks, mimalloc a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match reproject::cli::requested_domain_dir() {
        Some(dir) => reproject::cli::main_with_files(&dir),
        None => reproject::cli::main(reproject::domain::shop::Shop),
    }
}
