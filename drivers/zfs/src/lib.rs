//! The `zfs` driver: each volume is a filesystem dataset directly under the pool's `dataset`.
//!
//! It drives the `zfs` command (its interface is stable; libzfs is not) through
//! [`reimage_driver::command`]: argument vectors, `-H -p` output, `LC_ALL=C`. Volumes are
//! created with `mountpoint=legacy`, so ZFS never mounts them by itself; reimage mounts one
//! only while it fills it, in its own mount namespace ([`reimage_driver::mount`]), and the
//! daemon that runs the container mounts it with `mount -t zfs DATASET DIR`.
//!
//! - Slots: `PARENT/VOLUME`, `PARENT/.reimage-new.VOLUME`, `PARENT/.reimage-old.VOLUME`
//!   (volume names start with a letter or digit, so they never collide); the identity is the
//!   dataset's `guid`, which survives renames. There is no atomic exchange: the core swaps
//!   with two `zfs rename`s under its journal.
//! - Size: `refquota` (default: the volume's own data; snapshots do not eat into it) or
//!   `quota` (snapshots count), as the pool config says, at least [`MIN_QUOTA`]; free space
//!   is the parent's `available`.
//! - Snapshots live inside their dataset and die with it, so `keep` refills the dataset in
//!   place under the guard snapshot `@reimage-guard` ([`KeepSnapshots::Refill`]). A dataset
//!   whose snapshots have clones is never destroyed: the core refuses first
//!   (`volume_has_clones`).
//! - Image volumes (pool option `image_volumes`): `PARENT/.reimage-image-new.KEY` while built,
//!   then snapshotted (`@sealed`), made `readonly=on` and renamed `PARENT/.reimage-image.KEY`
//!   (the rename is the seal); a volume filled from it is a `zfs clone` of `@sealed`. An image
//!   volume with clones cannot be destroyed, and is not: prune skips it.
//! - "dataset is busy" (a mount that is just going away) is retried for a few seconds.

mod listing;

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use listing::Listing;
use reimage_driver::command::{self, Failure};
use reimage_driver::image::{image_name, parse_image_name};
use reimage_driver::{
    mount, mounts, temporary_slot, Capabilities, Cloned, Driver, Error, ErrorKind, ImageKey,
    ImageVolume, KeepSnapshots, Mounted, PoolSpace, Result, SizeModel, Slot, SlotKind, Usage,
    VolumeName,
};

/// The snapshot a refill can roll back to; not listed among the volume's snapshots.
pub const GUARD: &str = "reimage-guard";

/// The snapshot of a sealed image volume that volumes are cloned from.
pub const SEALED: &str = "sealed";

/// The user property naming the image volume whose content a volume holds: set on a clone
/// of an image volume, `none` once the volume is refilled in place (it stays a zfs clone of
/// the image volume, a holder, without its content). Unset on a clone: made before the
/// property was, counted as holding the content.
pub const IMAGE_PROPERTY: &str = "reimage:image";

/// What a parked image volume's dataset is named after (its guid): short, as zfs names
/// are at most 255 bytes.
const PARKED: &str = reimage_driver::image::PARKED_PREFIX;

/// The longest parent dataset name: a zfs name has at most 255 bytes, and reimage adds
/// `/.reimage-new.` (14), a volume name (64) and `@reimage-guard` (14).
const MAX_PARENT_DATASET: usize = 255 - 14 - 64 - 1 - GUARD.len();

/// Checks a parent dataset name as a pool's config may give it: components of letters,
/// digits and `_-:.`, joined by `/`, starting with a letter (as pool names do), no empty
/// component, no `.`/`..`, short enough for every name reimage derives from it. The error
/// says why, for the config's message.
pub fn check_parent_dataset(dataset: &str) -> std::result::Result<(), String> {
    if dataset.len() > MAX_PARENT_DATASET {
        return Err(format!("is longer than {MAX_PARENT_DATASET} bytes"));
    }
    if !dataset.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err("must start with a letter".into());
    }
    for component in dataset.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return Err("has an empty, '.' or '..' component".into());
        }
        if let Some(c) = component
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.')))
        {
            return Err(format!("contains {c:?}"));
        }
    }
    Ok(())
}

