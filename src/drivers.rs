//! From a pool's config to its driver.

use reimage_driver::Driver;
use reimage_driver_dir::DirDriver;

use crate::config::{DriverKind, Pool};
use crate::error::{Code, Error, Result};

pub fn open(pool: &Pool) -> Result<Box<dyn Driver>> {
    match pool.driver {
        DriverKind::Dir => {
            let path = pool.path.as_deref().ok_or_else(|| {
                Error::new(
                    Code::ConfigInvalid,
                    format!("pool {} needs a path", pool.name),
                )
            })?;
            Ok(Box::new(DirDriver::open(path)?))
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
