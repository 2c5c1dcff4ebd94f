//! The harness every end-to-end test uses: a private pool, image directory, state directory
//! and root-owned config, removed again when the test ends (also when it fails), and a way to
//! run the real binary as a daemon would: spawn it, write the JSON request, read event lines.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use reimage_fixtures::manifest::{self, Manifest};
use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_reimage");

/// The storage a test's pool lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A directory on the test machine's own filesystem.
    Dir,
    /// A btrfs filesystem on a loop device made for the test, with or without quotas.
    Btrfs { quota: bool },
}

impl Backend {
    pub fn driver(self) -> &'static str {
        match self {
            Backend::Dir => "dir",
            Backend::Btrfs { .. } => "btrfs",
        }
    }
}

/// One test's world. Dropping it unmounts what it mounted, detaches its loop devices and
/// removes every file it made.
pub struct Env {
    pub dir: PathBuf,
    pub conf_dir: PathBuf,
    pub config: PathBuf,
    pub pool: PathBuf,
    pub images: PathBuf,
    pub state: PathBuf,
    pub backend: Backend,
    /// Where the backend's filesystem is mounted (btrfs), for snapshots outside the pool.
    pub mount: Option<PathBuf>,
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
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
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("reimage-tests")
            .join(&id);
        // The config must sit in root-owned, non-writable directories all the way up; /run is
        // such a place on every Debian machine, whatever the checkout's location.
        let conf_dir = PathBuf::from("/run/reimage-tests").join(&id);
        let _ = std::fs::remove_dir_all(&dir);
        for d in [&dir, &conf_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mut env = Env {
            pool: dir.join("pool"),
            images: dir.join("images"),
            state: dir.join("state"),
            config: conf_dir.join("config.toml"),
            dir,
            conf_dir,
            backend,
            mount: None,
            mounts: Vec::new(),
            loops: Vec::new(),
        };
        std::fs::create_dir_all(&env.images).unwrap();
        if let Backend::Btrfs { .. } = backend {
            env.btrfs_pool();
        }
        std::fs::create_dir_all(&env.pool).unwrap();
        env.write_config(&env.default_config());
        env
    }

    /// A 1 GiB btrfs on a loop device, mounted at `dir/mnt`, the pool at `mnt/pool`.
    fn btrfs_pool(&mut self) {
        let image = self.dir.join("btrfs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        self.loops.push(device.clone());
        let ok = Command::new("mkfs.btrfs")
            .args(["-q", "-f", &device])
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "mkfs.btrfs: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let mount = self.dir.join("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        let ok = Command::new("mount")
            .arg(&device)
            .arg(&mount)
            .status()
            .unwrap();
        assert!(ok.success(), "mount btrfs");
        self.mounts.push(mount.clone());
        self.pool = mount.join("pool");
        self.mount = Some(mount);
    }

    pub fn default_config(&self) -> String {
        let quota = match self.backend {
            Backend::Btrfs { quota: true } => "quota = true\n",
            _ => "",
        };
        format!(
            "state_dir = {:?}\n[images]\nallow = [{:?}]\n[pools.default]\ndriver = \"{}\"\npath = {:?}\n{quota}",
            self.state,
            self.images,
            self.backend.driver(),
            self.pool
        )
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    /// Mounts a tmpfs of `size` on the pool (for full-pool tests); unmounted on drop.
    pub fn small_pool(&mut self, size: &str) {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "reimage-test"])
            .arg(&self.pool)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs pool failed");
        self.mounts.push(self.pool.clone());
    }

    /// Runs `reimage DRIVER` with `request` on stdin (as a JSON value or raw text).
    pub fn run_with(&self, args: &[&str], stdin: &[u8]) -> Run {
        let mut child = Command::new(BIN)
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
        Run::from_output(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr)
    }

    /// Runs a request with extra environment variables (fault injection).
    pub fn run_env(&self, request: &Value, vars: &[(&str, &str)]) -> Run {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .arg(self.backend.driver())
            .envs(vars.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child
            .stdin
            .take()
            .unwrap()
            .write_all(request.to_string().as_bytes());
        let out = child.wait_with_output().unwrap();
        Run::from_output(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr)
    }

    pub fn run(&self, request: &Value) -> Run {
        self.run_with(&[self.backend.driver()], request.to_string().as_bytes())
    }

    /// Starts a request and returns the child with a line reader on its stdout.
    pub fn spawn(&self, request: &Value) -> Spawned {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .arg(self.backend.driver())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
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

    pub fn volume(&self, name: &str) -> PathBuf {
        self.pool.join(name)
    }

    pub fn manifest_of(&self, name: &str) -> Manifest {
        manifest::manifest(&self.volume(name)).unwrap()
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
        (manifest::manifest(&self.pool).unwrap(), journal)
    }

    /// Temporary volumes left in the pool.
    pub fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(&self.pool)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".reimage"))
            .collect()
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
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg(&m).status();
        }
        for device in self.loops.drain(..) {
            let _ = Command::new("losetup").arg("-d").arg(&device).status();
        }
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
    let src = env.dir.join(format!("src-{name}"));
    reimage_fixtures::tree::bulky(&src, files, 4 << 20).unwrap();
    let image = env.image(name);
    reimage_fixtures::gnu_tar(
        &src,
        &image,
        reimage_fixtures::TarFormat::Gnu,
        reimage_fixtures::Compression::None,
    )
    .unwrap();
    std::fs::remove_dir_all(&src).unwrap();
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

/// Asserts two manifests match, printing every difference.
pub fn assert_same(expected: &Manifest, actual: &Manifest, ignore: &manifest::Ignore) {
    let d = manifest::diff(expected, actual, ignore);
    assert!(d.is_empty(), "{} differences:\n{}", d.len(), d.join("\n"));
}
