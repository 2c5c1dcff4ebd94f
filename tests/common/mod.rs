//! The harness every end-to-end test uses: a private pool, image directory, state directory
//! and root-owned config, removed again when the test ends (also when it fails), and a way to
//! run the real binary as a daemon would: spawn it, write the JSON request, read event lines.
#![allow(dead_code)]

pub mod guest;

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
    /// A zpool on a loop device made for the test (inside the QEMU guest), volumes under
    /// its dataset `reimage`, limited by `refquota` or (`quota: true`) by `quota`.
    Zfs { quota: bool },
    /// A volume group on a loop device (inside the QEMU guest), thick or with a thin pool,
    /// volumes holding ext4 or (`xfs: true`) xfs.
    Lvm { thin: bool, xfs: bool },
    /// A dir pool on ext4 or (`xfs: true`) xfs with project quotas, on a loop device
    /// (inside the QEMU guest: the host kernel has no quota support).
    DirQuota { xfs: bool },
}

impl Backend {
    pub fn driver(self) -> &'static str {
        match self {
            Backend::Dir => "dir",
            Backend::Btrfs { .. } => "btrfs",
            Backend::Zfs { .. } => "zfs",
            Backend::Lvm { .. } => "lvm",
            Backend::DirQuota { .. } => "dir",
        }
    }

    /// Whether volumes are directories at a path on the host (dir, btrfs), rather than
    /// datasets or block devices mounted only while reimage fills them.
    pub fn path_based(self) -> bool {
        !matches!(self, Backend::Zfs { .. } | Backend::Lvm { .. })
    }
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

