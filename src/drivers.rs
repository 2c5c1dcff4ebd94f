//! From a pool's config to its driver.

use std::path::Path;

use reimage_driver::Driver;
use reimage_driver_btrfs::BtrfsDriver;
use reimage_driver_dir::DirDriver;

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
        DriverKind::Dir => Ok(Box::new(DirDriver::open(pool_path(pool)?)?)),
        DriverKind::Btrfs => {
            let lineage = state_dir.join("lineage").join(&pool.name);
            Ok(Box::new(BtrfsDriver::open(
                pool_path(pool)?,
                pool.quota,
                &lineage,
            )?))
        }
        other => Err(Error::new(
            Code::Unsupported,
            format!(
                "the {} driver is not available in this build of reimage yet",
                other.as_str()
            ),
        )),
    }
}
