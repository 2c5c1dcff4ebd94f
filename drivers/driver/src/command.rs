//! Running a backend's own programs (`zfs`, `zpool`, `lvm`, `mkfs.*`): an argument vector,
//! never a shell; a cleared environment with a fixed `PATH` and `LC_ALL=C`, so that nothing in
//! the caller's environment changes what runs or how its output and messages read; stdin
//! from /dev/null, so a program that asks a question gets no answer instead of hanging.
//!
//! Each program runs in a process group of its own and for at most the command timeout
//! (the config's `command_timeout`, [`DEFAULT_TIMEOUT`] otherwise): a program that hangs (a
//! `zfs` waiting on a stuck pool) is killed with everything it started, and reported as a
//! failure that names it, instead of holding the volume's lock forever.

use std::ffi::OsStr;
use std::fmt;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where the programs are looked up, whatever `PATH` the caller had.
pub const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a program may run when the config does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The command timeout in seconds, set once at start from the config.
static TIMEOUT_SECONDS: AtomicU64 = AtomicU64::new(DEFAULT_TIMEOUT.as_secs());

/// Sets how long every program run from now on may take (at least a second).
pub fn set_timeout(limit: Duration) {
    TIMEOUT_SECONDS.store(limit.as_secs().max(1), Ordering::Relaxed);
}

/// The command timeout in force.
pub fn timeout() -> Duration {
    Duration::from_secs(TIMEOUT_SECONDS.load(Ordering::Relaxed))
}

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

/// Runs `program` with `args` and returns its stdout, or the failure with its stderr; a
/// program still running after the command timeout is killed and fails.
pub fn run<I, S>(program: &str, args: I) -> Result<String, Failure>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_for(program, args, timeout())
}

/// What the threads watching a child report.
enum Watched {
    Exited(std::io::Result<ExitStatus>),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// Reads `pipe` to its end on a thread of its own and sends what it read, as `wrap` says.
fn read_to_end<R: Read + Send + 'static>(
    mut pipe: R,
    tx: mpsc::Sender<Watched>,
    wrap: fn(Vec<u8>) -> Watched,
) {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let _ = tx.send(wrap(bytes));
    });
}

/// [`run`] with an explicit time limit.
pub fn run_for<I, S>(program: &str, args: I, limit: Duration) -> Result<String, Failure>
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
    let failure = |status: Option<i32>, stderr: String, stdout: String| Failure {
        command: command.clone(),
        status,
        stderr,
        stdout,
    };
    let mut child = match Command::new(program)
        .args(&args)
        .env_clear()
        .env("PATH", PATH)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            return Err(failure(
                None,
                format!("cannot run {program}: {e} (is it installed in {PATH}?)"),
                String::new(),
            ))
        }
    };
    let group = child.id();
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        read_to_end(out, tx.clone(), Watched::Stdout);
    }
    if let Some(err) = child.stderr.take() {
        read_to_end(err, tx.clone(), Watched::Stderr);
    }
    std::thread::spawn(move || {
        let _ = tx.send(Watched::Exited(child.wait()));
    });
    let mut deadline = Instant::now() + limit;
    let (mut status, mut stdout, mut stderr) = (None, None, None);
    let mut timed_out = false;
    while status.is_none() || stdout.is_none() || stderr.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Watched::Exited(s)) => status = Some(s),
            Ok(Watched::Stdout(b)) => stdout = Some(b),
            Ok(Watched::Stderr(b)) => stderr = Some(b),
            Err(mpsc::RecvTimeoutError::Timeout) if !timed_out => {
                timed_out = true;
                // The whole group: the program and whatever it started. Then a moment for
                // what they printed; a descendant that left the group and kept the pipes
                // open is not waited for.
                if let Some(pid) = i32::try_from(group)
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                }
                deadline = Instant::now() + Duration::from_secs(1);
            }
            Err(_) => break,
        }
    }
    let text =
        |bytes: Option<Vec<u8>>| String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned();
    let (stdout, stderr) = (text(stdout), text(stderr).trim().to_owned());
    if timed_out {
        let printed = if stderr.is_empty() {
            String::new()
        } else {
            format!("; it said: {stderr}")
        };
        return Err(failure(
            None,
            format!(
                "it was still running after {} s and was killed (the limit is `command_timeout` in the config){printed}",
                limit.as_secs()
            ),
            stdout,
        ));
    }
    match status {
        Some(Ok(s)) if s.success() => Ok(stdout),
        Some(Ok(s)) => Err(failure(s.code(), stderr, stdout)),
        Some(Err(e)) => Err(failure(None, format!("waiting for {program}: {e}"), stdout)),
        None => Err(failure(None, format!("lost track of {program}"), stdout)),
    }
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

    #[test]
    fn a_program_that_hangs_is_killed_with_what_it_started() {
        let started = Instant::now();
        // The shell starts a sleep of its own and waits for it; both are in the group.
        let e = run_for(
            "sh",
            ["-c", "echo begun; sleep 60 & echo $! > /dev/null; wait"],
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "{e}");
        assert_eq!(e.status, None);
        assert!(e.stderr.contains("still running after 1 s"), "{e}");
        assert!(e.to_string().contains("`sh -c"), "{e}");
    }
}
