//! From a pool's config to its driver.

use std::path::{Path, PathBuf};

/// Where block- and dataset-backed volumes are mounted while reimage fills them, unless the
/// pool's `mount_dir` says otherwise.
pub const DEFAULT_MOUNT_DIR: &str = "/run/reimage/mnt";

use reimage_driver::Driver;
use reimage_driver_btrfs::BtrfsDriver;
use reimage_driver_dir::DirDriver;
use reimage_driver_lvm::{Fs, LvmDriver};
use reimage_driver_zfs::{QuotaProperty, ZfsDriver};

use crate::config::{DriverKind, Pool};
use crate::error::{Code, Error, Result};

/// The pool's directory, for the drivers that keep volumes in one (config validation
/// already requires it for them).
fn pool_path(pool: &Pool) -> Result<&Path> {
    pool.path.as_deref().ok_or_else(|| {
        Error::new(
            Code::ConfigInvalid,
            format!("pool {} needs a path", pool.name),
        )
    })
}

/// The driver for `pool`; `state_dir` holds what a driver keeps between requests.
pub fn open(pool: &Pool, state_dir: &Path) -> Result<Box<dyn Driver>> {
    match pool.driver {
        DriverKind::Dir => Ok(Box::new(DirDriver::open(pool_path(pool)?, pool.quota)?)),
        DriverKind::Btrfs => {
            let lineage = state_dir.join("lineage").join(&pool.name);
            Ok(Box::new(BtrfsDriver::open(
                pool_path(pool)?,
                pool.quota,
                &lineage,
            )?))
        }
        DriverKind::Zfs => {
            let dataset = pool.dataset.as_deref().ok_or_else(|| {
                Error::new(
                    Code::ConfigInvalid,
                    format!("pool {} needs a dataset", pool.name),
                )
            })?;
            let quota = QuotaProperty::parse(pool.quota_property.as_deref().unwrap_or("refquota"))
                .ok_or_else(|| {
                    Error::new(
                        Code::ConfigInvalid,
                        format!("pool {}: bad quota_property", pool.name),
                    )
                })?;
            let mount_dir = pool
                .mount_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MOUNT_DIR));
            Ok(Box::new(ZfsDriver::open(dataset, quota, mount_dir)?))
        }
        DriverKind::Lvm => {
            let missing = |field: &str| {
                Error::new(
                    Code::ConfigInvalid,
                    format!("pool {} needs `{field}`", pool.name),
                )
            };
            let vg = pool.vg.as_deref().ok_or_else(|| missing("vg"))?;
            let fs =
                Fs::parse(pool.fs.as_deref().unwrap_or("ext4")).ok_or_else(|| missing("fs"))?;
            let mount_dir = pool
                .mount_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MOUNT_DIR));
            Ok(Box::new(LvmDriver::open(
                vg,
                pool.thin_pool.as_deref(),
                fs,
                mount_dir,
            )?))
        }
    }
}
