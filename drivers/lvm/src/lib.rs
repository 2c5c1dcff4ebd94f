//! The `lvm` driver: each volume is a logical volume in the pool's volume group, thick or (with
//! `thin_pool`) thin, holding an ext4 or xfs filesystem that reimage makes.
//!
//! It drives the `lvm` command (`lvs`/`vgs` JSON reports, `lvcreate`, `lvrename`, ...)
//! through [`reimage_driver::command`]: argument vectors, `LC_ALL=C`, a cleared environment.
//! udev is used as on any host (LVM waits for it); running without udev is a matter of the
//! host's `lvm.conf`, not of this driver.
//!
//! - Names: an LV is named `v+NAME` (live), `n+NAME` (being built), `o+NAME` (old content),
//!   with every `_` of the volume name written `+`. Volume names never contain `+`, so no two
//!   volumes and no volume and temporary LV can share an LV name, and no LV name can contain
//!   the substrings LVM reserves (`_tdata`, `_rimage`, ...) or start with `snapshot`.
//! - Size: the LV's size is the volume's (rounded up to whole extents; xfs needs 300 MiB at
//!   least). Growing is `lvextend` then `resize2fs` or `xfs_growfs` on the mounted
//!   filesystem; shrinking is ext4 only, offline (`e2fsck`, `resize2fs`, `lvreduce`).
//! - Space: a thick pool's free extents (the whole size is taken at creation); a thin pool's
//!   free data, with the sum of the thin volumes' sizes reported as `provisioned` so that
//!   overcommit shows.
//! - Snapshots: LVs whose origin is the volume's LV. Thin snapshots outlive their origin, so
//!   `keep` works for thin pools: when an old LV is removed its snapshots get the tag
//!   `reimage.of=NAME` and are still listed as the volume's. Thick snapshots die with their
//!   origin, so `keep` is refused there.
//! - Image volumes (thin pools): an image is unpacked once into a thin LV `u+KEY`, sized to
//!   the measured image, checked with `e2fsck` (ext4), made read-only and renamed `i+KEY`
//!   (the rename is the seal). A volume filled from it is a thin snapshot of it, grown to
//!   its size. An xfs clone gets a filesystem UUID of its own (the kernel refuses a second
//!   mount of an xfs UUID); an ext4 clone keeps its image's, as ext4 allows. Thin snapshots
//!   outlive their origin, so removing an image volume never touches its clones.

mod report;

use std::cell::{Cell, RefCell};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use reimage_driver::command::{self, Failure};
use reimage_driver::{
    mount, mounts, Capabilities, Cloned, Driver, Error, ErrorKind, ImageKey, ImageVolume,
    KeepSnapshots, Mounted, PoolSpace, Result, SizeModel, Slot, SlotKind, Usage, VolumeName,
};
use report::{Lv, LV_FIELDS, VG_FIELDS};

/// The smallest filesystem mkfs.xfs makes.
const XFS_MIN: u64 = 300 << 20;
/// The smallest ext4 the driver makes: room for its journal and metadata beside the content.
const EXT4_MIN: u64 = 16 << 20;
/// The tag that ties a thin snapshot to its volume after the LV it was taken of is gone.
const LINEAGE_TAG: &str = "reimage.of=";

/// Checks a volume group or thin pool name as a pool's config may give it, as LVM allows
/// it: letters, digits and `+_.-`, not starting with `-`, not `.` or `..`, at most 127
/// bytes.
pub fn check_name(value: &str) -> std::result::Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 127
        && !value.starts_with('-')
        && value != "."
        && value != ".."
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err("is not an LVM name (letters, digits, '+_.-', not starting with '-')".into())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fs {
    Ext4,
    Xfs,
}

impl Fs {
    pub fn parse(name: &str) -> Option<Fs> {
        match name {
            "ext4" => Some(Fs::Ext4),
            "xfs" => Some(Fs::Xfs),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
        }
    }
}

pub struct LvmDriver {
    vg: String,
    thin_pool: Option<String>,
    fs: Fs,
    /// Images are unpacked once into thin LVs that volumes are snapshots of (thin only).
    image_volumes: bool,
    mount_dir: PathBuf,
    /// The volume group's LVs as last listed, dropped by every change this driver makes:
    /// one request reads the list many times, and every `lvm` run costs a device scan.
    listed: RefCell<Option<Vec<Lv>>>,
    /// An LV was removed since the listing: its rows are right about names, sizes and tags,
    /// but the space figures they carry are stale.
    space_stale: Cell<bool>,
}

