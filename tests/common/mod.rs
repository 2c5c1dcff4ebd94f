//! The harness every end-to-end test uses: a private pool, image directory, state directory
//! and root-owned config, removed again when the test ends (also when it fails), and a way to
//! run the real binary as a daemon would: spawn it, write the JSON request, read event lines.
#![allow(dead_code)]

pub mod backend;
pub mod guest;
pub mod schema;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use reimage_fixtures::manifest::{self, Manifest};
use serde_json::{json, Value};

pub use backend::{Backend, Snapshot, Storage, View};

pub const BIN: &str = env!("CARGO_BIN_EXE_reimage");
/// Every request the suites run is confined in kill mode: a system call of an unpack thread
/// outside the allow-list kills reimage (SIGSYS), so every test that unpacks checks the
/// list is complete for what it exercises (see `src/confine.rs`).
pub const SECCOMP: (&str, &str) = ("REIMAGE_SECCOMP", "kill");

/// Whether a command succeeds (its output is not kept).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().unwrap().status.success()
}

/// Runs a command the test needs to succeed; returns its stdout.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One test's world. Dropping it removes the pool (unmounting what it mounted, detaching its
/// loop devices) and every file it made.
pub struct Env {
    pub dir: PathBuf,
    pub conf_dir: PathBuf,
    pub config: PathBuf,
    /// The pool's directory (path-based backends), or an empty directory beside the pool.
    pub pool: PathBuf,
    pub images: PathBuf,
    pub state: PathBuf,
    pub backend: Backend,
    /// Taken out first when dropped: the pool goes before the files it lives in.
    storage: Option<Box<dyn Storage>>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Env {
    pub fn new(name: &str) -> Env {
        Env::with_backend(name, Backend::Dir)
    }

    pub fn with_backend(name: &str, backend: Backend) -> Env {
        let id = format!(
            "{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // The guest tier points this at a scratch ext4 (its overlay's tmpfs lacks xattrs).
        let base = std::env::var_os("REIMAGE_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
        let dir = base.join("reimage-tests").join(&id);
        // The config must sit in root-owned, non-writable directories all the way up; /run is
        // such a place on every Debian machine, whatever the checkout's location.
        let conf_dir = PathBuf::from("/run/reimage-tests").join(&id);
        let _ = std::fs::remove_dir_all(&dir);
        for d in [&dir, &conf_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        let storage = backend.make(&dir, &id);
        let pool = storage.volume_dir().unwrap_or_else(|| dir.join("pool"));
        std::fs::create_dir_all(&pool).unwrap();
        let env = Env {
            pool,
            images: dir.join("images"),
            state: dir.join("state"),
            config: conf_dir.join("config.toml"),
            dir,
            conf_dir,
            backend,
            storage: Some(storage),
        };
        std::fs::create_dir_all(&env.images).unwrap();
        env.write_config(&env.default_config());
        env
    }

    /// The pool's backend, for what the suites ask of it.
    pub fn storage(&self) -> &dyn Storage {
        self.storage
            .as_deref()
            .expect("the pool exists until the env is dropped")
    }

    pub fn default_config(&self) -> String {
        format!(
            "state_dir = {:?}\n[images]\nallow = [{}]\n[pools.default]\ndriver = {:?}\n{}",
            self.state,
            self.allow(),
            self.storage().driver(),
            self.storage().pool_config()
        )
    }

    /// `images.allow`: the env's image directory, and in the guest the host-made fixtures.
    fn allow(&self) -> String {
        let mut dirs = vec![format!("{:?}", self.images)];
        if let Some(dir) = std::env::var_os(guest::FIXTURES_VAR) {
            dirs.push(format!("{:?}", PathBuf::from(dir)));
        }
        dirs.join(", ")
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    /// Limits a dir pool to a tmpfs of `size` (for full-pool tests); undone on drop.
    pub fn small_pool(&mut self, size: &str) {
        if let Some(storage) = self.storage.as_mut() {
            storage.limit(size);
        }
    }

    /// Runs `reimage DRIVER` with `request` on stdin (as a JSON value or raw text).
    pub fn run_with(&self, args: &[&str], stdin: &[u8]) -> Run {
        let started = std::time::Instant::now();
        let mut child = Command::new(BIN)
            .env(SECCOMP.0, SECCOMP.1)
            .args(["--config"])
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // reimage may reject the run (bad argv or config) before it reads stdin.
        match child.stdin.take().unwrap().write_all(stdin) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            other => other.unwrap(),
        }
        let out = child.wait_with_output().unwrap();
        trace(started, stdin, &out.stdout);
        let run = Run::from_output(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr);
        if run.status == 0 {
            if let Ok(request) = serde_json::from_slice::<Value>(stdin) {
                schema::check_request(&request);
            }
        }
        run
    }

    /// `reimage DRIVER` with this env's config, ready to take a request on stdin.
    fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env(SECCOMP.0, SECCOMP.1)
            .arg("--config")
            .arg(&self.config)
            .arg(self.storage().driver())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs `cmd` with `request` on its stdin.
    fn finish(mut cmd: Command, request: &Value) -> Run {
        let mut child = cmd.spawn().unwrap();
        let _ = child
            .stdin
            .take()
            .unwrap()
            .write_all(request.to_string().as_bytes());
        let out = child.wait_with_output().unwrap();
        let run = Run::from_output(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr);
        if run.status == 0 {
            schema::check_request(request);
        }
        run
    }

    /// Runs `reimage DRIVER` under `wrapper`, a command that ends by running the arguments
    /// it is given (`unshare -m sh -c '...; exec "$@"' ARG0`), with `request` on stdin.
    pub fn run_under(&self, wrapper: &[&str], driver: &str, request: &Value) -> Run {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..])
            .env(SECCOMP.0, SECCOMP.1)
            .arg(BIN)
            .arg("--config")
            .arg(&self.config)
            .arg(driver)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Self::finish(cmd, request)
    }

    /// Runs a request with extra environment variables (fault injection).
    pub fn run_env(&self, request: &Value, vars: &[(&str, &str)]) -> Run {
        let mut cmd = self.command();
        cmd.envs(vars.iter().copied());
        Self::finish(cmd, request)
    }

    /// Runs a request with the open-file limit (soft and hard) at `nofile`.
    pub fn run_limited(&self, request: &Value, nofile: u64) -> Run {
        use std::os::unix::process::CommandExt;
        let mut cmd = self.command();
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Self::finish(cmd, request)
    }

    pub fn run(&self, request: &Value) -> Run {
        self.run_with(&[self.storage().driver()], request.to_string().as_bytes())
    }

    /// Starts a request and returns the child with a line reader on its stdout.
    pub fn spawn(&self, request: &Value) -> Spawned {
        let mut child = self.command().spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.to_string().as_bytes())
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Spawned {
            child,
            stdout,
            seen: Vec::new(),
        }
    }

    pub fn image(&self, name: &str) -> PathBuf {
        self.images.join(name)
    }

    /// The path of a volume of a path-based pool (dir, btrfs).
    pub fn volume(&self, name: &str) -> PathBuf {
        self.storage()
            .volume_dir()
            .expect("zfs and lvm volumes have no path; use view()")
            .join(name)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.storage().exists(name)
    }

    /// A fresh directory in the env for a mount.
    fn mount_point(&self, what: &str) -> PathBuf {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("view-{what}-{n}"))
    }

