//! `reimage DRIVER < request.json`: see the README and `reimage --help`.

fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let status = reimage::cli::run(&args, &mut std::io::stdin().lock());
    std::process::ExitCode::from(status)
}
