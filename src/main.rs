//! `fjord`: the broker (`fjord serve`) and its admin commands.

use clap::Parser;

#[global_allocator]
static ALLOC: fjord::alloc::LazyHugeAlloc = fjord::alloc::LazyHugeAlloc;

fn main() {
    let args = fjord::cli::Cli::parse();
    let code = match fjord::cli::run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("fjord: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