/// Properties of every volume dataset, whatever its parent has: POSIX ACLs (`acltype=off`,
/// OpenZFS's default on Linux, would drop every ACL of an image) and xattrs stored in the
/// inode (`xattr=sa`, as LXD and Incus set them too).
const VOLUME_PROPERTIES: [&str; 2] = ["acltype=posixacl", "xattr=sa"];
/// The smallest limit the driver sets. ZFS reserves worst-case space for every transaction
/// (many times what it writes), and within a few MiB of a quota each write waits for a
/// transaction group to sync: unpacking a 4 MiB tree under a 16 MiB refquota took 12 times
/// as long as under 64 MiB (measured in the test guest).
pub const MIN_QUOTA: u64 = 64 << 20;

/// How long "dataset is busy" is retried.
const BUSY_RETRY: Duration = Duration::from_secs(10);

/// Which property limits a volume's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaProperty {
    /// The data the dataset itself references; snapshots and descendants are not counted.
    RefQuota,
    /// Everything the dataset uses, its snapshots included.
    Quota,
}

impl QuotaProperty {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "refquota" => Some(QuotaProperty::RefQuota),
            "quota" => Some(QuotaProperty::Quota),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            QuotaProperty::RefQuota => "refquota",
            QuotaProperty::Quota => "quota",
        }
    }
}

/// How a volume is made from an image volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageClone {
    /// `zfs clone` of its seal: instant, shares every block, and depends on the image
    /// volume until it is destroyed.
    Clone,
    /// `zfs send | zfs recv` of its seal: a copy of every block that depends on nothing.
    Copy,
}

impl ImageClone {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "clone" => Some(ImageClone::Clone),
            "copy" => Some(ImageClone::Copy),
            _ => None,
        }
    }
}

pub struct ZfsDriver {
    /// The parent dataset that holds the volumes.
    parent: String,
    quota: QuotaProperty,
    image_volumes: bool,
    image_clone: ImageClone,
    /// Where volumes are mounted while being filled (one directory per dataset).
    mount_dir: PathBuf,
    /// The last listing of one volume's slots, until the driver changes the pool.
    listed: RefCell<Option<Listing>>,
    /// A slot was mounted for writing since the listing: its space figures are stale.
    written: Cell<bool>,
    /// The parent's space as read when the driver opened, until the driver changes or
    /// writes anything.
    space: Cell<Option<PoolSpace>>,
}

/// What a failed `zfs` command means, from its message (LC_ALL=C keeps them in English).
fn classify(failure: &Failure) -> ErrorKind {
    let text = failure.stderr.as_str();
    if text.contains("does not exist") {
        ErrorKind::NotFound
    } else if text.contains("already exists") {
        ErrorKind::AlreadyExists
    } else if text.contains("is busy") {
        ErrorKind::Busy { holder: None }
    } else if text.contains("out of space") || text.contains("size is less than current used") {
        ErrorKind::NoSpace
    } else if text.contains("quota exceeded") {
        ErrorKind::QuotaExceeded
    } else {
        ErrorKind::Failed
    }
}

fn zfs<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<String> {
    command::run("zfs", args).map_err(|f| Error::new(classify(&f), f.to_string()))
}

/// Runs a `zfs` command, retrying while the dataset is busy (for at most [`BUSY_RETRY`]).
fn zfs_retrying_busy(args: &[&str]) -> Result<String> {
    let started = Instant::now();
    loop {
        match zfs(args) {
            Err(e)
                if matches!(e.kind, ErrorKind::Busy { .. }) && started.elapsed() < BUSY_RETRY =>
            {
                std::thread::sleep(Duration::from_millis(200))
            }
            other => return other,
        }
    }
}

/// The pool's space from the values of `available` and `used`, in that order.
fn pool_space_from<'a>(mut values: impl Iterator<Item = &'a str>) -> Result<PoolSpace> {
    let available = parse_u64("available", values.next().unwrap_or(""))?;
    let used = parse_u64("used", values.next().unwrap_or(""))?;
    Ok(PoolSpace {
        available,
        total: available.saturating_add(used),
        inodes_available: None,
        provisioned: None,
    })
}