    /// The volume's directory for as long as the view lives.
    pub fn view(&self, name: &str) -> View {
        self.storage().view(name, self.mount_point(name))
    }

    pub fn manifest_of(&self, name: &str) -> Manifest {
        let view = self.view(name);
        manifest::manifest(&view.path).unwrap()
    }

    /// Takes a read-only snapshot of `volume` named `name`, the backend's own way.
    pub fn take_snapshot(&self, volume: &str, name: &str) -> Snapshot {
        self.storage().take_snapshot(volume, name)
    }

    /// The snapshot's content, or `None` when it no longer exists.
    pub fn snapshot_manifest(&self, snap: &Snapshot) -> Option<Manifest> {
        let view = self
            .storage()
            .snapshot_view(snap, self.mount_point("snapshot"))?;
        Some(manifest::manifest(&view.path).unwrap())
    }

    pub fn drop_snapshot(&self, snap: Snapshot) {
        self.storage().drop_snapshot(snap)
    }

    /// Fills the pool's storage until about `left` bytes are free, with real allocations;
    /// undone by [`Env::unfill`].
    pub fn fill_pool_leaving(&self, left: u64) {
        self.storage().fill_leaving(left)
    }

    pub fn unfill(&self) {
        self.storage().unfill()
    }

    /// Manifest of the whole pool and of the state directory's journal: "nothing changed"
    /// means both are equal before and after.
    pub fn snapshot(&self) -> (Manifest, Vec<String>) {
        let mut journal = Vec::new();
        if let Ok(pools) = std::fs::read_dir(self.state.join("journal")) {
            for pool in pools.flatten() {
                for rec in std::fs::read_dir(pool.path()).unwrap().flatten() {
                    journal.push(rec.path().display().to_string());
                }
            }
        }
        let mut pool = manifest::manifest(&self.pool).unwrap();
        // The pool directory's own times are left out: a first fill from an image unpacks it
        // beside the old volume while measuring it, so a refused one has created and removed
        // its temporary slot there.
        if let Some(root) = pool.get_mut(".") {
            root.mtime = (0, 0);
        }
        (pool, journal)
    }

