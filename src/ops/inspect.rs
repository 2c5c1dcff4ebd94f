//! `inspect`: a volume's state, usage and the driver's capabilities.

use super::*;

/// `walk`: count bytes and inodes by a walk of the tree where the pool has no counter of
/// them; without it an inspect does no work proportional to the volume's files.
pub(super) fn inspect(ctx: Ctx<'_>, volume: &VolumeName, walk: bool) -> Result<out::VolumeResult> {
    let (pool, driver) = needs(&ctx)?;
    let journal = Journal::open(ctx.state, &pool.name)?;
    let pending =
        journal.read(volume)?.is_some() || driver.leftovers()?.iter().any(|(v, _)| v == volume);
    let mut info = if driver.identity(Slot::live(volume))?.is_some() {
        volume_info_with(driver, volume, walk)?
    } else {
        no_volume(volume)
    };
    info.pending_recovery = Some(pending);
    // Added to v1: what the driver can do, so callers (and the conformance suite) need not guess.
    let caps = driver.capabilities();
    info.capabilities = Some(out::Capabilities {
        snapshots: caps.snapshots,
        keep_snapshots: caps.keep_snapshots != KeepSnapshots::No,
        keep_snapshots_by: match caps.keep_snapshots {
            KeepSnapshots::No => None,
            KeepSnapshots::Independent => Some(out::KeepSnapshotsBy::Independent),
            KeepSnapshots::Refill => Some(out::KeepSnapshotsBy::Refill),
        },
        size_limit: match caps.size_model {
            reimage_driver::SizeModel::Unlimited => out::SizeLimit::None,
            reimage_driver::SizeModel::Quota => out::SizeLimit::Quota,
            reimage_driver::SizeModel::Allocated => out::SizeLimit::Allocated,
        },
        shrink: caps.shrink,
        image_volumes: caps.image_volumes,
        templates: caps.templates,
        size_counts_image: caps.size_counts_image,
    });
    Ok(out::VolumeResult { volume: info })
}
