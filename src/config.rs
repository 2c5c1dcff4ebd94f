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
use rustix::fs::{Mode, OFlags, ResolveFlags};
use serde::Deserialize;

use crate::error::{Code, Error, Result};

pub const DEFAULT_CONFIG: &str = "/etc/reimage/config.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/reimage";
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    Dir,
    Btrfs,
    Zfs,
    Lvm,
}

impl DriverKind {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "dir" => Some(DriverKind::Dir),
            "btrfs" => Some(DriverKind::Btrfs),
            "zfs" => Some(DriverKind::Zfs),
            "lvm" => Some(DriverKind::Lvm),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Dir => "dir",
            DriverKind::Btrfs => "btrfs",
            DriverKind::Zfs => "zfs",
            DriverKind::Lvm => "lvm",
        }
    }
}

/// One pool as the config defines it; which fields are set depends on the driver.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub name: String,
    pub driver: DriverKind,
    pub path: Option<PathBuf>,
    pub dataset: Option<String>,
    pub vg: Option<String>,
    pub thin_pool: Option<String>,
    pub fs: Option<String>,
    pub mount_dir: Option<PathBuf>,
    pub quota: bool,
    /// zfs: the property that limits a volume, `refquota` (the default: snapshots do not eat
    /// the volume's space) or `quota` (snapshots count).
    pub quota_property: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub state_dir: PathBuf,
    pub image_roots: Vec<PathBuf>,
    pub pools: BTreeMap<String, Pool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireConfig {
    state_dir: Option<PathBuf>,
    images: Option<WireImages>,
    #[serde(default)]
    pools: BTreeMap<String, WirePool>,
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
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(Code::ConfigInvalid, message)
}

/// The longest parent dataset name: a zfs name has at most 255 bytes, and reimage adds
/// `/.reimage-new.` (14), a volume name (64) and `@reimage-guard` (14).
const MAX_PARENT_DATASET: usize = 255 - 14 - 64 - 14;

/// A zfs dataset name as the config may give it: components of letters, digits and `_-:.`,
/// joined by `/`, starting with a letter (as pool names do), no empty component, no `.`/`..`.
fn check_dataset_name(pool: &str, dataset: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(invalid(format!(
            "pools.{pool}.dataset {dataset:?} {why} (e.g. \"tank/reimage\")"
        )))
    };
    if dataset.len() > MAX_PARENT_DATASET {
        return bad(&format!("is longer than {MAX_PARENT_DATASET} bytes"));
    }
    if !dataset.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return bad("must start with a letter");
    }
    for component in dataset.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return bad("has an empty, '.' or '..' component");
        }
        if let Some(c) = component
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.')))
        {
            return bad(&format!("contains {c:?}"));
        }
    }
    Ok(())
}

