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
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

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

/// What became of a child: its exit status (if it was seen to exit), what it printed, and
/// whether it had to be killed.
struct Outcome {
    status: Option<std::io::Result<ExitStatus>>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    timed_out: bool,
}

/// Whether `child` has exited, without reaping it: a zombie keeps its pid, so its process
/// group cannot be reused by another until [`reap`] runs, and a kill of the group after a
/// timeout can only reach what the child started.
fn exited(child: &Child) -> bool {
    let Some(pid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) else {
        return true;
    };
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    match rustix::process::waitid(WaitId::Pid(pid), options) {
        Ok(seen) => seen.is_some(),
        // ECHILD: not ours to wait for any more; EINTR: look again on the next turn.
        Err(e) => e != rustix::io::Errno::INTR,
    }
}

/// Waits for `child` to exit and close both pipes, reading them as it goes, on this thread
/// alone: one poll(2) over the two pipes and the child's pidfd (where the kernel has pidfds;
/// elsewhere the child is checked for every few milliseconds). After `limit` the process
/// group `group` (the child's, whose leader is not reaped before this returns) is killed,
/// and a second later the watch ends whatever is still open: a descendant that left the
/// group and kept the pipes open is not waited for. The child is reaped last.
fn watch(child: &mut Child, group: Pid, limit: Duration) -> Outcome {
    let mut pipes = [
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    ];
    let mut printed = [Vec::new(), Vec::new()];
    let pidfd = rustix::process::pidfd_open(Pid::from_child(child), PidfdFlags::empty()).ok();
    let mut has_exited = false;
    let mut timed_out = false;
    let mut deadline = Instant::now() + limit;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        has_exited = has_exited || exited(child);
        if has_exited && pipes.iter().all(Option::is_none) {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            if timed_out {
                break;
            }
            timed_out = true;
            // The whole group: the program and whatever it started. Its leader is not
            // reaped yet, so the group id still names this group.
            let _ = rustix::process::kill_process_group(group, Signal::KILL);
            deadline = now + Duration::from_secs(1);
            continue;
        }
        let mut wait = deadline - now;
        let exit_seen_by_poll = !has_exited && pidfd.is_some();
        if !has_exited && pidfd.is_none() {
            wait = wait.min(Duration::from_millis(5));
        }
        let mut fds: Vec<PollFd<'_>> = pipes
            .iter()
            .flatten()
            .map(|fd| PollFd::new(fd, PollFlags::IN))
            .collect();
        if let (true, Some(fd)) = (exit_seen_by_poll, &pidfd) {
            fds.push(PollFd::new(fd, PollFlags::IN));
        }
        if fds.is_empty() {
            std::thread::sleep(wait);
            continue;
        }
        let timeout = Timespec::try_from(wait).ok();
        if rustix::event::poll(&mut fds, timeout.as_ref()).is_err() {
            // EINTR, or no memory for the poll: look again.
            continue;
        }
        let mut ready = fds.iter().map(|fd| !fd.revents().is_empty());
        let ready: [bool; 2] =
            std::array::from_fn(|i| pipes[i].is_some() && ready.next().unwrap_or(false));
        drop(fds);
        for (i, pipe) in pipes.iter_mut().enumerate() {
            let Some(fd) = pipe.as_ref().filter(|_| ready[i]) else {
                continue;
            };
            // One read per wake: poll said it will not block.
            match rustix::io::read(fd, &mut chunk) {
                Ok(0) => *pipe = None,
                Ok(n) => printed[i].extend_from_slice(&chunk[..n]),
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(_) => *pipe = None,
            }
        }
    }
    let status = reap(child, has_exited);
    let [stdout, stderr] = printed;
    Outcome {
        status,
        stdout,
        stderr,
        timed_out,
    }
}

/// The exit status of `child`, reaped: waited for when it was seen to exit, looked at
/// without waiting otherwise (`None`: still running after its kill, as a program stuck in
/// the kernel is; it is reaped when reimage exits).
fn reap(child: &mut Child, ended: bool) -> Option<std::io::Result<ExitStatus>> {
    if ended {
        Some(child.wait())
    } else {
        child.try_wait().transpose()
    }
}

/// `program` with `args`, as every program here runs: a cleared environment with [`PATH`]
/// and `LC_ALL=C`, stdin from /dev/null, stdout and stderr piped.
fn prepared<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Command {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn cannot_run(program: &str, e: &std::io::Error) -> String {
    format!("cannot run {program}: {e} (is it installed in {PATH}?)")
}

fn killed_after(limit: Duration, stderr: &str) -> String {
    let printed = if stderr.is_empty() {
        String::new()
    } else {
        format!("; it said: {stderr}")
    };
    format!(
        "it was still running after {} s and was killed (the limit is `command_timeout` in the config){printed}",
        limit.as_secs()
    )
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
    let mut child = match prepared(program, &args).process_group(0).spawn() {
        Ok(child) => child,
        Err(e) => return Err(failure(None, cannot_run(program, &e), String::new())),
    };
    let Some(group) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) else {
        return Err(failure(
            None,
            format!("{program} has no process id"),
            String::new(),
        ));
    };
    let outcome = watch(&mut child, group, limit);
    let stdout = String::from_utf8_lossy(&outcome.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&outcome.stderr).trim().to_owned();
    if outcome.timed_out {
        return Err(failure(None, killed_after(limit, &stderr), stdout));
    }
    match outcome.status {
        Some(Ok(s)) if s.success() => Ok(stdout),
        Some(Ok(s)) => Err(failure(s.code(), stderr, stdout)),
        Some(Err(e)) => Err(failure(None, format!("waiting for {program}: {e}"), stdout)),
        None => Err(failure(None, format!("lost track of {program}"), stdout)),
    }
}

