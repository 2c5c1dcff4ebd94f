//! `prune`: removes the image volumes that no volume depends on (with `older_than`, only
//! those unused for that long), and the unsealed leftovers of interrupted builds. An image
//! volume that a running request is building or cloning is skipped; so is one a volume was
//! cloned from, so no prune ever changes a volume. One that only holders depend on (zfs
//! clones refilled in place) is parked: renamed aside, it goes with its last holder.

use super::*;

pub(super) fn prune(ctx: Ctx<'_>, older_than: Option<u64>, dry_run: bool) -> Result<out::Pruned> {
    let (pool, driver) = needs(&ctx)?;
    let records = image_records(ctx.state, &pool.name)?;
    let now = now();
    let (mut removed, mut kept, mut parked) = (Vec::new(), Vec::new(), Vec::new());
    for image in driver.images()? {
        let key = image.key.as_str().to_owned();
        if !image.clones.is_empty() {
            kept.push(out::KeptImage {
                volumes: Some(image.clones),
                ..kept_image(&key, out::KeptWhy::InUse)
            });
            continue;
        }
        let record = read_record(&records, &image.key);
        let recent = match (older_than, &record) {
            (Some(age), Some(r)) => now.saturating_sub(r.last_used) < age,
            _ => false,
        };
        if image.sealed && recent {
            kept.push(kept_image(&key, out::KeptWhy::UsedRecently));
            continue;
        }
        let Ok(_lock) = lock_image(ctx.state, &pool.name, &image.key, false) else {
            kept.push(kept_image(&key, out::KeptWhy::RequestRunning));
            continue;
        };
        // Looked at again under the lock: a clone may have been made meanwhile.
        let Some(image) = driver
            .images()?
            .into_iter()
            .find(|i| i.key == image.key && i.sealed == image.sealed && i.clones.is_empty())
        else {
            kept.push(kept_image(&key, out::KeptWhy::InUse));
            continue;
        };
        if image.sealed && !image.holders.is_empty() {
            if !dry_run {
                driver.park_image(&image.key)?;
                let _ = records.remove(&format!("{key}.json"));
            }
            parked.push(out::ParkedImage {
                key,
                holders: image.holders,
                allocated_bytes: record.map(|r| r.allocated_bytes),
            });
            continue;
        }
        if !dry_run {
            match driver.destroy_image(&image.key, image.sealed) {
                Ok(()) => {}
                // Still a lower layer of a mount somebody made by hand (overlay).
                Err(e) if matches!(e.kind, reimage_driver::ErrorKind::Busy { .. }) => {
                    kept.push(out::KeptImage {
                        holder: Some(e.message),
                        ..kept_image(&key, out::KeptWhy::Mounted)
                    });
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            if image.sealed {
                let _ = records.remove(&format!("{key}.json"));
            }
        }
        removed.push(out::PrunedImage {
            key,
            sealed: image.sealed,
            allocated_bytes: record.map(|r| r.allocated_bytes),
        });
    }
    Ok(out::Pruned {
        dry_run: dry_run.then_some(true),
        removed,
        kept,
        parked,
    })
}

fn kept_image(key: &str, why: out::KeptWhy) -> out::KeptImage {
    out::KeptImage {
        key: key.to_owned(),
        why,
        volumes: None,
        holder: None,
    }
}
