//! `fjord`: the broker (`fjord serve`) and its admin commands.

use clap::Parser;

#[global_allocator]
static ALLOC: fjord::alloc::LazyHugeAlloc = fjord::alloc::LazyHugeAlloc;

fn main() {
    let args = fjord::cli::Cli::parse();
    if !matches!(args.cmd, fjord::cli::Cmd::Serve(_)) {
        // An admin command piped into `head` ends quietly when the pipe closes, as Unix tools
        // do (the broker keeps ignoring SIGPIPE: a client's reset must not kill it).
        // SAFETY: setting a signal's disposition to the default has no preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let code = match fjord::cli::run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("fjord: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
