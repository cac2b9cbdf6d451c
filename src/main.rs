//! `fjord`: the broker (`fjord serve`) and its admin commands.

mod cli;
mod cluster;
mod config;
mod group;
mod log;
mod partition;
mod server;
mod shard;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    let code = match cli::run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("fjord: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
