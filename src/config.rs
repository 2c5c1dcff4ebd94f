//! The root-owned configuration and the policy it sets.
//!
//! The config is what makes `sudo reimage` safe to hand out: a request may only name pools
//! the config defines, with the driver the config gives them, and images inside the
//! directories it allows. So the file and every directory above it must be root's and not
//! writable by anyone else (`config_insecure`), and image paths are resolved without letting a
//! symlink lead out of the allowed directories (`policy_denied`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use reimage_driver::VolumeName;
use reimage_driver_lvm::Fs;
use reimage_driver_zfs::{ImageClone, QuotaProperty};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use serde::Deserialize;

use crate::error::{Code, Error, Result};

pub const DEFAULT_CONFIG: &str = "/etc/reimage/config.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/reimage";
/// Where block- and dataset-backed volumes are mounted while reimage fills them, unless the
/// pool's `mount_dir` says otherwise.
pub const DEFAULT_MOUNT_DIR: &str = "/run/reimage/mnt";
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    Dir,
    Btrfs,
    Zfs,
    Lvm,
    Overlay,
}

impl DriverKind {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "dir" => Some(DriverKind::Dir),
            "btrfs" => Some(DriverKind::Btrfs),
            "zfs" => Some(DriverKind::Zfs),
            "lvm" => Some(DriverKind::Lvm),
            "overlay" => Some(DriverKind::Overlay),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Dir => "dir",
            DriverKind::Btrfs => "btrfs",
            DriverKind::Zfs => "zfs",
            DriverKind::Lvm => "lvm",
            DriverKind::Overlay => "overlay",
        }
    }
}

/// One pool as the config defines it, validated once: its name and its driver's section.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub name: String,
    pub spec: PoolSpec,
}

/// A pool's driver and everything that driver needs, each field checked when the config
/// was loaded. A new driver is one more variant.
#[derive(Clone, Debug, PartialEq)]
pub enum PoolSpec {
    /// Each volume a directory in `path`; `quota`: a project quota per volume;
    /// `image_volumes` (only where the filesystem has reflinks, checked when the pool is
    /// opened): each image unpacked once into an image volume that volumes are reflink
    /// copies of.
    Dir {
        path: PathBuf,
        quota: bool,
        image_volumes: bool,
    },
    /// Each volume a subvolume in `path`; `quota`: qgroup limits; `image_volumes`: each
    /// image unpacked once into an image volume that volumes are snapshots of.
    Btrfs {
        path: PathBuf,
        quota: bool,
        image_volumes: bool,
    },
    /// Each volume a dataset below `dataset`, limited by `quota_property`, mounted in
    /// `mount_dir` while it is filled.
    Zfs {
        dataset: String,
        quota_property: QuotaProperty,
        /// Each image unpacked once into an image volume that volumes are clones of.
        image_volumes: bool,
        /// How a volume is made from an image volume: a `zfs clone`, or a copy.
        image_clone: ImageClone,
        mount_dir: PathBuf,
    },
    /// Each volume an overlayfs upper layer in `path` over an image volume beside it;
    /// `quota`: a project quota per upper layer. It always keeps image volumes.
    Overlay { path: PathBuf, quota: bool },
    /// Each volume an LV in `vg` (thin in `thin_pool` when set) holding `fs`;
    /// `image_volumes` (thin pools only): each image unpacked once into a thin LV that
    /// volumes are thin snapshots of.
    Lvm {
        vg: String,
        thin_pool: Option<String>,
        fs: Fs,
        image_volumes: bool,
        mount_dir: PathBuf,
    },
}