/// Runs `first | second`: `first`'s stdout into `second`'s stdin, both by argument vector
/// as [`run`] runs one program, in one process group that the command timeout kills whole.
/// Returns `second`'s stdout, or the failure of whichever failed (`first`'s stderr told
/// too: a `second` that stopped reading makes `first` fail on its pipe).
pub fn run_piped(first: (&str, &[&str]), second: (&str, &[&str])) -> Result<String, Failure> {
    let command = std::iter::once(first.0)
        .chain(first.1.iter().copied())
        .chain(std::iter::once("|"))
        .chain(std::iter::once(second.0))
        .chain(second.1.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let failure = |status: Option<i32>, stderr: String, stdout: String| Failure {
        command: command.clone(),
        status,
        stderr,
        stdout,
    };
    let cannot =
        |program: &str, e: std::io::Error| failure(None, cannot_run(program, &e), String::new());
    let mut writer = prepared(first.0, first.1)
        .process_group(0)
        .spawn()
        .map_err(|e| cannot(first.0, e))?;
    let Some(group) = i32::try_from(writer.id()).ok().and_then(Pid::from_raw) else {
        let _ = writer.kill();
        let _ = writer.wait();
        return Err(failure(
            None,
            format!("{} has no process id", first.0),
            String::new(),
        ));
    };
    let Some(pipe) = writer.stdout.take() else {
        let _ = writer.kill();
        let _ = writer.wait();
        return Err(failure(
            None,
            "no pipe to the second program".into(),
            String::new(),
        ));
    };
    let reader = prepared(second.0, second.1)
        .stdin(Stdio::from(pipe))
        .process_group(group.as_raw_nonzero().get())
        .spawn();
    let mut reader = match reader {
        Ok(child) => child,
        Err(e) => {
            let _ = writer.kill();
            let _ = writer.wait();
            return Err(cannot(second.0, e));
        }
    };
    let limit = timeout();
    // The group is the writer's, which is reaped only below: the id cannot be reused while
    // the watch may kill it.
    let outcome = watch(&mut reader, group, limit);
    // The writer's stderr is small (a message at most) and read once it has exited.
    let written = writer.wait_with_output();
    let stdout = String::from_utf8_lossy(&outcome.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&outcome.stderr).trim().to_owned();
    let (writer_status, writer_stderr) = match written {
        Ok(out) => (
            Some(out.status),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ),
        Err(e) => (None, format!("waiting for {}: {e}", first.0)),
    };
    if outcome.timed_out {
        return Err(failure(None, killed_after(limit, &stderr), stdout));
    }
    let both = |own: String| {
        if writer_stderr.is_empty() {
            own
        } else {
            format!("{own}; {}: {writer_stderr}", first.0)
        }
    };
    match outcome.status {
        Some(Ok(s)) if !s.success() => return Err(failure(s.code(), both(stderr), stdout)),
        Some(Err(e)) => {
            return Err(failure(
                None,
                format!("waiting for {}: {e}", second.0),
                stdout,
            ))
        }
        None => return Err(failure(None, format!("lost track of {}", second.0), stdout)),
        Some(Ok(_)) => {}
    }
    match writer_status {
        Some(s) if s.success() => Ok(stdout),
        Some(s) => Err(failure(s.code(), writer_stderr, stdout)),
        None => Err(failure(None, writer_stderr, stdout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_carries_the_first_programs_output_and_names_a_failure() {
        let out = run_piped(("printf", &["a\\nb\\n"]), ("wc", &["-l"])).unwrap();
        assert_eq!(out.trim(), "2");
        let e = run_piped(("sh", &["-c", "echo nope >&2; exit 3"]), ("cat", &[])).unwrap_err();
        assert_eq!(e.status, Some(3));
        assert!(e.stderr.contains("nope"), "{e}");
        let e = run_piped(
            ("echo", &["x"]),
            ("sh", &["-c", "cat >/dev/null; echo bad >&2; exit 4"]),
        )
        .unwrap_err();
        assert_eq!(e.status, Some(4));
        assert!(e.stderr.contains("bad"), "{e}");
    }

    #[test]
    fn children_get_a_cleared_environment() {
        // The test runner's own environment (HOME, PATH, CARGO_*) is what must not leak.
        assert!(std::env::vars_os().count() > 2);
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
    fn both_pipes_are_read_in_full_whatever_their_order() {
        // More than a pipe holds on each, the larger on stderr: a reader that finished one
        // pipe before starting the other would wait forever.
        let e = run(
            "sh",
            [
                "-c",
                "head -c 200000 /dev/zero | tr '\\0' o; head -c 300000 /dev/zero | tr '\\0' e >&2; exit 1",
            ],
        )
        .unwrap_err();
        assert_eq!(e.status, Some(1));
        assert_eq!(e.stdout.len(), 200_000);
        assert!(e.stdout.bytes().all(|b| b == b'o'));
        assert_eq!(e.stderr.len(), 300_000);
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