fn parse_u64(what: &str, text: &str) -> Result<u64> {
    text.trim().parse().map_err(|_| {
        Error::new(
            ErrorKind::Failed,
            format!("zfs printed {text:?} for {what}, not a number"),
        )
    })
}

/// The volume a dataset below the parent (`leaf`: its name there) is a slot of.
fn volume_of(leaf: &str) -> String {
    match temporary_slot(leaf) {
        Some((volume, _)) => volume.as_str().to_owned(),
        None => leaf.to_owned(),
    }
}

/// The `-o` options of a volume made from a snapshot (`zfs clone`, `zfs recv`): legacy
/// mountpoint, writable, the properties every volume gets, and which image volume's content
/// it holds, if any.
fn volume_options(image: Option<&ImageKey>) -> Vec<String> {
    let mut options: Vec<String> = ["mountpoint=legacy", "readonly=off"]
        .into_iter()
        .chain(VOLUME_PROPERTIES)
        .flat_map(|property| ["-o".to_owned(), property.to_owned()])
        .collect();
    if let Some(key) = image {
        options.extend(["-o".to_owned(), format!("{IMAGE_PROPERTY}={key}")]);
    }
    options
}

impl ZfsDriver {
    /// A driver for the volumes under `parent`, which must be an existing filesystem dataset.
    pub fn open(
        parent: &str,
        quota: QuotaProperty,
        image_volumes: bool,
        image_clone: ImageClone,
        mount_dir: PathBuf,
    ) -> Result<ZfsDriver> {
        // The type and the space in one command: an operation asks for the space once,
        // before it changes anything.
        let out = match zfs(&["get", "-H", "-p", "-o", "value", "type,available,used", parent]) {
            Ok(out) => out,
            Err(e) if e.kind == ErrorKind::NotFound => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "the pool's dataset {parent} does not exist; create it (`zfs create -o mountpoint=none {parent}`) or fix `dataset` in the config"
                    ),
                ))
            }
            Err(e) => return Err(e),
        };
        let mut values = out.lines();
        let kind = values.next().unwrap_or("").trim();
        if kind != "filesystem" {
            return Err(Error::new(
                ErrorKind::Failed,
                format!("the pool's dataset {parent} is a {kind}, not a filesystem"),
            ));
        }
        let space = pool_space_from(values)?;
        Ok(ZfsDriver {
            parent: parent.to_owned(),
            quota,
            image_volumes,
            image_clone,
            mount_dir,
            listed: RefCell::new(None),
            written: Cell::new(false),
            space: Cell::new(Some(space)),
        })
    }

    /// Runs a `zfs` command that changes the pool (retrying while a dataset is busy, if
    /// asked); the listing is read again afterwards.
    fn change(&self, args: &[&str], retry_busy: bool) -> Result<String> {
        self.listed.replace(None);
        self.space.set(None);
        let out = if retry_busy {
            zfs_retrying_busy(args)
        } else {
            zfs(args)
        };
        self.listed.replace(None);
        out
    }

    /// The listing of the volume's three slots, read now unless the last one is of them
    /// (and, with `fresh_space`, nothing was written since).
    fn listing(&self, volume: &VolumeName, fresh_space: bool) -> Result<Listing> {
        let datasets: Vec<String> = SlotKind::ALL
            .iter()
            .map(|&kind| self.dataset(Slot { volume, kind }))
            .collect();
        if let Some(listed) = self.listed.borrow().as_ref() {
            if listed.of == datasets && !(fresh_space && self.written.get()) {
                return Ok(listed.clone());
            }
        }
        let listed = Listing::read(datasets, self.quota.name())?;
        self.written.set(false);
        self.listed.replace(Some(listed.clone()));
        Ok(listed)
    }

    fn leaf(slot: Slot<'_>) -> String {
        slot.physical_name()
    }

    fn dataset(&self, slot: Slot<'_>) -> String {
        format!("{}/{}", self.parent, Self::leaf(slot))
    }

    fn guard(&self, slot: Slot<'_>) -> String {
        format!("{}@{GUARD}", self.dataset(slot))
    }

    fn image_dataset(&self, key: &ImageKey, sealed: bool) -> String {
        format!("{}/{}", self.parent, image_name(key, sealed))
    }

    fn dataset_exists(&self, dataset: &str) -> Result<bool> {
        match zfs(&["list", "-H", "-o", "name", dataset]) {
            Ok(_) => Ok(true),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The directory a slot is mounted on while it is filled.
    fn mount_point(&self, slot: Slot<'_>, what: &str) -> PathBuf {
        self.mount_point_of(&format!("{}{what}", Self::leaf(slot)))
    }

    /// The directory the dataset `PARENT/leaf` is mounted on while it is filled.
    /// Makes the empty `slot` a writable clone of snapshot `origin` (an image volume's seal
    /// or a template's snapshot), with a volume's own properties (not `readonly=on`).
    fn clone_of(&self, origin: &str, slot: Slot<'_>, image: Option<&ImageKey>) -> Result<()> {
        let dataset = self.dataset(slot);
        let options = volume_options(image);
        let mut args = vec!["clone"];
        args.extend(options.iter().map(String::as_str));
        args.extend([origin, dataset.as_str()]);
        self.change(&args, false).map(drop)
    }

    /// Destroys the parked image volume whose seal is `origin` (a destroyed volume's
    /// origin), once no clone of it is left; anything else is left alone.
    fn destroy_parked_without_holders(&self, origin: &str) -> Result<()> {
        let Some((dataset, SEALED)) = origin.split_once('@') else {
            return Ok(());
        };
        let parked = dataset
            .strip_prefix(&format!("{}/", self.parent))
            .is_some_and(|leaf| leaf.starts_with(PARKED) && !leaf.contains('/'));
        if !parked {
            return Ok(());
        }
        let clones = match zfs(&["list", "-H", "-o", "clones", origin]) {
            Ok(out) => out,
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if !listing::clone_list(clones.trim()).is_empty() {
            return Ok(());
        }
        self.change(&["destroy", "-r", dataset], true).map(drop)
    }

    /// Makes the empty `slot` a copy of the image volume `key`'s seal `origin` that
    /// depends on nothing (`zfs send | zfs recv`), with a volume's own properties.
    fn copy_of(&self, origin: &str, slot: Slot<'_>, key: &ImageKey) -> Result<()> {
        let dataset = self.dataset(slot);
        let options = volume_options(Some(key));
        let mut recv = vec!["recv"];
        recv.extend(options.iter().map(String::as_str));
        recv.push(&dataset);
        self.listed.replace(None);
        self.space.set(None);
        command::run_piped(("zfs", &["send", origin]), ("zfs", &recv))
            .map_err(|f| Error::new(classify(&f), f.to_string()))?;
        // The received snapshot is the image volume's seal, not one of the volume's.
        self.change(&["destroy", &format!("{dataset}@{SEALED}")], true)
            .map(drop)
    }

    fn mount_point_of(&self, leaf: &str) -> PathBuf {
        self.mount_dir
            .join(format!("zfs-{}", self.parent.replace('/', "%")))
            .join(leaf)
    }

    /// Removes the directories the slot was mounted on, left empty by a process that was
    /// killed while it had the volume mounted (the kernel unmounted it, the directory stayed).
    fn forget_mount_points(&self, slot: Slot<'_>) {
        let _ = std::fs::remove_dir(self.mount_point(slot, "@guard"));
        let _ = std::fs::remove_dir(self.mount_point(slot, ""));
    }

    fn exists(&self, slot: Slot<'_>) -> Result<bool> {
        Ok(self.identity(slot)?.is_some())
    }

    fn require(&self, slot: Slot<'_>) -> Result<()> {
        if self.exists(slot)? {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::NotFound,
                format!("{slot} does not exist"),
            ))
        }
    }

    /// Every snapshot in the slot's subtree as `(name, clones)`, oldest first: from the
    /// listing unless datasets are nested below the slot.
    fn subtree_snapshots(&self, slot: Slot<'_>) -> Result<Vec<(String, Vec<String>)>> {
        let dataset = self.dataset(slot);
        if let Some(found) = self
            .listing(slot.volume, false)?
            .subtree_snapshots(&dataset)
        {
            return Ok(found);
        }
        let out = zfs(&[
            "list",
            "-H",
            "-p",
            "-t",
            "snapshot",
            "-r",
            "-s",
            "createtxg",
            "-o",
            "name,clones",
            &dataset,
        ])?;
        Ok(out
            .lines()
            .filter_map(|line| {
                let (name, clones) = line.split_once('\t')?;
                Some((name.to_owned(), listing::clone_list(clones)))
            })
            .collect())
    }

    /// The mounts of the slot's dataset (or of datasets below it) in this namespace.
    fn mounted_at(&self, slot: Slot<'_>) -> Result<Vec<PathBuf>> {
        self.mounts_of(&self.dataset(slot))
    }

    /// The mounts of `dataset` (or of datasets below it) in this namespace.
    fn mounts_of(&self, dataset: &str) -> Result<Vec<PathBuf>> {
        let dataset = dataset.to_owned();
        let below = format!("{dataset}/");
        Ok(mounts()
            .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?
            .into_iter()
            .filter(|m| m.fstype == "zfs" && (m.source == dataset || m.source.starts_with(&below)))
            .map(|m| m.mount_point)
            .collect())
    }
}