    /// Temporary volumes left in the pool (and guard snapshots and mounts).
    pub fn leftovers(&self) -> Vec<String> {
        self.storage().leftovers()
    }

    pub fn create_from(&self, volume: &str, image: &Path) -> Run {
        self.run(
            &json!({"api": 1, "op": "create", "pool": "default", "volume": volume,
                         "source": {"image": image}}),
        )
    }

    pub fn rebuild_from(&self, volume: &str, image: &Path) -> Run {
        self.run(
            &json!({"api": 1, "op": "rebuild", "pool": "default", "volume": volume,
                         "source": {"image": image}}),
        )
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        drop(self.storage.take());
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.conf_dir);
        // The shared parents go when the last test using them is done.
        if let Some(parent) = self.conf_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// With `REIMAGE_TEST_TRACE` set: each run's request, wall time and the result's timings,
/// on stderr (for finding where a slow test spends its time).
fn trace(started: std::time::Instant, stdin: &[u8], stdout: &[u8]) {
    if std::env::var_os("REIMAGE_TEST_TRACE").is_none() {
        return;
    }
    let last = String::from_utf8_lossy(stdout);
    let last = last.lines().last().unwrap_or("");
    let timings = serde_json::from_str::<Value>(last)
        .ok()
        .map(|v| v["timings_ms"].to_string())
        .unwrap_or_default();
    eprintln!(
        "TRACE {:>6} ms {} -> {timings}",
        started.elapsed().as_millis(),
        String::from_utf8_lossy(stdin)
            .chars()
            .take(90)
            .collect::<String>()
    );
}

/// What one run printed and returned.
#[derive(Debug)]
pub struct Run {
    pub status: i32,
    pub events: Vec<Value>,
    pub stderr: String,
}

impl Run {
    fn from_output(status: i32, stdout: &[u8], stderr: &[u8]) -> Run {
        let text = String::from_utf8_lossy(stdout);
        let events = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l)
                    .unwrap_or_else(|e| panic!("not JSON on stdout: {l:?}: {e}"))
            })
            .collect::<Vec<_>>();
        for e in &events {
            assert!(e["event"].is_string(), "every line has an event key: {e}");
        }
        schema::check_events(&events);
        Run {
            status,
            events,
            stderr: String::from_utf8_lossy(stderr).into_owned(),
        }
    }

    pub fn last(&self) -> &Value {
        self.events
            .last()
            .unwrap_or_else(|| panic!("no events; stderr: {}", self.stderr))
    }

    /// The result event; fails the test with the error if there is none.
    pub fn ok(&self) -> &Value {
        let last = self.last();
        assert_eq!(
            last["event"], "result",
            "expected success, got {last}\nstderr: {}",
            self.stderr
        );
        assert_eq!(self.status, 0);
        last
    }

    /// Asserts failure with `code` and exit `status`; returns the error event.
    pub fn failed(&self, code: &str, status: i32) -> &Value {
        let last = self.last();
        assert_eq!(
            last["event"], "error",
            "expected {code}, got {last}\nstderr: {}",
            self.stderr
        );
        assert_eq!(last["code"], code, "{last}");
        assert_eq!(self.status, status, "{last}");
        last
    }

    pub fn warnings(&self) -> Vec<&str> {
        self.events
            .iter()
            .filter(|e| e["event"] == "warning")
            .filter_map(|e| e["code"].as_str())
            .collect()
    }
}