/// A volume group or LV name as LVM allows it: letters, digits and `+_.-`, not starting
/// with `-`, not `.` or `..`, at most 127 bytes.
fn check_lvm_name(pool: &str, what: &str, value: &str) -> Result<()> {
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
        Err(invalid(format!(
            "pools.{pool}.{what} {value:?} is not an LVM name (letters, digits, '+_.-', not starting with '-')"
        )))
    }
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
        Config::parse(&text).map_err(|e| e.context(canonical.display()))
    }

    /// Parses config text (no ownership checks; [`Config::load`] does those).
    pub fn parse(text: &str) -> Result<Config> {
        let wire: WireConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let state_dir = wire
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(invalid("state_dir must be an absolute path"));
        }
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
            image_roots,
            pools,
        })
    }

    fn pool(name: String, p: WirePool) -> Result<Pool> {
        VolumeName::parse(&name).map_err(|e| invalid(format!("pool name {name:?}: {e}")))?;
        let driver = DriverKind::parse(&p.driver).ok_or_else(|| {
            invalid(format!(
                "pools.{name}.driver {:?} is not one of dir, btrfs, zfs, lvm",
                p.driver
            ))
        })?;
        let field = |set: bool, field: &str, wanted: bool| -> Result<()> {
            match (set, wanted) {
                (false, true) => Err(invalid(format!(
                    "pools.{name} (driver {}) needs `{field}`",
                    driver.as_str()
                ))),
                (true, false) => Err(invalid(format!(
                    "pools.{name}: `{field}` does not apply to the {} driver",
                    driver.as_str()
                ))),
                _ => Ok(()),
            }
        };
        let path_based = matches!(driver, DriverKind::Dir | DriverKind::Btrfs);
        field(p.path.is_some(), "path", path_based)?;
        field(p.quota.is_some() && !path_based, "quota", false)?;
        if driver == DriverKind::Zfs {
            field(p.dataset.is_some(), "dataset", true)?;
            if let Some(dataset) = &p.dataset {
                check_dataset_name(&name, dataset)?;
            }
            match p.quota_property.as_deref() {
                None | Some("refquota") | Some("quota") => {}
                Some(other) => {
                    return Err(invalid(format!(
                        "pools.{name}.quota_property {other:?} is not refquota or quota"
                    )))
                }
            }
        } else {
            field(p.dataset.is_some(), "dataset", false)?;
            field(p.quota_property.is_some(), "quota_property", false)?;
        }
        if driver == DriverKind::Lvm {
            field(p.vg.is_some(), "vg", true)?;
            for (what, value) in [("vg", &p.vg), ("thin_pool", &p.thin_pool)] {
                if let Some(value) = value {
                    check_lvm_name(&name, what, value)?;
                }
            }
            match p.fs.as_deref() {
                None | Some("ext4") | Some("xfs") => {}
                Some(other) => {
                    return Err(invalid(format!(
                        "pools.{name}.fs {other:?} is not ext4 or xfs"
                    )))
                }
            }
        } else {
            field(p.vg.is_some(), "vg", false)?;
            field(p.thin_pool.is_some(), "thin_pool", false)?;
            field(p.fs.is_some(), "fs", false)?;
            // zfs mounts datasets too, under /run/reimage/mnt unless told otherwise.
            if driver != DriverKind::Zfs {
                field(p.mount_dir.is_some(), "mount_dir", false)?;
            }
        }
        for (what, path) in [("path", &p.path), ("mount_dir", &p.mount_dir)] {
            if let Some(path) = path {
                if !path.is_absolute() {
                    return Err(invalid(format!(
                        "pools.{name}.{what} must be an absolute path"
                    )));
                }
            }
        }
        let fs = match driver {
            DriverKind::Lvm => Some(p.fs.unwrap_or_else(|| "ext4".into())),
            _ => None,
        };
        Ok(Pool {
            name,
            driver,
            path: p.path,
            dataset: p.dataset,
            vg: p.vg,
            thin_pool: p.thin_pool,
            fs,
            mount_dir: p.mount_dir,
            quota: p.quota.unwrap_or(false),
            quota_property: match driver {
                DriverKind::Zfs => Some(p.quota_property.unwrap_or_else(|| "refquota".into())),
                _ => None,
            },
        })
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
        if pool.driver != argv_driver {
            return Err(Error::new(
                Code::PolicyDenied,
                format!(
                    "pool {name:?} uses the {} driver, but this reimage was started as `reimage {}`",
                    pool.driver.as_str(),
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
        assert_eq!(c.pools["default"].driver, DriverKind::Btrfs);
        assert!(c.pools["default"].quota);
        assert_eq!(c.pools["fast"].fs.as_deref(), Some("ext4"));
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
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank//x\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank/../x\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank/a b\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank/x@snap\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank\"\nquota_property = \"reservation\"",
            "[pools.a]\ndriver = \"zfs\"\ndataset = \"tank\"\npath = \"/x\"",
            "[pools.a]\ndriver = \"dir\"\npath = \"/x\"\nquota_property = \"quota\"",
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
    fn lexical_paths() {
        assert_eq!(
            lexical_normal(Path::new("/a/./b//c")),
            Some(PathBuf::from("/a/b/c"))
        );
        assert_eq!(lexical_normal(Path::new("/a/../b")), None);
        assert_eq!(lexical_normal(Path::new("a")), None);
    }
}