/// A snapshot the test took of a volume, the backend's own way.
pub enum Snapshot {
    /// A read-only btrfs snapshot at this path, outside the pool.
    Path(PathBuf),
    /// An LVM snapshot `VG/LV`.
    Lvm(String),
    /// A zfs snapshot `DATASET@NAME`.
    Zfs(String),
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
    /// The zpool (zfs) and the dataset that holds the volumes.
    pub zpool: Option<String>,
    /// The volume group (lvm).
    pub vg: Option<String>,
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
        let mut env = Env {
            pool: dir.join("pool"),
            images: dir.join("images"),
            state: dir.join("state"),
            config: conf_dir.join("config.toml"),
            dir,
            conf_dir,
            backend,
            mount: None,
            zpool: None,
            vg: None,
            mounts: Vec::new(),
            loops: Vec::new(),
        };
        std::fs::create_dir_all(&env.images).unwrap();
        match backend {
            Backend::Btrfs { .. } => env.btrfs_pool(),
            Backend::Zfs { .. } => env.zfs_pool(&id),
            Backend::Lvm { thin, .. } => env.lvm_pool(&id, thin),
            Backend::DirQuota { xfs } => env.quota_pool(xfs),
            Backend::Dir => {}
        }
        std::fs::create_dir_all(&env.pool).unwrap();
        env.write_config(&env.default_config());
        env
    }

    /// A sparse file of 1 GiB on a new loop device.
    fn loop_device(&mut self, name: &str) -> String {
        self.loop_device_of(name, 1 << 30)
    }

    fn loop_device_of(&mut self, name: &str, bytes: u64) -> String {
        let image = self.dir.join(name);
        std::fs::File::create(&image)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        let device = sh(Command::new("losetup").args(["-f", "--show"]).arg(&image))
            .trim()
            .to_owned();
        self.loops.push(device.clone());
        device
    }

    /// A 1 GiB zpool on a loop device (a file vdev would need O_DIRECT, which the guest's
    /// tmpfs lacks), with the dataset `reimage` for the volumes.
    fn zfs_pool(&mut self, id: &str) {
        let device = self.loop_device("zfs.img");
        let name: String = format!("rt{}", id.replace(['-', '.'], "x"))
            .chars()
            .take(60)
            .collect();
        sh(Command::new("zpool")
            .args(["create", "-f", "-m", "none", &name])
            .arg(&device));
        self.zpool = Some(name.clone());
        sh(Command::new("zfs").args(["create", &format!("{name}/reimage")]));
    }

    /// A volume group on a 2 GiB loop device; with `thin`, a 768 MiB thin pool `pool`.
    fn lvm_pool(&mut self, id: &str, thin: bool) {
        let device = self.loop_device_of("lvm.img", 2 << 30);
        let vg: String = format!("rt{}", id.replace(['-', '.'], "x"))
            .chars()
            .take(60)
            .collect();
        sh(Command::new("vgcreate").args(["-q", &vg]).arg(&device));
        self.vg = Some(vg.clone());
        if thin {
            sh(Command::new("lvcreate").args([
                "-q",
                "--type",
                "thin-pool",
                "-L",
                "768M",
                "-n",
                "pool",
                &vg,
            ]));
        }
    }

    /// A 1 GiB ext4 (with the project feature) or xfs on a loop device, mounted with
    /// `prjquota` at `dir/mnt`, the pool at `mnt/pool`.
    fn quota_pool(&mut self, xfs: bool) {
        let device = self.loop_device("quota.img");
        if xfs {
            sh(Command::new("mkfs.xfs").args(["-q", "-f", &device]));
        } else {
            sh(Command::new("mkfs.ext4").args([
                "-q",
                "-F",
                "-O",
                "quota,project",
                "-I",
                "256",
                &device,
            ]));
        }
        let mount = self.dir.join("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        sh(Command::new("mount")
            .args(["-o", "prjquota", &device])
            .arg(&mount));
        self.mounts.push(mount.clone());
        self.pool = mount.join("pool");
        self.mount = Some(mount);
    }

    /// The LV name of a volume (as the lvm driver escapes it).
    fn lv(&self, volume: &str) -> String {
        format!(
            "{}/v+{}",
            self.vg.as_deref().expect("an lvm pool"),
            volume.replace('_', "+")
        )
    }

    /// The device of an LV (`VG/LV`), activated first if it is not (thin snapshots are
    /// created inactive).
    fn lv_device(&self, lv: &str) -> String {
        let report =
            sh(Command::new("lvs").args(["--noheadings", "-o", "lv_active,lv_dm_path", lv]));
        let fields: Vec<&str> = report.split_whitespace().collect();
        if fields.first() != Some(&"active") {
            sh(Command::new("lvchange").args(["-q", "-ay", "-K", lv]));
        }
        fields.last().copied().unwrap_or_default().to_owned()
    }

    /// The dataset that holds the volumes (zfs).
    pub fn dataset(&self) -> String {
        format!("{}/reimage", self.zpool.as_deref().expect("a zfs pool"))
    }

    /// A 1 GiB btrfs on a loop device, mounted at `dir/mnt`, the pool at `mnt/pool`.
    fn btrfs_pool(&mut self) {
        let device = self.loop_device("btrfs.img");
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
        if let Backend::Lvm { thin, xfs } = self.backend {
            let fs = if xfs { "xfs" } else { "ext4" };
            let thin = if thin { "thin_pool = \"pool\"\n" } else { "" };
            return format!(
                "state_dir = {:?}\n[images]\nallow = [{}]\n[pools.default]\ndriver = \"lvm\"\nvg = {:?}\n{thin}fs = {fs:?}\nmount_dir = {:?}\n",
                self.state,
                self.allow(),
                self.vg.as_deref().unwrap(),
                self.dir.join("fill")
            );
        }
        if let Backend::Zfs { quota } = self.backend {
            let property = if quota { "quota" } else { "refquota" };
            return format!(
                "state_dir = {:?}\n[images]\nallow = [{}]\n[pools.default]\ndriver = \"zfs\"\ndataset = {:?}\nquota_property = {property:?}\n",
                self.state,
                self.allow(),
                self.dataset()
            );
        }
        let quota = match self.backend {
            Backend::Btrfs { quota: true } | Backend::DirQuota { .. } => "quota = true\n",
            _ => "",
        };
        format!(
            "state_dir = {:?}\n[images]\nallow = [{}]\n[pools.default]\ndriver = \"{}\"\npath = {:?}\n{quota}",
            self.state,
            self.allow(),
            self.backend.driver(),
            self.pool
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
        let started = std::time::Instant::now();
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
        trace(started, stdin, &out.stdout);
        Run::from_output(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr)
    }

    /// `reimage DRIVER` with this env's config, ready to take a request on stdin.
    fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&self.config)
            .arg(self.backend.driver())
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
        Run::from_output(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr)
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
        self.run_with(&[self.backend.driver()], request.to_string().as_bytes())
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
        assert!(
            self.zpool.is_none() && self.vg.is_none(),
            "zfs and lvm volumes have no path; use view()"
        );
        self.pool.join(name)
    }

    pub fn exists(&self, name: &str) -> bool {
        let succeeds = |cmd: &mut Command| cmd.output().unwrap().status.success();
        if self.zpool.is_some() {
            succeeds(Command::new("zfs").args([
                "list",
                "-H",
                &format!("{}/{name}", self.dataset()),
            ]))
        } else if self.vg.is_some() {
            succeeds(Command::new("lvs").arg(self.lv(name)))
        } else {
            self.volume(name).exists()
        }
    }

    /// The volume's directory for as long as the view lives: its path in a path-based
    /// pool, or the dataset mounted (by the test, outside reimage) for zfs.
    pub fn view(&self, name: &str) -> View {
        if self.vg.is_some() {
            let device = self.lv_device(&self.lv(name));
            return View::mount_device(self, &device, name);
        }
        match &self.zpool {
            Some(_) => View::mount(self, &format!("{}/{name}", self.dataset()), name),
            None => View {
                path: self.volume(name),
                mounted: false,
            },
        }
    }

    pub fn manifest_of(&self, name: &str) -> Manifest {
        let view = self.view(name);
        manifest::manifest(&view.path).unwrap()
    }

    /// Takes a read-only snapshot of `volume` named `name`, the backend's own way.
    pub fn take_snapshot(&self, volume: &str, name: &str) -> Snapshot {
        match self.backend {
            Backend::Zfs { .. } => {
                let snap = format!("{}/{volume}@{name}", self.dataset());
                sh(Command::new("zfs").args(["snapshot", &snap]));
                Snapshot::Zfs(snap)
            }
            Backend::Lvm { thin, .. } => {
                let mut cmd = Command::new("lvcreate");
                cmd.args(["-q", "-s", "-n", name]);
                if !thin {
                    cmd.args(["-L", "64M"]);
                }
                sh(cmd.arg(self.lv(volume)));
                Snapshot::Lvm(format!("{}/{name}", self.vg.as_deref().unwrap()))
            }
            _ => {
                let mount = self.mount.clone().expect("a filesystem with snapshots");
                let dest = mount.join(name);
                sh(Command::new("btrfs")
                    .args(["subvolume", "snapshot", "-r"])
                    .arg(self.volume(volume))
                    .arg(&dest));
                Snapshot::Path(dest)
            }
        }
    }

    /// The snapshot's content, or `None` when it no longer exists.
    pub fn snapshot_manifest(&self, snap: &Snapshot) -> Option<Manifest> {
        match snap {
            Snapshot::Path(p) => p.exists().then(|| manifest::manifest(p).unwrap()),
            Snapshot::Lvm(lv) => {
                let exists = Command::new("lvs")
                    .arg(lv)
                    .output()
                    .unwrap()
                    .status
                    .success();
                exists.then(|| {
                    let device = self.lv_device(lv);
                    let view = View::mount_device(self, &device, "snapshot");
                    manifest::manifest(&view.path).unwrap()
                })
            }
            Snapshot::Zfs(name) => {
                let exists = Command::new("zfs")
                    .args(["list", "-H", name])
                    .output()
                    .unwrap()
                    .status
                    .success();
                exists.then(|| {
                    let view = View::mount(self, name, "snapshot");
                    manifest::manifest(&view.path).unwrap()
                })
            }
        }
    }

    pub fn drop_snapshot(&self, snap: Snapshot) {
        match snap {
            Snapshot::Path(p) => {
                sh(Command::new("btrfs").args(["subvolume", "delete"]).arg(p));
            }
            Snapshot::Zfs(name) => {
                sh(Command::new("zfs").args(["destroy", &name]));
            }
            Snapshot::Lvm(lv) => {
                sh(Command::new("lvremove").args(["-q", "-y", &lv]));
            }
        }
    }

    /// Fills the pool's storage until about `left` bytes are free, with real allocations
    /// (fallocate; a zfs reservation); undone by [`Env::unfill`].
    pub fn fill_pool_leaving(&self, left: u64) {
        match self.backend {
            Backend::Lvm { thin, .. } => {
                let vg = self.vg.as_deref().unwrap();
                if thin {
                    // Thin pools allocate only what is written: write it.
                    let report = sh(Command::new("lvs").args([
                        "--noheadings",
                        "--units",
                        "b",
                        "--nosuffix",
                        "-o",
                        "lv_size,data_percent",
                        &format!("{vg}/pool"),
                    ]));
                    let mut f = report.split_whitespace();
                    let size: f64 = f.next().unwrap().parse().unwrap();
                    let used: f64 = f.next().unwrap().parse().unwrap();
                    let free = (size * (1.0 - used / 100.0)) as u64;
                    let fill = (free - left) >> 20;
                    sh(Command::new("lvcreate").args([
                        "-q",
                        "-V",
                        &format!("{}M", fill + 64),
                        "--thin",
                        "-n",
                        "filler",
                        &format!("{vg}/pool"),
                    ]));
                    let device = self.lv_device(&format!("{vg}/filler"));
                    sh(Command::new("dd").args([
                        "if=/dev/zero",
                        &format!("of={device}"),
                        "bs=1M",
                        &format!("count={fill}"),
                        "oflag=direct",
                        "status=none",
                    ]));
                } else {
                    let report = sh(Command::new("vgs").args([
                        "--noheadings",
                        "--units",
                        "b",
                        "--nosuffix",
                        "-o",
                        "vg_free,vg_extent_size",
                        vg,
                    ]));
                    let mut f = report.split_whitespace();
                    let free: u64 = f.next().unwrap().parse().unwrap();
                    let extent: u64 = f.next().unwrap().parse().unwrap();
                    let extents = (free - left) / extent;
                    sh(Command::new("lvcreate").args([
                        "-q",
                        "-l",
                        &extents.to_string(),
                        "-n",
                        "filler",
                        vg,
                    ]));
                }
            }
            Backend::Zfs { .. } => {
                let available: u64 = sh(Command::new("zfs").args([
                    "get",
                    "-H",
                    "-p",
                    "-o",
                    "value",
                    "available",
                    &self.dataset(),
                ]))
                .trim()
                .parse()
                .unwrap();
                sh(Command::new("zfs").args([
                    "create",
                    "-o",
                    &format!("refreservation={}", available - left),
                    &format!("{}/filler", self.zpool.as_deref().unwrap()),
                ]));
            }
            _ => {
                let st = rustix::fs::statvfs(&self.pool).unwrap();
                let free = st.f_bavail * st.f_frsize;
                sh(Command::new("fallocate")
                    .arg("-l")
                    .arg((free - left).to_string())
                    .arg(self.filler()));
            }
        }
    }

    pub fn unfill(&self) {
        match self.backend {
            Backend::Lvm { .. } => {
                sh(Command::new("lvremove").args([
                    "-q",
                    "-y",
                    &format!("{}/filler", self.vg.as_deref().unwrap()),
                ]));
            }
            Backend::Zfs { .. } => {
                sh(Command::new("zfs").args([
                    "destroy",
                    &format!("{}/filler", self.zpool.as_deref().unwrap()),
                ]));
            }
            _ => std::fs::remove_file(self.filler()).unwrap(),
        }
    }

    fn filler(&self) -> PathBuf {
        self.mount
            .clone()
            .unwrap_or(self.pool.clone())
            .join("filler")
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

    /// Temporary volumes left in the pool (and, for zfs, guard snapshots and mounts).
    pub fn leftovers(&self) -> Vec<String> {
        if let Some(vg) = &self.vg {
            let all = sh(Command::new("lvs").args(["--noheadings", "-o", "lv_name", vg]));
            let mut left: Vec<String> = all
                .split_whitespace()
                .filter(|n| n.starts_with("n+") || n.starts_with("o+"))
                .map(str::to_owned)
                .collect();
            let fill = self.dir.join("fill");
            if let Ok(dirs) = std::fs::read_dir(fill.join(format!("lvm-{vg}"))) {
                left.extend(
                    dirs.flatten()
                        .map(|d| format!("mount point: {:?}", d.path())),
                );
            }
            return left;
        }
        if self.zpool.is_some() {
            let all = sh(Command::new("zfs").args([
                "list",
                "-H",
                "-t",
                "all",
                "-r",
                "-o",
                "name",
                &self.dataset(),
            ]));
            let mut left: Vec<String> = all
                .lines()
                .filter(|n| n.contains("/.reimage") || n.contains("@reimage"))
                .map(str::to_owned)
                .collect();
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            left.extend(
                mounts
                    .lines()
                    .filter(|l| l.contains(&format!(" {}/", self.dataset())))
                    .map(|l| format!("mounted: {l}")),
            );
            return left;
        }
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
        if let Some(pool) = self.zpool.take() {
            let _ = Command::new("zpool")
                .args(["destroy", "-f", &pool])
                .status();
        }
        if let Some(vg) = self.vg.take() {
            let _ = Command::new("vgremove")
                .args(["-q", "-f", "-y", &vg])
                .output();
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

/// A volume's directory, for reading it; a zfs dataset is mounted for as long as this lives.
pub struct View {
    pub path: PathBuf,
    mounted: bool,
}

impl View {
    fn mount_device(env: &Env, device: &str, what: &str) -> View {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = env.dir.join(format!("view-{what}-{n}"));
        std::fs::create_dir_all(&path).unwrap();
        // xfs refuses a second mount of a snapshot with the same uuid unless told.
        let options = if matches!(env.backend, Backend::Lvm { xfs: true, .. }) {
            "nouuid"
        } else {
            "defaults"
        };
        sh(Command::new("mount")
            .args(["-o", options, device])
            .arg(&path));
        View {
            path,
            mounted: true,
        }
    }

    fn mount(env: &Env, dataset: &str, what: &str) -> View {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = env.dir.join(format!("view-{what}-{n}"));
        std::fs::create_dir_all(&path).unwrap();
        sh(Command::new("mount")
            .args(["-t", "zfs", dataset])
            .arg(&path));
        View {
            path,
            mounted: true,
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.path).status();
            let _ = std::fs::remove_dir(&self.path);
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