pub struct Spawned {
    pub child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    pub seen: Vec<Value>,
}

impl Spawned {
    /// Reads events until one satisfies `until`; returns it (None at end of stream).
    pub fn wait_for(&mut self, until: impl Fn(&Value) -> bool) -> Option<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line).unwrap() == 0 {
                return None;
            }
            let v: Value = serde_json::from_str(line.trim()).unwrap();
            self.seen.push(v.clone());
            if until(&v) {
                return Some(v);
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::from_named_raw(sig).unwrap())
            .unwrap();
    }

    /// Waits for the end; returns the exit code (None when killed) and the remaining events.
    pub fn finish(mut self) -> (Option<i32>, Vec<Value>) {
        self.wait_for(|_| false);
        schema::check_events(&self.seen);
        let status = self.child.wait().unwrap();
        (status.code(), self.seen)
    }
}

/// Builds the rich tree with `seed` and packs it with GNU tar into the env's image directory.
pub fn rich_image(
    env: &Env,
    name: &str,
    seed: u64,
    format: reimage_fixtures::TarFormat,
    compression: reimage_fixtures::Compression,
) -> PathBuf {
    // In the guest, made on the host beforehand where it is one of the common ones.
    if let Some(dir) = std::env::var_os(guest::FIXTURES_VAR) {
        let made = PathBuf::from(dir).join(guest::rich_name(name, seed, format, compression));
        if made.exists() {
            return made;
        }
    }
    let src = env.dir.join(format!("src-{name}"));
    std::fs::create_dir_all(&src).unwrap();
    reimage_fixtures::tree::rich(&src, seed).unwrap();
    let out = env.image(name);
    reimage_fixtures::gnu_tar(&src, &out, format, compression).unwrap();
    out
}

/// An uncompressed image of `files` incompressible 4 MiB files (`name`), one that takes a
/// while to unpack: for killing a request mid-unpack.
pub fn bulky_image(env: &Env, name: &str, files: usize) -> PathBuf {
    // In the guest, made on the host beforehand (writing 256 MiB of noise under emulation
    // takes a minute); see guest::run_cases.
    if let Some(dir) = std::env::var_os(guest::FIXTURES_VAR) {
        let made = PathBuf::from(dir).join(guest::bulky_name(files));
        if made.exists() {
            return made;
        }
    }
    let src = env.dir.join(format!("src-{name}"));
    reimage_fixtures::tree::bulky(&src, files, 4 << 20).unwrap();
    let image = gnu_image(env, &src, name, reimage_fixtures::Compression::None);
    std::fs::remove_dir_all(&src).unwrap();
    image
}

/// The image `name` that GNU tar (GNU format, `compression`) makes of the tree at `src`.
pub fn gnu_image(
    env: &Env,
    src: &Path,
    name: &str,
    compression: reimage_fixtures::Compression,
) -> PathBuf {
    let image = env.image(name);
    reimage_fixtures::gnu_tar(src, &image, reimage_fixtures::TarFormat::Gnu, compression).unwrap();
    image
}

/// GNU tar's extraction of `image` into a fresh directory, as a manifest.
pub fn gnu_manifest(env: &Env, image: &Path) -> Manifest {
    let dest = env.dir.join(format!(
        "gnu-{}",
        image.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest).unwrap();
    reimage_fixtures::gnu_extract(image, &dest).unwrap();
    manifest::manifest(&dest).unwrap()
}

/// unsquashfs' own extraction of `image`, as a manifest.
pub fn unsquashfs_manifest(env: &Env, image: &Path) -> Manifest {
    let dest = env.dir.join(format!(
        "unsquashfs-{}",
        image.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&dest);
    let status = std::process::Command::new("unsquashfs")
        .args(["-q", "-n", "-d"])
        .arg(&dest)
        .arg(image)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "unsquashfs {}", image.display());
    manifest::manifest(&dest).unwrap()
}

/// Asserts two manifests match, printing every difference.
pub fn assert_same(expected: &Manifest, actual: &Manifest, ignore: &manifest::Ignore) {
    let d = manifest::diff(expected, actual, ignore);
    assert!(d.is_empty(), "{} differences:\n{}", d.len(), d.join("\n"));
}
