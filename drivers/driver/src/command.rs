//! Running a backend's own programs (`zfs`, `zpool`, `lvm`, `mkfs.*`): an argument vector,
//! never a shell; a cleared environment with a fixed `PATH` and `LC_ALL=C`, so that nothing in
//! the caller's environment changes what runs or how its output and messages read; stdin
//! from /dev/null, so a program that asks a question gets no answer instead of hanging.

use std::ffi::OsStr;
use std::fmt;
use std::process::{Command, Stdio};

/// Where the programs are looked up, whatever `PATH` the caller had.
pub const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// A program that ran and failed, or could not be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The command line, for messages.
    pub command: String,
    /// Exit status; `None` when the program could not be started or was killed.
    pub status: Option<i32>,
    /// What it printed on stderr (or why it could not start), trimmed.
    pub stderr: String,
    /// What it printed on stdout before failing (some commands report partial results).
    pub stdout: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(code) => write!(
                f,
                "`{}` failed (exit {code}): {}",
                self.command, self.stderr
            ),
            None => write!(f, "`{}` failed: {}", self.command, self.stderr),
        }
    }
}

/// Runs `program` with `args` and returns its stdout, or the failure with its stderr.
pub fn run<I, S>(program: &str, args: I) -> Result<String, Failure>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let command = std::iter::once(program.to_owned())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ");
    let output = Command::new(program)
        .args(&args)
        .env_clear()
        .env("PATH", PATH)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            return Err(Failure {
                command,
                status: None,
                stderr: format!("cannot run {program}: {e} (is it installed in {PATH}?)"),
                stdout: String::new(),
            })
        }
    };
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    Err(Failure {
        command,
        status: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_get_a_cleared_environment() {
        std::env::set_var("REIMAGE_LEAK_CHECK", "leaked");
        let out = run("env", std::iter::empty::<&str>()).unwrap();
        let mut vars: Vec<&str> = out.lines().collect();
        vars.sort();
        let path = format!("PATH={PATH}");
        assert_eq!(vars, ["LC_ALL=C", path.as_str()]);
    }

    #[test]
    fn a_failure_says_what_ran_and_why() {
        let e = run("sh", ["-c", "echo partial; echo broken >&2; exit 3"]).unwrap_err();
        assert_eq!(e.status, Some(3));
        assert_eq!(e.stderr, "broken");
        assert_eq!(e.stdout, "partial\n");
        assert!(e.to_string().contains("`sh -c"), "{e}");
        let missing = run("reimage-no-such-program", ["x"]).unwrap_err();
        assert_eq!(missing.status, None);
        assert!(missing.stderr.contains("is it installed"), "{missing}");
    }
}
