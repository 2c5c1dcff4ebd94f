//! From a pool's validated spec to its driver.

use reimage_driver::records::RecordDir;
use reimage_driver::{Driver, ErrorKind};
use reimage_driver_btrfs::BtrfsDriver;
use reimage_driver_dir::DirDriver;
use reimage_driver_lvm::LvmDriver;
use reimage_driver_overlay::OverlayDriver;
use reimage_driver_zfs::ZfsDriver;

use crate::config::{Pool, PoolSpec};
use crate::error::{Code, Error, Result};

/// The driver for `pool`; `state` holds what a driver keeps between requests.
pub fn open(pool: &Pool, state: &RecordDir) -> Result<Box<dyn Driver>> {
    Ok(match &pool.spec {
        PoolSpec::Dir {
            path,
            quota,
            image_volumes,
        } => Box::new(
            DirDriver::open(path, *quota, *image_volumes).map_err(|e| match e.kind {
                // Asked for image volumes where the filesystem has no reflinks.
                ErrorKind::Unsupported => Error::new(
                    Code::ConfigInvalid,
                    format!(
                        "pools.{}: image_volumes = true: {}; move the pool there or remove `image_volumes = true`",
                        pool.name, e.message
                    ),
                ),
                _ => Error::from(e),
            })?,
        ),
        PoolSpec::Overlay { path, quota } => Box::new(OverlayDriver::open(path, *quota)?),
        PoolSpec::Btrfs {
            path,
            quota,
            image_volumes,
        } => {
            let lineage = state.area(&["lineage", &pool.name]).map_err(|e| {
                Error::internal(format!(
                    "cannot open the snapshot lineage in {}: {e}",
                    state.path().display()
                ))
            })?;
            Box::new(BtrfsDriver::open(path, *quota, *image_volumes, lineage)?)
        }
        PoolSpec::Zfs {
            dataset,
            quota_property,
            image_volumes,
            image_clone,
            mount_dir,
        } => Box::new(ZfsDriver::open(
            dataset,
            *quota_property,
            *image_volumes,
            *image_clone,
            mount_dir.clone(),
        )?),
        PoolSpec::Lvm {
            vg,
            thin_pool,
            fs,
            image_volumes,
            mount_dir,
        } => Box::new(LvmDriver::open(
            vg,
            thin_pool.as_deref(),
            *fs,
            *image_volumes,
            mount_dir.clone(),
        )?),
    })
}
