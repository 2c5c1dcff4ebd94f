//! `prune`: removes the image volumes that no volume depends on (with `older_than`, only
//! those unused for that long), and the unsealed leftovers of interrupted builds. An image
//! volume that a running request is building or cloning is skipped; so is one a volume was
//! cloned from, so no prune ever changes a volume.

use super::*;

pub(super) fn prune(
    ctx: Ctx<'_>,
    older_than: Option<u64>,
    dry_run: bool,
) -> Result<Map<String, Value>> {
    let (pool, driver) = needs(&ctx)?;
    let records = image_records(ctx.state, &pool.name)?;
    let now = now();
    let (mut removed, mut kept) = (Vec::new(), Vec::new());
    for image in driver.images()? {
        let key = image.key.as_str().to_owned();
        if !image.clones.is_empty() {
            kept.push(json!({"key": key, "why": "in use", "volumes": image.clones}));
            continue;
        }
        let record = read_record(&records, &image.key);
        let recent = match (older_than, &record) {
            (Some(age), Some(r)) => now.saturating_sub(r.last_used) < age,
            _ => false,
        };
        if image.sealed && recent {
            kept.push(json!({"key": key, "why": "used recently"}));
            continue;
        }
        let Ok(_lock) = lock_image(ctx.state, &pool.name, &image.key, false) else {
            kept.push(json!({"key": key, "why": "a running request is using it"}));
            continue;
        };
        // Looked at again under the lock: a clone may have been made meanwhile.
        let still_free = driver
            .images()?
            .iter()
            .any(|i| i.key == image.key && i.sealed == image.sealed && i.clones.is_empty());
        if !still_free {
            kept.push(json!({"key": key, "why": "in use"}));
            continue;
        }
        if !dry_run {
            match driver.destroy_image(&image.key, image.sealed) {
                Ok(()) => {}
                // Still a lower layer of a mount somebody made by hand (overlay).
                Err(e) if matches!(e.kind, reimage_driver::ErrorKind::Busy { .. }) => {
                    kept.push(json!({"key": key, "why": "mounted", "holder": e.message}));
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            if image.sealed {
                let _ = records.remove(&format!("{key}.json"));
            }
        }
        removed.push(json!({
            "key": key,
            "sealed": image.sealed,
            "allocated_bytes": record.map(|r| r.allocated_bytes),
        }));
    }
    let mut out = Map::new();
    if dry_run {
        out.insert("dry_run".into(), true.into());
    }
    out.insert("removed".into(), Value::Array(removed));
    out.insert("kept".into(), Value::Array(kept));
    Ok(out)
}
