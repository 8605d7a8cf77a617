//! The stock `reproject` binary: the command line for the example shop, or for a domain defined by
//! files (`--domain DIR`). A team's compiled binary is the same three lines with its own domain
//! (README, "Use it with your own events").

/// The replay allocates small keys and strings for every event on two threads; glibc's allocator
/// spent a fifth of the reader's time in malloc and on arena locks, mimalloc a fraction of that.
#[cfg(not(feature = "heap-count"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Built with `--features heap-count`, the binary counts the bytes its heap holds and prints them
/// every second and their peak at exit (on stderr): what the memory budget must cover, told apart
/// from what the allocator keeps and what librdkafka allocates through malloc. Two atomic
/// operations per allocation: for measuring, not for production.
#[cfg(feature = "heap-count")]
mod heap_count {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub struct Counting;
    pub static LIVE: AtomicUsize = AtomicUsize::new(0);
    pub static PEAK: AtomicUsize = AtomicUsize::new(0);

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(live, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }

    pub fn report_every_second() {
        std::thread::spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            eprintln!("heap-count: live {} MB", LIVE.load(Ordering::Relaxed) >> 20);
        });
    }
}

#[cfg(feature = "heap-count")]
#[global_allocator]
static GLOBAL: heap_count::Counting = heap_count::Counting;

fn main() -> std::process::ExitCode {
    #[cfg(feature = "heap-count")]
    heap_count::report_every_second();
    let code = match reproject::cli::requested_domain_dir() {
        Some(dir) => reproject::cli::main_with_files(&dir),
        None => reproject::cli::main(reproject::domain::shop::Shop),
    };
    #[cfg(feature = "heap-count")]
    eprintln!(
        "heap-count: peak {} MB",
        heap_count::PEAK.load(std::sync::atomic::Ordering::Relaxed) >> 20
    );
    code
}
