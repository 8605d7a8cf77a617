//! Standard output that ends quietly when its reader goes away (`reproject status | head -1`,
//! `reproject replay ID | less` quit early), as ripgrep's does, instead of panicking on a broken pipe
//! the way `println!` does. Every command prints through [`out!`] and [`outln!`].

use std::io::Write;

/// Write to standard output. A reader that went away ends the process with success: whatever
/// reproject was asked to do is done by the time it reports on it. Any other write error ends it with
/// the error on standard error.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("reproject: cannot write to standard output: {e}");
            std::process::exit(2);
        }
    }
}

/// `print!` that ends quietly on a closed pipe; see [`write`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write(format_args!($($arg)*))
    };
}

/// `println!` that ends quietly on a closed pipe; see [`write`].
macro_rules! outln {
    () => {
        $crate::cli::output::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {out, outln};