impl Driver for ZfsDriver {
    fn name(&self) -> &'static str {
        "zfs"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            snapshots: true,
            keep_snapshots: KeepSnapshots::Refill,
            size_counts_snapshots: self.quota == QuotaProperty::Quota,
            limit_reads_as_full: false,
            size_model: SizeModel::Quota,
            shrink: true,
            exchange: false,
            cheap_usage: true,
            image_volumes: self.image_volumes,
            templates: true,
            late_limit: true,
            size_counts_image: true,
            full_at_size: false,
        }
    }

    fn identity(&self, slot: Slot<'_>) -> Result<Option<String>> {
        let listing = self.listing(slot.volume, false)?;
        Ok(listing
            .filesystem(&self.dataset(slot))?
            .map(|row| row.guid.clone()))
    }

    fn identities(&self, volume: &VolumeName) -> Result<[Option<String>; 3]> {
        let listing = self.listing(volume, false)?;
        let mut found: [Option<String>; 3] = [None, None, None];
        for (i, kind) in SlotKind::ALL.into_iter().enumerate() {
            found[i] = listing
                .filesystem(&self.dataset(Slot { volume, kind }))?
                .map(|row| row.guid.clone());
        }
        Ok(found)
    }

    fn create(&self, slot: Slot<'_>, size: Option<u64>) -> Result<()> {
        let dataset = self.dataset(slot);
        let mut args = vec!["create".to_owned(), "-o".into(), "mountpoint=legacy".into()];
        for property in VOLUME_PROPERTIES {
            args.push("-o".into());
            args.push(property.into());
        }
        if let Some(bytes) = size {
            args.push("-o".into());
            args.push(format!("{}={}", self.quota.name(), bytes.max(MIN_QUOTA)));
        }
        args.push(dataset);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.change(&args, false).map(drop)
    }

    fn destroy(&self, slot: Slot<'_>, with_snapshots: bool) -> Result<()> {
        if !self.exists(slot)? {
            return Ok(());
        }
        let dataset = self.dataset(slot);
        let guard = self.guard(slot);
        let snapshots = self.subtree_snapshots(slot)?;
        let clones: Vec<String> = snapshots
            .iter()
            .flat_map(|(_, c)| c.iter())
            .filter(|c| !c.starts_with(&format!("{dataset}/")))
            .cloned()
            .collect();
        if !clones.is_empty() {
            return Err(Error::new(
                ErrorKind::HasClones(clones.clone()),
                format!(
                    "{slot} cannot be destroyed: {} are clones of its snapshots",
                    clones.join(", ")
                ),
            ));
        }
        let theirs: Vec<String> = snapshots
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| *name != guard)
            .collect();
        if !theirs.is_empty() && !with_snapshots {
            let names = theirs
                .iter()
                .map(|n| n.rsplit_once('@').map_or(n.as_str(), |(_, s)| s).to_owned())
                .collect();
            return Err(Error::new(
                ErrorKind::HasSnapshots(names),
                format!("{slot} has snapshots, which zfs destroys with it"),
            ));
        }
        let origin = self
            .listing(slot.volume, false)?
            .filesystem(&dataset)?
            .map(|row| row.origin.clone());
        for dir in self.mounted_at(slot)? {
            mount::unmount(&dir)?;
        }
        self.change(&["destroy", "-r", &dataset], true)?;
        self.forget_mount_points(slot);
        if let Some(origin) = origin {
            self.destroy_parked_without_holders(&origin)?;
        }
        Ok(())
    }

    fn snapshots(&self, slot: Slot<'_>) -> Result<Vec<String>> {
        let dataset = self.dataset(slot);
        let listing = self.listing(slot.volume, false)?;
        let snapshots = listing
            .snapshots(&dataset)
            .filter(|snap| *snap != GUARD)
            .map(str::to_owned)
            .collect();
        Ok(snapshots)
    }

    fn clones(&self, slot: Slot<'_>) -> Result<Vec<String>> {
        if !self.exists(slot)? {
            return Ok(Vec::new());
        }
        let dataset = self.dataset(slot);
        let below = format!("{dataset}/");
        Ok(self
            .subtree_snapshots(slot)?
            .into_iter()
            .flat_map(|(_, c)| c)
            .filter(|c| !c.starts_with(&below))
            .collect())
    }

    fn rename(&self, from: Slot<'_>, to: Slot<'_>) -> Result<()> {
        self.forget_mount_points(from);
        let (a, b) = (self.dataset(from), self.dataset(to));
        // A rename changes names only (guids, sizes and snapshots stay): the listing is
        // brought up to date here rather than read again.
        let listed = self.listed.take();
        let renamed = zfs_retrying_busy(&["rename", &a, &b]);
        if let (Ok(_), Some(mut listing)) = (&renamed, listed) {
            listing.renamed(&a, &b);
            self.listed.replace(Some(listing));
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
            "zfs cannot exchange two datasets atomically",
        ))
    }

    fn usage(&self, slot: Slot<'_>) -> Result<Usage> {
        let listing = self.listing(slot.volume, true)?;
        let row = listing
            .filesystem(&self.dataset(slot))?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{slot} does not exist")))?;
        let size = parse_u64(self.quota.name(), &row.limit)?;
        let used = match self.quota {
            QuotaProperty::RefQuota => parse_u64("referenced", &row.referenced)?,
            QuotaProperty::Quota => parse_u64("used", &row.used)?,
        };
        Ok(Usage {
            size: (size > 0).then_some(size),
            used,
            inodes: None,
        })
    }

    fn set_size(&self, slot: Slot<'_>, bytes: u64) -> Result<()> {
        let dataset = self.dataset(slot);
        let value = if bytes == 0 {
            "none".to_owned()
        } else {
            bytes.max(MIN_QUOTA).to_string()
        };
        let property = format!("{}={value}", self.quota.name());
        self.change(&["set", &property, &dataset], false).map(drop)
    }

    fn pool_space(&self) -> Result<PoolSpace> {
        if let Some(space) = self.space.get() {
            return Ok(space);
        }
        let out = zfs(&[
            "get",
            "-H",
            "-p",
            "-o",
            "value",
            "available,used",
            &self.parent,
        ])?;
        pool_space_from(out.lines())
    }

    fn open_root(&self, slot: Slot<'_>) -> Result<Mounted> {
        self.require(slot)?;
        self.written.set(true);
        self.space.set(None);
        mount::mount_for_filling(
            &self.dataset(slot),
            "zfs",
            self.mount_point(slot, ""),
            false,
        )
    }

    fn busy(&self, slot: Slot<'_>) -> Result<Option<String>> {
        let Some(dir) = self.mounted_at(slot)?.into_iter().next() else {
            return Ok(None);
        };
        reimage_driver::holder_of_mount(&dir)
            .map(Some)
            .map_err(|e| Error::io("scanning /proc", e))
    }

    fn leftovers(&self) -> Result<Vec<(VolumeName, SlotKind)>> {
        let out = zfs(&[
            "list",
            "-H",
            "-p",
            "-t",
            "filesystem",
            "-d",
            "1",
            "-o",
            "name",
            &self.parent,
        ])?;
        let parent = format!("{}/", self.parent);
        let mut found: Vec<(VolumeName, SlotKind)> = out
            .lines()
            .filter_map(|name| name.strip_prefix(&parent))
            .filter_map(reimage_driver::temporary_slot)
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    fn set_guard(&self, slot: Slot<'_>) -> Result<()> {
        // The refilled content needs what a new dataset gets (one made before may lack it).
        let dataset = self.dataset(slot);
        let mut args = vec!["set"];
        args.extend(VOLUME_PROPERTIES);
        args.push(&dataset);
        self.change(&args, false)?;
        self.change(&["snapshot", &self.guard(slot)], false)
            .map(drop)
    }

    fn has_guard(&self, slot: Slot<'_>) -> Result<bool> {
        let dataset = self.dataset(slot);
        let listing = self.listing(slot.volume, false)?;
        let found = listing.snapshots(&dataset).any(|snap| snap == GUARD);
        Ok(found)
    }

    fn roll_back_to_guard(&self, slot: Slot<'_>) -> Result<()> {
        if !self.has_guard(slot)? {
            return Ok(());
        }
        for dir in self.mounted_at(slot)? {
            mount::unmount(&dir)?;
        }
        // Without -r: a snapshot somebody took after the guard is never destroyed; the
        // rollback then fails and says so.
        self.change(&["rollback", &self.guard(slot)], true)?;
        self.forget_mount_points(slot);
        self.drop_guard(slot)
    }

    fn drop_guard(&self, slot: Slot<'_>) -> Result<()> {
        if !self.has_guard(slot)? {
            return Ok(());
        }
        // Refilled: a clone of an image volume no longer holds its content (set before the
        // guard goes, so that a crash in between leaves the same answer to recovery).
        let dataset = self.dataset(slot);
        let listing = self.listing(slot.volume, false)?;
        let holds_an_image = listing
            .filesystem(&dataset)?
            .is_some_and(|row| row.image != "-" && row.image != "none");
        if holds_an_image {
            self.change(&["set", &format!("{IMAGE_PROPERTY}=none"), &dataset], false)?;
        }
        self.change(&["destroy", &self.guard(slot)], true).map(drop)
    }

    fn open_guard(&self, slot: Slot<'_>) -> Result<Mounted> {
        mount::mount_for_filling(
            &self.guard(slot),
            "zfs",
            self.mount_point(slot, "@guard"),
            true,
        )
    }

    fn create_image(&self, key: &ImageKey, _size: Option<u64>) -> Result<()> {
        let dataset = self.image_dataset(key, false);
        let mut args = vec!["create", "-o", "mountpoint=legacy"];
        for property in VOLUME_PROPERTIES {
            args.extend(["-o", property]);
        }
        args.push(&dataset);
        self.change(&args, false).map(drop)
    }

    fn open_image(&self, key: &ImageKey) -> Result<Mounted> {
        let dataset = self.image_dataset(key, false);
        self.space.set(None);
        let dir = self.mount_point_of(&image_name(key, false));
        mount::mount_for_filling(&dataset, "zfs", dir, false)
    }

    fn seal_image(&self, building: &ImageKey, key: &ImageKey) -> Result<()> {
        let (unsealed, sealed) = (
            self.image_dataset(building, false),
            self.image_dataset(key, true),
        );
        for dir in self.mounts_of(&unsealed)? {
            mount::unmount(&dir)?;
        }
        let _ = std::fs::remove_dir(self.mount_point_of(&image_name(building, false)));
        self.change(&["snapshot", &format!("{unsealed}@{SEALED}")], false)?;
        self.change(&["set", "readonly=on", &unsealed], false)?;
        // The rename is the seal: under the unsealed name it is still a leftover.
        self.change(&["rename", &unsealed, &sealed], true).map(drop)
    }

    fn clone_snapshot(&self, template: &VolumeName, snapshot: &str, slot: Slot<'_>) -> Result<()> {
        let live = Slot::live(template);
        if !self.exists(live)? {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("template volume {template} does not exist"),
            ));
        }
        if !self.snapshots(live)?.iter().any(|s| s == snapshot) {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("volume {template} has no snapshot {snapshot}"),
            ));
        }
        let origin = format!("{}@{snapshot}", self.dataset(live));
        self.clone_of(&origin, slot, None)
    }

    fn clone_image(&self, key: &ImageKey, slot: Slot<'_>) -> Result<Cloned> {
        let origin = format!("{}@{SEALED}", self.image_dataset(key, true));
        match self.image_clone {
            ImageClone::Clone => self.clone_of(&origin, slot, Some(key))?,
            ImageClone::Copy => self.copy_of(&origin, slot, key)?,
        }
        Ok(Cloned::Whole)
    }

    fn images(&self) -> Result<Vec<ImageVolume>> {
        let fields = format!("name,clones,{IMAGE_PROPERTY}");
        let out = zfs(&[
            "list",
            "-H",
            "-p",
            "-r",
            "-d",
            "2",
            "-t",
            "filesystem,snapshot",
            "-o",
            &fields,
            &self.parent,
        ])?;
        let rows: Vec<[&str; 3]> = out
            .lines()
            .map(|line| {
                let mut f = line.split('\t');
                [
                    f.next().unwrap_or(""),
                    f.next().unwrap_or(""),
                    f.next().unwrap_or("-"),
                ]
            })
            .collect();
        let holds = |dataset: &str| {
            rows.iter()
                .find(|[name, ..]| *name == dataset)
                .map_or("-", |[.., image]| *image)
        };
        let below = format!("{}/", self.parent);
        let mut found: Vec<ImageVolume> = Vec::new();
        for [name, clones, _] in &rows {
            let Some(leaf) = name.strip_prefix(&below) else {
                continue;
            };
            match leaf.split_once('@') {
                None => {
                    if let Some((key, sealed)) = parse_image_name(leaf) {
                        found.push(ImageVolume {
                            key,
                            sealed,
                            clones: Vec::new(),
                            holders: Vec::new(),
                        });
                    }
                }
                Some((dataset, SEALED)) => {
                    let Some((key, sealed)) = parse_image_name(dataset) else {
                        continue;
                    };
                    let Some(image) = found
                        .iter_mut()
                        .find(|i| i.key == key && i.sealed == sealed)
                    else {
                        continue;
                    };
                    for clone in listing::clone_list(clones) {
                        let Some(leaf) = clone.strip_prefix(&below) else {
                            continue;
                        };
                        let volume = volume_of(leaf);
                        // Unset: a clone made before the property was, taken as holding it.
                        let held = holds(&clone);
                        let list = if held == "-" || held == key.as_str() {
                            &mut image.clones
                        } else {
                            &mut image.holders
                        };
                        if !list.contains(&volume) {
                            list.push(volume);
                        }
                    }
                    image.clones.sort();
                    image.holders.sort();
                }
                Some(_) => {}
            }
        }
        // Copies (`zfs_clone = "copy"`) depend on nothing; the property says what they hold.
        for [name, _, held] in &rows {
            let Some(leaf) = name.strip_prefix(&below) else {
                continue;
            };
            if leaf.contains(['/', '@']) {
                continue;
            }
            let Some(image) = found
                .iter_mut()
                .find(|i| i.sealed && i.key.as_str() == *held)
            else {
                continue;
            };
            let volume = volume_of(leaf);
            if !image.clones.contains(&volume) {
                image.clones.push(volume);
                image.clones.sort();
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    fn park_image(&self, key: &ImageKey) -> Result<()> {
        let dataset = self.image_dataset(key, true);
        let guid = zfs(&["get", "-H", "-p", "-o", "value", "guid", &dataset])?;
        let parked = format!("{}/{PARKED}{}", self.parent, guid.trim());
        self.change(&["rename", &dataset, &parked], true).map(drop)
    }

    fn destroy_image(&self, key: &ImageKey, sealed: bool) -> Result<()> {
        let dataset = self.image_dataset(key, sealed);
        if !self.dataset_exists(&dataset)? {
            return Ok(());
        }
        for dir in self.mounts_of(&dataset)? {
            mount::unmount(&dir)?;
        }
        self.change(&["destroy", "-r", &dataset], true)
            .map(drop)
            .map_err(|e| {
                if e.message.contains("dependent clones") {
                    Error::new(ErrorKind::HasClones(Vec::new()), e.message)
                } else {
                    e
                }
            })
    }
}