/// The LV name of a volume's slot: `v+`, `n+` or `o+` and the volume name with `_` as `+`
/// (LVM reserves some names with underscores, and `+` is not a volume name character).
pub fn lv_name(slot: Slot<'_>) -> String {
    let prefix = match slot.kind {
        SlotKind::Live => "v+",
        SlotKind::New => "n+",
        SlotKind::Old => "o+",
    };
    format!("{prefix}{}", slot.volume.as_str().replace('_', "+"))
}

/// The device-mapper node of an LV: `/dev/mapper/VG-LV`, each `-` inside a name doubled.
pub fn dm_path(vg: &str, lv: &str) -> String {
    format!(
        "/dev/mapper/{}-{}",
        vg.replace('-', "--"),
        lv.replace('-', "--")
    )
}

/// The LV name of image volume `key`: `i+KEY` sealed, `u+KEY` while it is built. Short,
/// because device-mapper names (`VG-LV`) have 127 bytes at most; never a volume's, whose
/// LV names start with `v+`, `n+` or `o+`.
pub fn image_lv_name(key: &ImageKey, sealed: bool) -> String {
    format!("{}+{key}", if sealed { 'i' } else { 'u' })
}

/// The key and state of an image volume's LV name; `None` for any other LV.
pub fn image_of(lv_name: &str) -> Option<(ImageKey, bool)> {
    let (prefix, key) = lv_name.split_at_checked(2)?;
    let sealed = match prefix {
        "i+" => true,
        "u+" => false,
        _ => return None,
    };
    Some((ImageKey::parse(key)?, sealed))
}

/// The volume and slot an LV name stands for, if it is one of ours.
pub fn slot_of(lv_name: &str) -> Option<(VolumeName, SlotKind)> {
    let kind = match lv_name.get(..2)? {
        "v+" => SlotKind::Live,
        "n+" => SlotKind::New,
        "o+" => SlotKind::Old,
        _ => return None,
    };
    let volume = VolumeName::parse(&lv_name[2..].replace('+', "_")).ok()?;
    Some((volume, kind))
}

/// What a failed LVM or mkfs command means, from its message (LC_ALL=C).
fn classify(failure: &Failure) -> ErrorKind {
    let text = failure.stderr.as_str();
    if text.contains("not found") || text.contains("Failed to find") {
        ErrorKind::NotFound
    } else if text.contains("already exists") {
        ErrorKind::AlreadyExists
    } else if text.contains("in use") || text.contains("is open") {
        ErrorKind::Busy { holder: None }
    } else if text.contains("nsufficient") || text.contains("No space") {
        ErrorKind::NoSpace
    } else {
        ErrorKind::Failed
    }
}

fn run<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> Result<String> {
    command::run(program, args).map_err(|f| Error::new(classify(&f), f.to_string()))
}

fn lvm<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<String> {
    run("lvm", args)
}

/// The forced check resize2fs wants before it touches an unmounted ext4. Exit status 1 means
/// it fixed something, which is fine here; a mounted filesystem makes it refuse.
fn fsck(dev: &str) -> Result<()> {
    match command::run("e2fsck", ["-f", "-p", dev]) {
        Ok(_) => Ok(()),
        Err(f) if f.status == Some(1) => Ok(()),
        Err(f) => Err(Error::new(ErrorKind::Failed, f.to_string())),
    }
}

