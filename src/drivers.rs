//! From a pool's validated spec to its driver.

use std::path::Path;

use reimage_driver::Driver;
use reimage_driver_btrfs::BtrfsDriver;
use reimage_driver_dir::DirDriver;
use reimage_driver_lvm::LvmDriver;
use reimage_driver_zfs::ZfsDriver;

use crate::config::{Pool, PoolSpec};
use crate::error::Result;

/// The driver for `pool`; `state_dir` holds what a driver keeps between requests.
pub fn open(pool: &Pool, state_dir: &Path) -> Result<Box<dyn Driver>> {
    Ok(match &pool.spec {
        PoolSpec::Dir { path, quota } => Box::new(DirDriver::open(path, *quota)?),
        PoolSpec::Btrfs { path, quota } => {
            let lineage = state_dir.join("lineage").join(&pool.name);
            Box::new(BtrfsDriver::open(path, *quota, &lineage)?)
        }
        PoolSpec::Zfs {
            dataset,
            quota_property,
            mount_dir,
        } => Box::new(ZfsDriver::open(
            dataset,
            *quota_property,
            mount_dir.clone(),
        )?),
        PoolSpec::Lvm {
            vg,
            thin_pool,
            fs,
            mount_dir,
        } => Box::new(LvmDriver::open(
            vg,
            thin_pool.as_deref(),
            *fs,
            mount_dir.clone(),
        )?),
    })
}
