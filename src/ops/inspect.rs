//! `inspect`: a volume's state, usage and the driver's capabilities.

use super::*;

pub(super) fn inspect(ctx: Ctx<'_>, volume: &VolumeName) -> Result<Map<String, Value>> {
    let (pool, driver) = needs(&ctx)?;
    let journal = Journal::open(ctx.state, &pool.name)?;
    let pending =
        journal.read(volume)?.is_some() || driver.leftovers()?.iter().any(|(v, _)| v == volume);
    let mut info = if driver.identity(Slot::live(volume))?.is_some() {
        volume_json(driver, volume)?
    } else {
        json!({"name": volume.as_str(), "exists": false})
    };
    info["pending_recovery"] = pending.into();
    // Added to v1: what the driver can do, so callers (and the conformance suite) need not guess.
    let caps = driver.capabilities();
    info["capabilities"] = json!({
        "snapshots": caps.snapshots,
        "keep_snapshots": caps.keep_snapshots != reimage_driver::KeepSnapshots::No,
        // Added: how snapshots are kept: "independent" (they outlive the volume) or
        // "refill" (the volume is refilled in place under a guard snapshot).
        "keep_snapshots_by": match caps.keep_snapshots {
            reimage_driver::KeepSnapshots::No => Value::Null,
            reimage_driver::KeepSnapshots::Independent => "independent".into(),
            reimage_driver::KeepSnapshots::Refill => "refill".into(),
        },
        "size_limit": match caps.size_model {
            reimage_driver::SizeModel::Unlimited => "none",
            reimage_driver::SizeModel::Quota => "quota",
            reimage_driver::SizeModel::Allocated => "allocated",
        },
        "shrink": caps.shrink,
        "image_volumes": caps.image_volumes,
        "templates": caps.templates,
        // Added: whether `size` limits the image content too (false for overlay, whose
        // limit is its upper layer's: only what the volume changes counts).
        "size_counts_image": caps.size_counts_image,
    });
    let mut out = Map::new();
    out.insert("volume".into(), info);
    Ok(out)
}