impl LvmDriver {
    /// A driver for the volumes in `vg` (in `thin_pool` if given), which must exist.
    pub fn open(
        vg: &str,
        thin_pool: Option<&str>,
        fs: Fs,
        image_volumes: bool,
        mount_dir: PathBuf,
    ) -> Result<LvmDriver> {
        let driver = LvmDriver {
            vg: vg.to_owned(),
            image_volumes: image_volumes && thin_pool.is_some(),
            thin_pool: thin_pool.map(str::to_owned),
            fs,
            mount_dir,
            listed: RefCell::new(None),
            space_stale: Cell::new(false),
        };
        driver.lvs().map_err(|e| {
            Error::new(
                e.kind,
                format!("the pool's volume group {vg} cannot be used: {}; create it (vgcreate) or fix `vg` in the config", e.message),
            )
        })?;
        if let Some(pool) = thin_pool {
            let found = driver
                .lvs()?
                .into_iter()
                .any(|lv| lv.lv_name == pool && lv.lv_attr.starts_with('t'));
            if !found {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("the thin pool {vg}/{pool} does not exist; create it (lvcreate --type thin-pool) or fix `thin_pool` in the config"),
                ));
            }
        }
        Ok(driver)
    }

    fn path(&self, slot: Slot<'_>) -> String {
        format!("{}/{}", self.vg, lv_name(slot))
    }

    /// Runs an `lvm` command that changes the volume group.
    fn change<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String> {
        self.listed.replace(None);
        let out = lvm(args);
        self.listed.replace(None);
        out
    }

    /// Every LV of the volume group.
    fn lvs(&self) -> Result<Vec<Lv>> {
        if let Some(listed) = self.listed.borrow().as_ref() {
            return Ok(listed.clone());
        }
        let listed = self.list()?;
        self.space_stale.set(false);
        self.listed.replace(Some(listed.clone()));
        Ok(listed)
    }

    fn list(&self) -> Result<Vec<Lv>> {
        let out = lvm(&[
            "lvs",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            LV_FIELDS,
            "-S",
            "lv_name!=\"\"",
            &self.vg,
        ])?;
        report::parse_lvs(&out)
    }

    fn find(&self, slot: Slot<'_>) -> Result<Option<Lv>> {
        let name = lv_name(slot);
        Ok(self.lvs()?.into_iter().find(|lv| lv.lv_name == name))
    }

    fn require(&self, slot: Slot<'_>) -> Result<Lv> {
        self.find(slot)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{slot} does not exist")))
    }

    fn vg_report(&self) -> Result<report::Vg> {
        let out = lvm(&[
            "vgs",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            VG_FIELDS,
            &self.vg,
        ])?;
        report::parse_vgs(&out)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no volume group {}", self.vg)))
    }

    fn mount_point(&self, slot: Slot<'_>) -> PathBuf {
        self.mount_point_of(&lv_name(slot))
    }

    fn mount_point_of(&self, lv_name: &str) -> PathBuf {
        self.mount_dir
            .join(format!("lvm-{}", self.vg))
            .join(lv_name)
    }

    fn find_named(&self, name: &str) -> Result<Option<Lv>> {
        Ok(self.lvs()?.into_iter().find(|lv| lv.lv_name == name))
    }

    /// Where the LV's device is mounted in this namespace.
    fn mounted_at(&self, lv: &Lv) -> Result<Vec<PathBuf>> {
        let Ok(meta) = std::fs::metadata(&lv.lv_dm_path) else {
            return Ok(Vec::new());
        };
        if !meta.file_type().is_block_device() {
            return Ok(Vec::new());
        }
        use std::os::unix::fs::MetadataExt;
        let rdev = meta.rdev();
        let wanted = format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev));
        Ok(mounts()
            .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?
            .into_iter()
            .filter(|m| m.device == wanted)
            .map(|m| m.mount_point)
            .collect())
    }

    /// Snapshots of `origin_lv`, and for a live slot also those tagged as the volume's, oldest
    /// first.
    fn snapshot_lvs(&self, all: &[Lv], slot: Slot<'_>) -> Vec<Lv> {
        let name = lv_name(slot);
        let tag = format!("{LINEAGE_TAG}{}", slot.volume);
        let mut found: Vec<Lv> = all
            .iter()
            .filter(|lv| {
                // Tagged snapshots outlived an earlier LV of the volume: they belong to the
                // live volume and go when it goes (through the old slot), never with a
                // half-built new one.
                lv.origin == name || (slot.kind != SlotKind::New && lv.tags().any(|t| t == tag))
            })
            .cloned()
            .collect();
        found.sort_by(|a, b| a.lv_time.cmp(&b.lv_time));
        found
    }

    fn remove(&self, lv_name: &str) -> Result<()> {
        // The listing is brought up to date here rather than read again: the LV goes, and
        // thin snapshots of it lose their origin (the space figures are read again if asked).
        let listed = self.listed.take();
        let removed = lvm(&["lvremove", "-q", "-y", &format!("{}/{lv_name}", self.vg)]);
        if let (Ok(_), Some(mut lvs)) = (&removed, listed) {
            lvs.retain(|lv| lv.lv_name != lv_name);
            for lv in &mut lvs {
                if lv.origin == lv_name {
                    lv.origin.clear();
                }
            }
            self.listed.replace(Some(lvs));
            self.space_stale.set(true);
        }
        removed.map(drop)
    }

    /// Creates the LV `name` of `bytes` (thin in the pool, if there is one) holding an empty
    /// filesystem; removes it again when a step fails.
    fn make_lv(&self, name: &str, bytes: u64) -> Result<()> {
        let size = format!("{}b", self.lv_size(bytes));
        match &self.thin_pool {
            Some(pool) => self.change(&[
                "lvcreate",
                "-q",
                "-y",
                "-n",
                name,
                "-V",
                &size,
                "--thinpool",
                pool,
                &self.vg,
            ]),
            None => self.change(&[
                "lvcreate",
                "-q",
                "-y",
                "--wipesignatures",
                "y",
                "-n",
                name,
                "-L",
                &size,
                &self.vg,
            ]),
        }?;
        let made = self.require_named(name).and_then(|lv| {
            self.mkfs(&lv.lv_dm_path)?;
            // A volume holds exactly its image: not mkfs.ext4's empty lost+found.
            let root = mount::mount_for_filling(
                &lv.lv_dm_path,
                self.fs.name(),
                self.mount_point_of(name),
                false,
            )?;
            match rustix::fs::unlinkat(root.root(), c"lost+found", rustix::fs::AtFlags::REMOVEDIR) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(Error::errno("removing lost+found", e)),
            }
            root.release()
        });
        if let Err(e) = made {
            let _ = self.remove(name);
            return Err(e);
        }
        Ok(())
    }

    fn require_named(&self, name: &str) -> Result<Lv> {
        self.find_named(name)?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("LV {}/{name} does not exist", self.vg),
            )
        })
    }

    /// Makes the empty `slot` a writable thin snapshot of the LV `origin`, active, with a
    /// filesystem UUID of its own where the filesystem needs one.
    fn snapshot_into(&self, origin: &str, slot: Slot<'_>) -> Result<()> {
        let name = lv_name(slot);
        self.change(&[
            "lvcreate",
            "-q",
            "-y",
            "-s",
            "-kn",
            "-p",
            "rw",
            "-n",
            &name,
            &format!("{}/{origin}", self.vg),
        ])?;
        let made = self.require(slot).and_then(|lv| match self.fs {
            // Two xfs with one UUID cannot be mounted at once, and every clone of an image
            // would share it.
            Fs::Xfs => self.new_xfs_uuid(slot, &lv),
            Fs::Ext4 => Ok(()),
        });
        if let Err(e) = made {
            let _ = self.remove(&name);
            return Err(e);
        }
        Ok(())
    }

    /// Gives the xfs of the (unmounted) LV in `slot` a UUID of its own. A snapshot of a
    /// mounted xfs has a log to replay first, which a mount does (`nouuid`: its origin may be
    /// mounted under the same UUID).
    fn new_xfs_uuid(&self, slot: Slot<'_>, lv: &Lv) -> Result<()> {
        let dev = lv.lv_dm_path.as_str();
        match command::run("xfs_admin", ["-U", "generate", dev]) {
            Ok(_) => return Ok(()),
            Err(f) if f.stderr.contains("log") || f.stdout.contains("log") => {}
            Err(f) => return Err(Error::new(classify(&f), f.to_string())),
        }
        mount::mount_with_options(
            dev,
            self.fs.name(),
            self.mount_point(slot),
            false,
            Some(c"nouuid"),
        )?
        .release()?;
        run("xfs_admin", &["-U", "generate", dev]).map(drop)
    }

    /// Unmounts every mount of the LV in this namespace.
    fn unmount_all(&self, lv: &Lv) -> Result<()> {
        for dir in self.mounted_at(lv)? {
            mount::unmount(&dir)?;
        }
        Ok(())
    }

    /// The LV size for a volume of `bytes`: whole MiB (LVM rounds on to whole extents), and
    /// what the filesystem needs at least.
    fn lv_size(&self, bytes: u64) -> u64 {
        let bytes = bytes.div_ceil(1 << 20).saturating_mul(1 << 20);
        match self.fs {
            Fs::Xfs => bytes.max(XFS_MIN),
            Fs::Ext4 => bytes.max(EXT4_MIN),
        }
    }

    fn mkfs(&self, device: &str) -> Result<()> {
        match self.fs {
            // No reserved blocks: reimage fills volumes without CAP_SYS_RESOURCE, and the
            // volume is sized to its content. One inode per 8 KiB: root filesystems are many
            // small files.
            Fs::Ext4 => run(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-m",
                    "0",
                    "-i",
                    "8192",
                    "-E",
                    "nodiscard",
                    device,
                ],
            ),
            Fs::Xfs => run("mkfs.xfs", &["-q", "-f", "-K", device]),
        }
        .map(drop)
    }

    /// Grows the filesystem of a (grown) LV to the LV's size: ext4 offline (growing a
    /// mounted ext4 needs CAP_SYS_RESOURCE, which reimage gives up), xfs mounted (the only way
    /// xfs grows).
    fn grow_fs(&self, slot: Slot<'_>, lv: &Lv) -> Result<()> {
        let dev = lv.lv_dm_path.as_str();
        match self.fs {
            // resize2fs asks for a forced check when the filesystem was mounted read-write
            // since its last one; a clone of a sealed image volume (checked when sealed) is
            // grown without.
            Fs::Ext4 => match command::run("resize2fs", [dev]) {
                Ok(_) => Ok(()),
                Err(f) if f.stderr.contains("e2fsck -f") => {
                    fsck(dev)?;
                    run("resize2fs", &[dev]).map(drop)
                }
                Err(f) => Err(Error::new(classify(&f), f.to_string())),
            },
            Fs::Xfs => {
                let mounted =
                    mount::mount_for_filling(dev, self.fs.name(), self.mount_point(slot), false)?;
                let grown = run("xfs_growfs", &[self.mount_point(slot).as_os_str()]);
                let released = mounted.release();
                grown.map(drop).and(released)
            }
        }
    }

    /// Removes the directories the slot was mounted on, left empty by a process that was
    /// killed while it had the volume mounted (the kernel unmounted it, the directory stayed).
    fn forget_mount_points(&self, slot: Slot<'_>) {
        let dir = self.mount_point(slot);
        let _ = std::fs::remove_dir(dir.with_extension("usage"));
        let _ = std::fs::remove_dir(dir);
    }

    /// Shrinks an unmounted ext4 and then its LV to `bytes`.
    fn shrink_ext4(&self, slot: Slot<'_>, lv: &Lv, bytes: u64) -> Result<()> {
        let dev = lv.lv_dm_path.as_str();
        fsck(dev)?;
        run("resize2fs", &[dev, &format!("{}K", bytes / 1024)])?;
        self.change(&[
            "lvreduce",
            "-q",
            "-y",
            "-f",
            "-L",
            &format!("{bytes}b"),
            &self.path(slot),
        ])
        .map(drop)
    }
}

