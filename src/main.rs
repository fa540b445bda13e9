//! The `rcptgate` command line: a thin shell over the library (see `src/cli/`).

mod cli;

/// The daemon's allocator. glibc's spent a quarter of a full build's time in `malloc`, `free`
/// and their consolidation (every parsed address has a few short strings); mimalloc's
/// thread-local free lists cut the 10M full build by a quarter or more (README,
/// "Performance"). The library leaves the choice to the program that links it.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