impl Pool {
    pub fn driver(&self) -> DriverKind {
        match self.spec {
            PoolSpec::Dir { .. } => DriverKind::Dir,
            PoolSpec::Btrfs { .. } => DriverKind::Btrfs,
            PoolSpec::Zfs { .. } => DriverKind::Zfs,
            PoolSpec::Lvm { .. } => DriverKind::Lvm,
            PoolSpec::Overlay { .. } => DriverKind::Overlay,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub state_dir: PathBuf,
    /// How long a storage program (`zfs`, `lvm`, `mkfs`, ...) may run before it is killed.
    pub command_timeout: std::time::Duration,
    /// The syslog socket the audit record goes to; `None`: no audit record.
    pub audit_socket: Option<PathBuf>,
    pub image_roots: Vec<PathBuf>,
    pub pools: BTreeMap<String, Pool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireConfig {
    state_dir: Option<PathBuf>,
    /// Seconds.
    command_timeout: Option<u64>,
    images: Option<WireImages>,
    audit: Option<WireAudit>,
    #[serde(default)]
    pools: BTreeMap<String, WirePool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireAudit {
    syslog: Option<bool>,
    socket: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireImages {
    #[serde(default)]
    allow: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WirePool {
    driver: String,
    path: Option<PathBuf>,
    dataset: Option<String>,
    vg: Option<String>,
    thin_pool: Option<String>,
    fs: Option<String>,
    mount_dir: Option<PathBuf>,
    quota: Option<bool>,
    quota_property: Option<String>,
    image_volumes: Option<bool>,
    zfs_clone: Option<String>,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(Code::ConfigInvalid, message)
}

/// A TOML syntax or type error, with where it is: `details.line` and `details.column` (both
/// from 1, the column in characters) when the parser knows the place.
fn syntax_error(text: &str, e: &toml::de::Error) -> Error {
    let message = e.message().trim_end().to_owned();
    let Some(span) = e.span() else {
        return invalid(message);
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    invalid(format!("line {line}, column {column}: {message}"))
        .with("line", line)
        .with("column", column)
}

/// `true` when `mode` lets someone other than the owner change the directory's entries.
/// A root-owned sticky directory (like /tmp) is tolerated: others cannot rename or remove
/// root's entries in it.
fn dir_is_safe(meta: &std::fs::Metadata) -> bool {
    let mode = meta.mode();
    meta.uid() == 0 && (mode & 0o022 == 0 || mode & 0o1000 != 0)
}

/// Checks that `path` (already canonical) and every directory above it are root's and not
/// writable by group or others.
fn check_ownership(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    let insecure = |what: &Path, why: &str| {
        Error::new(
            Code::ConfigInsecure,
            format!(
                "{} {why}; the config and every directory above it must be owned by root and not \
                 writable by group or others (fix: chown root:root, chmod go-w)",
                what.display()
            ),
        )
        .with("path", what.display().to_string())
    };
    if meta.uid() != 0 {
        return Err(insecure(path, &format!("is owned by uid {}", meta.uid())));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(insecure(
            path,
            &format!("has mode {:o}", meta.mode() & 0o7777),
        ));
    }
    for dir in path.ancestors().skip(1) {
        let m = std::fs::metadata(dir)
            .map_err(|e| insecure(dir, &format!("cannot be checked ({e})")))?;
        if !dir_is_safe(&m) {
            return Err(insecure(
                dir,
                &format!(
                    "is owned by uid {} with mode {:o}",
                    m.uid(),
                    m.mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

impl Config {
    /// Reads and validates the config at `path`, checking its ownership first.
    pub fn load(path: &Path) -> Result<Config> {
        let canonical = std::fs::canonicalize(path).map_err(|e| {
            invalid(format!(
                "cannot read the config {}: {e}; create it (see the README) or pass --config",
                path.display()
            ))
        })?;
        let mut file = File::open(&canonical)
            .map_err(|e| invalid(format!("cannot open {}: {e}", canonical.display())))?;
        let meta = file
            .metadata()
            .map_err(|e| invalid(format!("cannot stat {}: {e}", canonical.display())))?;
        if !meta.is_file() {
            return Err(invalid(format!(
                "{} is not a regular file",
                canonical.display()
            )));
        }
        check_ownership(&canonical, &meta)?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(invalid(format!(
                "{} is larger than 1 MiB",
                canonical.display()
            )));
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| invalid(format!("cannot read {}: {e}", canonical.display())))?;
        Config::parse(&text).map_err(|e| {
            e.context(canonical.display())
                .with("path", canonical.display().to_string())
        })
    }

    /// Parses config text (no ownership checks; [`Config::load`] does those).
    pub fn parse(text: &str) -> Result<Config> {
        let wire: WireConfig = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        let state_dir = wire
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(invalid("state_dir must be an absolute path"));
        }
        let command_timeout =
            match wire.command_timeout {
                None => reimage_driver::command::DEFAULT_TIMEOUT,
                Some(0) => return Err(invalid(
                    "command_timeout must be at least 1 (seconds); leave it out for the default",
                )),
                Some(seconds) => std::time::Duration::from_secs(seconds),
            };
        let audit_socket = match wire.audit {
            Some(WireAudit {
                syslog: Some(false),
                ..
            }) => None,
            Some(WireAudit {
                socket: Some(socket),
                ..
            }) => {
                if !socket.is_absolute() {
                    return Err(invalid("audit.socket must be an absolute path"));
                }
                Some(socket)
            }
            _ => Some(PathBuf::from(crate::audit::DEFAULT_SOCKET)),
        };
        let image_roots = wire.images.map(|i| i.allow).unwrap_or_default();
        for root in &image_roots {
            if !root.is_absolute() {
                return Err(invalid(format!(
                    "images.allow entry {} must be absolute",
                    root.display()
                )));
            }
        }
        let mut pools = BTreeMap::new();
        for (name, p) in wire.pools {
            pools.insert(name.clone(), Config::pool(name, p)?);
        }
        Ok(Config {
            state_dir,
            command_timeout,
            audit_socket,
            image_roots,
            pools,
        })
    }

    fn pool(name: String, p: WirePool) -> Result<Pool> {
        VolumeName::parse(&name).map_err(|e| invalid(format!("pool name {name:?}: {e}")))?;
        let driver = DriverKind::parse(&p.driver).ok_or_else(|| {
            invalid(format!(
                "pools.{name}.driver {:?} is not one of dir, btrfs, zfs, lvm, overlay",
                p.driver
            ))
        })?;
        let needed = |value: Option<PathBuf>, field: &str| -> Result<PathBuf> {
            value.ok_or_else(|| {
                invalid(format!(
                    "pools.{name} (driver {}) needs `{field}`",
                    driver.as_str()
                ))
            })
        };
        let not_for = |set: bool, field: &str| -> Result<()> {
            if set {
                return Err(invalid(format!(
                    "pools.{name}: `{field}` does not apply to the {} driver",
                    driver.as_str()
                )));
            }
            Ok(())
        };
        for (what, path) in [("path", &p.path), ("mount_dir", &p.mount_dir)] {
            if path.as_ref().is_some_and(|path| !path.is_absolute()) {
                return Err(invalid(format!(
                    "pools.{name}.{what} must be an absolute path"
                )));
            }
        }
        let mount_dir = || {
            p.mount_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MOUNT_DIR))
        };
        let spec = match driver {
            DriverKind::Dir | DriverKind::Btrfs | DriverKind::Overlay => {
                for (set, field) in [
                    (p.dataset.is_some(), "dataset"),
                    (p.quota_property.is_some(), "quota_property"),
                    (p.vg.is_some(), "vg"),
                    (p.thin_pool.is_some(), "thin_pool"),
                    (p.fs.is_some(), "fs"),
                    (p.mount_dir.is_some(), "mount_dir"),
                    (p.zfs_clone.is_some(), "zfs_clone"),
                ] {
                    not_for(set, field)?;
                }
                let path = needed(p.path.clone(), "path")?;
                let quota = p.quota.unwrap_or(false);
                if driver == DriverKind::Dir {
                    PoolSpec::Dir {
                        path,
                        quota,
                        image_volumes: p.image_volumes.unwrap_or(false),
                    }
                } else if driver == DriverKind::Overlay {
                    if p.image_volumes == Some(false) {
                        return Err(invalid(format!(
                            "pools.{name}: an overlay pool always keeps image volumes (they are its volumes' lower layers); remove `image_volumes = false`"
                        )));
                    }
                    if let Some(why) = reimage_driver_overlay::unusable_path(&path) {
                        return Err(invalid(format!("pools.{name}.path: {why}")));
                    }
                    PoolSpec::Overlay { path, quota }
                } else {
                    PoolSpec::Btrfs {
                        path,
                        quota,
                        image_volumes: p.image_volumes.unwrap_or(true),
                    }
                }
            }
            DriverKind::Zfs => {
                for (set, field) in [
                    (p.path.is_some(), "path"),
                    (p.quota.is_some(), "quota"),
                    (p.vg.is_some(), "vg"),
                    (p.thin_pool.is_some(), "thin_pool"),
                    (p.fs.is_some(), "fs"),
                ] {
                    not_for(set, field)?;
                }
                let dataset = p
                    .dataset
                    .clone()
                    .ok_or_else(|| invalid(format!("pools.{name} (driver zfs) needs `dataset`")))?;
                reimage_driver_zfs::check_parent_dataset(&dataset).map_err(|why| {
                    invalid(format!(
                        "pools.{name}.dataset {dataset:?} {why} (e.g. \"tank/reimage\")"
                    ))
                })?;
                let quota_property = match p.quota_property.as_deref() {
                    None => QuotaProperty::RefQuota,
                    Some(text) => QuotaProperty::parse(text).ok_or_else(|| {
                        invalid(format!(
                            "pools.{name}.quota_property {text:?} is not refquota or quota"
                        ))
                    })?,
                };
                // A zfs `quota` on a clone counts only what the clone adds, not the blocks
                // it shares with its image volume: sizes would not read as for an unpacked
                // volume, so image volumes go with `refquota` only.
                let refquota = quota_property == QuotaProperty::RefQuota;
                if p.image_volumes == Some(true) && !refquota {
                    return Err(invalid(format!(
                        "pools.{name}: image_volumes needs quota_property = \"refquota\" (a zfs quota does not count the blocks a clone shares with its image volume)"
                    )));
                }
                let image_volumes = p.image_volumes.unwrap_or(refquota);
                let image_clone = match p.zfs_clone.as_deref() {
                    None => ImageClone::Clone,
                    Some(_) if !image_volumes => {
                        return Err(invalid(format!(
                        "pools.{name}.zfs_clone: the pool keeps no image volumes to clone or copy"
                    )))
                    }
                    Some(text) => ImageClone::parse(text).ok_or_else(|| {
                        invalid(format!(
                            "pools.{name}.zfs_clone {text:?} is not \"clone\" or \"copy\""
                        ))
                    })?,
                };
                PoolSpec::Zfs {
                    dataset,
                    quota_property,
                    image_volumes,
                    image_clone,
                    mount_dir: mount_dir(),
                }
            }
            DriverKind::Lvm => {
                for (set, field) in [
                    (p.path.is_some(), "path"),
                    (p.quota.is_some(), "quota"),
                    (p.dataset.is_some(), "dataset"),
                    (p.quota_property.is_some(), "quota_property"),
                    (p.zfs_clone.is_some(), "zfs_clone"),
                ] {
                    not_for(set, field)?;
                }
                let vg =
                    p.vg.clone()
                        .ok_or_else(|| invalid(format!("pools.{name} (driver lvm) needs `vg`")))?;
                for (what, value) in [("vg", Some(&vg)), ("thin_pool", p.thin_pool.as_ref())] {
                    if let Some(value) = value {
                        reimage_driver_lvm::check_name(value).map_err(|why| {
                            invalid(format!("pools.{name}.{what} {value:?} {why}"))
                        })?;
                    }
                }
                let fs = match p.fs.as_deref() {
                    None => Fs::Ext4,
                    Some(text) => Fs::parse(text).ok_or_else(|| {
                        invalid(format!("pools.{name}.fs {text:?} is not ext4 or xfs"))
                    })?,
                };
                // A thick LV has no cheap clone: every volume would copy its image volume
                // whole, which costs what unpacking does and takes the space twice.
                if p.image_volumes == Some(true) && p.thin_pool.is_none() {
                    return Err(invalid(format!(
                        "pools.{name}: image_volumes needs a thin pool (`thin_pool`): thick LVs have no copy-on-write clones"
                    )));
                }
                PoolSpec::Lvm {
                    vg,
                    image_volumes: p.image_volumes.unwrap_or(p.thin_pool.is_some()),
                    thin_pool: p.thin_pool.clone(),
                    fs,
                    mount_dir: mount_dir(),
                }
            }
        };
        Ok(Pool { name, spec })
    }

    /// The pool a request names, checked against the driver in argv.
    pub fn pool_for(&self, name: &str, argv_driver: DriverKind) -> Result<&Pool> {
        let pool = self.pools.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.pools.keys().map(String::as_str).collect();
            Error::new(
                Code::UnknownPool,
                format!(
                    "no pool {name:?} in the config (pools: {})",
                    known.join(", ")
                ),
            )
            .with("pool", name)
        })?;
        if pool.driver() != argv_driver {
            return Err(Error::new(
                Code::PolicyDenied,
                format!(
                    "pool {name:?} uses the {} driver, but this reimage was started as `reimage {}`",
                    pool.driver().as_str(),
                    argv_driver.as_str()
                ),
            ));
        }
        Ok(pool)
    }

    /// Opens an image the request names, if policy allows it: the path must lie inside one of
    /// `images.allow` both as written and once every symlink is resolved. The file is opened
    /// by its resolved path with symlinks forbidden, so a swap after the check cannot lead out.
    pub fn open_image(&self, requested: &Path) -> Result<(File, PathBuf)> {
        let deny = |why: String| {
            Error::new(Code::PolicyDenied, why).with("image", requested.display().to_string())
        };
        let lexical = lexical_normal(requested).ok_or_else(|| {
            deny(format!(
                "image path {} must be absolute without '..'",
                requested.display()
            ))
        })?;
        let roots: Vec<PathBuf> = self
            .image_roots
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok().map(|c| (r, c)))
            .flat_map(|(r, c)| [r.clone(), c])
            .collect();
        if !roots.iter().any(|root| lexical.starts_with(root)) {
            return Err(deny(format!(
                "image {} is not inside an allowed image directory (images.allow: {})",
                requested.display(),
                self.image_roots
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let canonical = std::fs::canonicalize(&lexical).map_err(|e| {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                Code::NotFound
            } else {
                Code::ImageInvalid
            };
            Error::new(
                code,
                format!("cannot open image {}: {e}", requested.display()),
            )
        })?;
        let canonical_roots: Vec<PathBuf> = self
            .image_roots
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .collect();
        if !canonical_roots
            .iter()
            .any(|root| canonical.starts_with(root))
        {
            return Err(deny(format!(
                "image {} resolves to {}, outside every allowed image directory (a symlink leads out)",
                requested.display(),
                canonical.display()
            )));
        }
        let fd = rustix::fs::openat2(
            rustix::fs::CWD,
            &canonical,
            OFlags::RDONLY | OFlags::NOCTTY | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| {
            Error::new(
                Code::ImageInvalid,
                format!("cannot open image {}: {e}", canonical.display()),
            )
        })?;
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| Error::new(Code::ImageInvalid, format!("cannot stat image: {e}")))?;
        if !meta.is_file() {
            return Err(Error::new(
                Code::ImageInvalid,
                format!("image {} is not a regular file", canonical.display()),
            ));
        }
        // Reads must block normally; O_NONBLOCK only kept a fifo from hanging the open.
        rustix::fs::fcntl_setfl(&file, OFlags::empty())
            .map_err(|e| Error::new(Code::ImageInvalid, format!("cannot use image: {e}")))?;
        Ok((file, canonical))
    }
}

/// `path` with `.` and empty components removed; `None` if it is relative or has `..`.
fn lexical_normal(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    /// `examples/config.toml` is what the package installs as `/etc/reimage/config.toml`: it
    /// parses as shipped (no pool), and with every example pool uncommented.
    #[test]
    fn the_example_config_parses_as_shipped_and_with_every_example() {
        let text = include_str!("../examples/config.toml");
        let shipped = Config::parse(text).unwrap();
        assert!(shipped.pools.is_empty());
        let is_setting = |line: &str| {
            line.split_once(" = ").is_some_and(|(key, _)| {
                !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            })
        };
        let uncommented: Vec<&str> = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.starts_with("[pools.") || is_setting(rest) => rest,
                _ => line,
            })
            .collect();
        let all = Config::parse(&uncommented.join("\n")).unwrap();
        let names: Vec<&str> = all.pools.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["default", "fast", "layers", "limited", "tank", "vms"]
        );
    }

    use super::*;

    #[test]
    fn a_full_config() {
        let c = Config::parse(
            r#"
            state_dir = "/var/lib/reimage"
            [images]
            allow = ["/var/lib/reimage/images"]
            [pools.default]
            driver = "btrfs"
            path = "/srv/reimage/default"
            quota = true
            [pools.fast]
            driver = "lvm"
            vg = "vg0"
            thin_pool = "pool"
            mount_dir = "/run/reimage/mnt"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.pools["default"].spec,
            PoolSpec::Btrfs {
                path: "/srv/reimage/default".into(),
                quota: true,
                image_volumes: true,
            }
        );
        assert!(matches!(
            c.pools["fast"].spec,
            PoolSpec::Lvm {
                fs: Fs::Ext4,
                image_volumes: true,
                ..
            }
        ));
        assert!(c.pool_for("default", DriverKind::Btrfs).is_ok());
        assert_eq!(
            c.pool_for("default", DriverKind::Zfs).unwrap_err().code,
            Code::PolicyDenied
        );
        assert_eq!(
            c.pool_for("nope", DriverKind::Btrfs).unwrap_err().code,
            Code::UnknownPool
        );
    }

    #[test]
    fn invalid_configs() {
        for text in [
            "bogus = 1",
            "[pools.a]\ndriver = \"ext9\"\npath = \"/x\"",
            "[pools.a]\ndriver = \"dir\"",
            "[pools.a]\ndriver = \"dir\"\npath = \"rel\"",
            "[pools.a]\ndriver = \"dir\"\npath = \"/x\"\nvg = \"v\"",
            "[pools.a]\ndriver = \"zfs\"",
            "[pools.\"-x\"]\ndriver = \"dir\"\npath = \"/x\"",
            "[pools.a]\ndriver = \"lvm\"\nvg = \"v\"\nmount_dir = \"/m\"\nfs = \"btrfs\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"-o\"",
            "[pools.a]\ndriver = \"lvm\"\nvg = \"v\"\nimage_volumes = true",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank/r\"\nzfs_clone = \"send\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank/r\"\nimage_volumes = false\nzfs_clone = \"copy\"",
            "[pools.a]\ndriver = \"btrfs\"\npath = \"/x\"\nzfs_clone = \"copy\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank//x\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank/../x\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank/a b\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank/x@snap\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank\"\nquota_property = \"reservation\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank\"\npath = \"/x\"",
            "[pools.a]\ndriver = \"dir\"\npath = \"/x\"\nquota_property = \"quota\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank/r\"\nquota_property = \"quota\"\nimage_volumes = true",
            "[pools.a]\ndriver = \"lvm\"\nvg = \"-o\"",
            "[pools.a]\ndriver = \"lvm\"\nvg = \"vg0\"\nthin_pool = \"a b\"",
            "[pools.a]\ndriver = \"lvm\"\nvg = \"vg0\"\nmount_dir = \"rel\"",
            "state_dir = \"rel\"",
            "[pools.a]\ndriver = \"dir\"\npath = \"/x\"\nextra = 1",
        ] {
            let e = Config::parse(text).unwrap_err();
            assert_eq!(e.code, Code::ConfigInvalid, "{text}");
        }
    }

    #[test]
    fn syntax_errors_say_where() {
        let e =
            Config::parse("[pools.a]\ndriver = \"dir\"\npath = \"/x\"\nextra = 1\n").unwrap_err();
        assert_eq!(e.code, Code::ConfigInvalid);
        assert_eq!(
            e.details.get("line").and_then(|v| v.as_u64()),
            Some(4),
            "{e}"
        );
        assert_eq!(
            e.details.get("column").and_then(|v| v.as_u64()),
            Some(1),
            "{e}"
        );
        assert!(e.message.contains("extra"), "{e}");
        let e = Config::parse("state_dir = \"/x\"\n[pools.a]\ndriver = dir\n").unwrap_err();
        assert_eq!(
            e.details.get("line").and_then(|v| v.as_u64()),
            Some(3),
            "{e}"
        );
        assert_eq!(
            e.details.get("column").and_then(|v| v.as_u64()),
            Some(10),
            "{e}"
        );
    }

    #[test]
    fn lexical_paths() {
        assert_eq!(
            lexical_normal(Path::new("/a/./b//c")),
            Some(PathBuf::from("/a/b/c"))
        );
        assert_eq!(lexical_normal(Path::new("/a/../b")), None);
        assert_eq!(lexical_normal(Path::new("a")), None);
    }
}