impl Driver for LvmDriver {
    fn name(&self) -> &'static str {
        "lvm"
    }

    fn capabilities(&self) -> Capabilities {
        let thin = self.thin_pool.is_some();
        Capabilities {
            snapshots: true,
            keep_snapshots: if thin {
                KeepSnapshots::Independent
            } else {
                KeepSnapshots::No
            },
            size_counts_snapshots: false,
            limit_reads_as_full: false,
            size_model: if thin {
                SizeModel::Quota
            } else {
                SizeModel::Allocated
            },
            shrink: self.fs == Fs::Ext4,
            exchange: false,
            // A read-only mount and statvfs, no walk.
            cheap_usage: true,
            image_volumes: self.image_volumes,
            // Thin snapshots are writable LVs of their own; thick ones die with their origin.
            templates: thin,
            late_limit: false,
            size_counts_image: true,
            full_at_size: true,
        }
    }

    fn identity(&self, slot: Slot<'_>) -> Result<Option<String>> {
        Ok(self.find(slot)?.map(|lv| lv.lv_uuid))
    }

    fn identities(&self, volume: &VolumeName) -> Result<[Option<String>; 3]> {
        let all = self.lvs()?;
        Ok(SlotKind::ALL.map(|kind| {
            let name = lv_name(Slot { volume, kind });
            all.iter()
                .find(|lv| lv.lv_name == name)
                .map(|lv| lv.lv_uuid.clone())
        }))
    }

    fn create(&self, slot: Slot<'_>, size: Option<u64>) -> Result<()> {
        self.make_lv(&lv_name(slot), size.unwrap_or(1 << 30))
    }

    fn destroy(&self, slot: Slot<'_>, with_snapshots: bool) -> Result<()> {
        let all = self.lvs()?;
        let name = lv_name(slot);
        let Some(lv) = all.iter().find(|lv| lv.lv_name == name) else {
            return Ok(());
        };
        self.unmount_all(lv)?;
        let snapshots = self.snapshot_lvs(&all, slot);
        if with_snapshots {
            for snap in &snapshots {
                self.remove(&snap.lv_name)?;
            }
        } else if !snapshots.is_empty() {
            if self.thin_pool.is_none() {
                return Err(Error::new(
                    ErrorKind::HasSnapshots(snapshots.iter().map(|s| s.lv_name.clone()).collect()),
                    format!("{slot} has thick snapshots, which LVM removes with it"),
                ));
            }
            // Thin snapshots stay; the tag keeps them the volume's.
            let tag = format!("{LINEAGE_TAG}{}", slot.volume);
            for snap in snapshots.iter().filter(|s| !s.tags().any(|t| t == tag)) {
                self.change(&[
                    "lvchange",
                    "-q",
                    "--addtag",
                    &tag,
                    &format!("{}/{}", self.vg, snap.lv_name),
                ])?;
            }
        }
        self.remove(&name)?;
        self.forget_mount_points(slot);
        Ok(())
    }

    fn snapshots(&self, slot: Slot<'_>) -> Result<Vec<String>> {
        let all = self.lvs()?;
        Ok(self
            .snapshot_lvs(&all, slot)
            .into_iter()
            .map(|lv| lv.lv_name)
            .collect())
    }

    fn rename(&self, from: Slot<'_>, to: Slot<'_>) -> Result<()> {
        self.forget_mount_points(from);
        let (old, new) = (lv_name(from), lv_name(to));
        // A rename changes names only (not sizes, space or activation): the listing is
        // brought up to date here rather than read again.
        let listed = self.listed.take();
        let renamed = lvm(&["lvrename", "-q", &self.vg, &old, &new]);
        if let (Ok(_), Some(mut lvs)) = (&renamed, listed) {
            for lv in &mut lvs {
                if lv.lv_name == old {
                    lv.lv_name = new.clone();
                    lv.lv_dm_path = dm_path(&self.vg, &new);
                }
                if lv.origin == old {
                    lv.origin = new.clone();
                }
            }
            self.listed.replace(Some(lvs));
        }
        renamed.map(drop).map_err(|e| match e.kind {
            ErrorKind::AlreadyExists => {
                Error::new(ErrorKind::AlreadyExists, format!("{to} already exists"))
            }
            _ => e,
        })
    }

    fn exchange(&self, _a: Slot<'_>, _b: Slot<'_>) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "LVM cannot exchange two logical volumes atomically",
        ))
    }

    fn usage(&self, slot: Slot<'_>) -> Result<Usage> {
        let lv = self.require(slot)?;
        let size = lv.size()?;
        // What the filesystem holds, read from a read-only mount in reimage's own namespace.
        let mounted = mount::mount_for_filling(
            &lv.lv_dm_path,
            self.fs.name(),
            self.mount_point(slot).with_extension("usage"),
            true,
        )?;
        let st = rustix::fs::fstatvfs(mounted.root())
            .map_err(|e| Error::errno(format!("statvfs of {slot}"), e));
        mounted.release()?;
        let st = st?;
        Ok(Usage {
            size: Some(size),
            used: (st.f_blocks - st.f_bfree) * st.f_frsize,
            inodes: Some(st.f_files - st.f_ffree),
        })
    }

    fn set_size(&self, slot: Slot<'_>, bytes: u64) -> Result<()> {
        let lv = self.require(slot)?;
        let current = lv.size()?;
        // What LVM would make of it: a size within the last extent is the current one.
        let bytes = lv.in_extents(self.lv_size(bytes))?;
        if bytes > current {
            self.change(&[
                "lvextend",
                "-q",
                "-L",
                &format!("{bytes}b"),
                &self.path(slot),
            ])?;
            return self.grow_fs(slot, &lv);
        }
        if bytes == current {
            return Ok(());
        }
        match self.fs {
            Fs::Xfs => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{slot} holds xfs, which cannot be shrunk (from {current} to {bytes} bytes)"
                ),
            )),
            Fs::Ext4 => self.shrink_ext4(slot, &lv, bytes),
        }
    }

    fn pool_space(&self) -> Result<PoolSpace> {
        if self.space_stale.replace(false) {
            self.listed.replace(None);
        }
        match &self.thin_pool {
            None => {
                // Every LV's row carries the VG's figures; only an empty VG needs a `vgs`.
                let (free, size) = match self.lvs()?.into_iter().next() {
                    Some(lv) => (lv.vg_free, lv.vg_size),
                    None => {
                        let vg = self.vg_report()?;
                        (vg.vg_free, vg.vg_size)
                    }
                };
                Ok(PoolSpace {
                    available: report::bytes("vg_free", &free)?,
                    total: report::bytes("vg_size", &size)?,
                    inodes_available: None,
                    provisioned: None,
                })
            }
            Some(pool) => {
                let all = self.lvs()?;
                let pool_lv = all.iter().find(|lv| &lv.lv_name == pool).ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("the thin pool {}/{pool} is gone", self.vg),
                    )
                })?;
                let total = pool_lv.size()?;
                let used = report::percent("data_percent", &pool_lv.data_percent)?;
                let available = (total as f64 * (1.0 - used / 100.0)).max(0.0) as u64;
                let mut provisioned = 0u64;
                for lv in all.iter().filter(|lv| &lv.pool_lv == pool) {
                    provisioned = provisioned.saturating_add(lv.size()?);
                }
                Ok(PoolSpace {
                    available,
                    total,
                    inodes_available: None,
                    provisioned: Some(provisioned),
                })
            }
        }
    }

    fn open_root(&self, slot: Slot<'_>) -> Result<Mounted> {
        let lv = self.require(slot)?;
        mount::mount_for_filling(
            &lv.lv_dm_path,
            self.fs.name(),
            self.mount_point(slot),
            false,
        )
    }

    fn image_variant(&self) -> &'static str {
        self.fs.name()
    }

    /// xfs keeps a log of 64 MiB on any filesystem of the sizes volumes have, and reserves
    /// about 3% for its reflink and reverse-mapping btrees (mkfs.xfs 6.1 on 0.5–1 GiB):
    /// without them a volume sized to its content by the headroom alone fills up. ext4's
    /// journal and inode tables fit in the headroom.
    fn fs_overhead(&self, content: u64) -> u64 {
        match self.fs {
            Fs::Xfs => (64 << 20) + content / 16,
            Fs::Ext4 => 0,
        }
    }

    fn busy(&self, slot: Slot<'_>) -> Result<Option<String>> {
        let Some(lv) = self.find(slot)? else {
            return Ok(None);
        };
        if let Some(dir) = self.mounted_at(&lv)?.into_iter().next() {
            return reimage_driver::holder_of_mount(&dir)
                .map(Some)
                .map_err(|e| Error::io("scanning /proc", e));
        }
        if lv.is_open() {
            return Ok(Some(format!(
                "{} is held open (by a virtual machine or another program)",
                lv.lv_dm_path
            )));
        }
        Ok(None)
    }

    fn forget(&self, volume: &VolumeName) -> Result<()> {
        let tag = format!("{LINEAGE_TAG}{volume}");
        for lv in self.lvs()?.iter().filter(|lv| lv.tags().any(|t| t == tag)) {
            self.change(&[
                "lvchange",
                "-q",
                "--deltag",
                &tag,
                &format!("{}/{}", self.vg, lv.lv_name),
            ])?;
        }
        Ok(())
    }

    fn create_image(&self, key: &ImageKey, size: Option<u64>) -> Result<()> {
        let size = size.ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "an lvm image volume is sized when it is created: the image must be measured first",
            )
        })?;
        // lvcreate refuses a name that exists (`AlreadyExists`), before make_lv could
        // remove anything.
        self.make_lv(&image_lv_name(key, false), size)
    }

    fn open_image(&self, key: &ImageKey) -> Result<Mounted> {
        let name = image_lv_name(key, false);
        let lv = self.require_named(&name)?;
        mount::mount_for_filling(
            &lv.lv_dm_path,
            self.fs.name(),
            self.mount_point_of(&name),
            false,
        )
    }

    fn seal_image(&self, building: &ImageKey, key: &ImageKey) -> Result<()> {
        let (unsealed, sealed) = (image_lv_name(building, false), image_lv_name(key, true));
        let lv = self.require_named(&unsealed)?;
        self.unmount_all(&lv)?;
        let _ = std::fs::remove_dir(self.mount_point_of(&unsealed));
        if self.fs == Fs::Ext4 {
            // Checked once here, so that growing each clone needs no check of its own (a
            // check is due after each read-write mount). The check makes the lost+found the
            // volume was made without; it goes again offline, which is not a mount.
            fsck(&lv.lv_dm_path)?;
            run(
                "debugfs",
                &["-w", "-R", "rmdir lost+found", lv.lv_dm_path.as_str()],
            )?;
        }
        let path = format!("{}/{unsealed}", self.vg);
        self.change(&["lvchange", "-q", "-p", "r", &path])?;
        // The rename is the seal: under the unsealed name it is still a leftover.
        self.change(&["lvrename", "-q", &self.vg, &unsealed, &sealed])
            .map(drop)
    }

    fn clone_snapshot(&self, template: &VolumeName, snapshot: &str, slot: Slot<'_>) -> Result<()> {
        if self.thin_pool.is_none() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("this pool's LVs are thick: a snapshot of {template} cannot be cloned (templates need a thin pool)"),
            ));
        }
        let live = Slot::live(template);
        if self.find(live)?.is_none() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("template volume {template} does not exist"),
            ));
        }
        let all = self.lvs()?;
        if !self
            .snapshot_lvs(&all, live)
            .iter()
            .any(|lv| lv.lv_name == snapshot)
        {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("volume {template} has no snapshot {snapshot}"),
            ));
        }
        self.snapshot_into(snapshot, slot)
    }

    fn clone_image(&self, key: &ImageKey, slot: Slot<'_>) -> Result<Cloned> {
        let name = image_lv_name(key, true);
        self.require_named(&name)?;
        self.snapshot_into(&name, slot)?;
        Ok(Cloned::Whole)
    }

    /// Listed afresh: other requests build and remove image volumes.
    fn images(&self) -> Result<Vec<ImageVolume>> {
        self.listed.replace(None);
        let all = self.lvs()?;
        let mut found: Vec<ImageVolume> = all
            .iter()
            .filter_map(|lv| {
                let (key, sealed) = image_of(&lv.lv_name)?;
                let mut clones: Vec<String> = all
                    .iter()
                    .filter(|c| c.origin == lv.lv_name)
                    .filter_map(|c| slot_of(&c.lv_name))
                    .map(|(volume, _)| volume.as_str().to_owned())
                    .collect();
                clones.sort();
                clones.dedup();
                Some(ImageVolume {
                    key,
                    sealed,
                    clones,
                    holders: Vec::new(),
                })
            })
            .collect();
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    /// Thin snapshots outlive their origin: the clones keep their content.
    fn destroy_image(&self, key: &ImageKey, sealed: bool) -> Result<()> {
        let name = image_lv_name(key, sealed);
        let Some(lv) = self.find_named(&name)? else {
            return Ok(());
        };
        self.unmount_all(&lv)?;
        self.remove(&name)?;
        let _ = std::fs::remove_dir(self.mount_point_of(&name));
        Ok(())
    }

    fn leftovers(&self) -> Result<Vec<(VolumeName, SlotKind)>> {
        let mut found: Vec<(VolumeName, SlotKind)> = self
            .lvs()?
            .iter()
            .filter_map(|lv| slot_of(&lv.lv_name))
            .filter(|(_, kind)| *kind != SlotKind::Live)
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_mapper_names_double_dashes() {
        assert_eq!(dm_path("vg0", "v+c1"), "/dev/mapper/vg0-v+c1");
        assert_eq!(dm_path("my-vg", "v+a-b"), "/dev/mapper/my--vg-v+a--b");
    }

    #[test]
    fn lv_names_are_injective_and_never_reserved() {
        let names = [
            "c1",
            "a_b",
            "a+b",
            "snapshot1",
            "x_tdata",
            "pvmove",
            "A.b-c_",
        ];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            let Ok(v) = VolumeName::parse(n) else {
                continue;
            };
            for kind in SlotKind::ALL {
                let lv = lv_name(Slot { volume: &v, kind });
                assert!(!lv.contains('_'), "{lv}");
                assert!(!lv.starts_with("snapshot") && !lv.starts_with("pvmove"));
                assert!(seen.insert(lv.clone()), "{lv} twice");
                assert_eq!(slot_of(&lv), Some((v.clone(), kind)));
                assert_eq!(image_of(&lv), None);
            }
        }
        let key = ImageKey::parse(&"0f".repeat(32)).unwrap();
        for sealed in [true, false] {
            let name = image_lv_name(&key, sealed);
            assert_eq!(image_of(&name), Some((key.clone(), sealed)));
            assert_eq!(slot_of(&name), None);
        }
    }
}
