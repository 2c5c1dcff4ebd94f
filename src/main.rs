//! `reimage DRIVER < request.json`: see the README and `reimage --help`.

use reimage::cli::{self, Start};

fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let (parsed, notes) = match cli::start(&args) {
        Start::Done(status) => return std::process::ExitCode::from(status),
        Start::Request(parsed, notes) => (parsed, notes),
    };
    // SAFETY: this is the process's only thread, and it owns no descriptor but the standard
    // streams: `cli::start` opened and closed only what it ran (the module loader's pipes).
    let reduced = unsafe { reimage::privilege::reduce() };
    let status = cli::run(parsed, notes, reduced, &mut std::io::stdin().lock());
    std::process::ExitCode::from(status)
}
