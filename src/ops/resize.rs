//! `resize`: a volume's size limit, grown or (where the driver can) shrunk.

use super::*;

pub(super) fn resize(
    mut ctx: Ctx<'_>,
    volume: &VolumeName,
    size: u64,
) -> Result<out::VolumeResult> {
    let mut held = lock_volume(&mut ctx, volume)?;
    let driver = held.driver;
    held.recover_first()?;
    let live = Slot::live(volume);
    held.require_live("")?;
    let caps = driver.capabilities();
    let usage = driver.usage(live)?;
    match caps.size_model {
        reimage_driver::SizeModel::Unlimited => {
            held.events.warning(
                Warning::SizeIgnored,
                &format!(
                    "the {} driver cannot limit a volume's size on this pool; nothing to resize",
                    driver.name()
                ),
            );
        }
        model => {
            let current = usage.size.unwrap_or(0);
            if size < current && !caps.shrink {
                return Err(Error::new(
                    Code::Unsupported,
                    format!(
                        "the {} driver cannot shrink volume {volume} ({current} → {size} bytes)",
                        driver.name()
                    ),
                ));
            }
            if size < usage.used {
                return Err(Error::new(
                    Code::InsufficientSpace,
                    format!(
                        "volume {volume} uses {} bytes, more than the requested size {size}",
                        usage.used
                    ),
                )
                .with("used", usage.used)
                .with("size", size));
            }
            if model == reimage_driver::SizeModel::Allocated && size > current {
                let available = driver.pool_space()?.available;
                if size - current > available {
                    return Err(Error::new(
                        Code::InsufficientSpace,
                        format!("growing {volume} by {} bytes needs more than the pool's {available} free", size - current),
                    )
                    .with("needed", size - current)
                    .with("available", available));
                }
            }
            driver.set_size(live, size)?;
        }
    }
    Ok(out::VolumeResult {
        volume: volume_info(driver, volume)?,
    })
}
