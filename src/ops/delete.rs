//! `delete`: a volume and, as asked, its snapshots.

use super::*;

pub(super) fn delete(
    mut ctx: Ctx<'_>,
    volume: &VolumeName,
    snapshots: SnapshotPolicy,
) -> Result<out::VolumeResult> {
    let mut held = lock_volume(&mut ctx, volume)?;
    let driver = held.driver;
    held.recover_first()?;
    let live = Slot::live(volume);
    held.require_live("")?;
    held.check_not_busy(live)?;
    let existing = driver.snapshots(live)?;
    if !existing.is_empty() && snapshots == SnapshotPolicy::Refuse {
        return Err(Error::new(
            Code::VolumeHasSnapshots,
            format!(
                "volume {volume} has snapshots ({}); pass \"snapshots\": \"delete\"",
                existing.join(", ")
            ),
        )
        .with("snapshots", existing));
    }
    let with_snapshots = snapshots == SnapshotPolicy::Delete;
    if with_snapshots {
        refuse_clones(driver, volume)?;
    }
    held.events.progress(EventPhase::Cleanup, 0, 1, Unit::Steps);
    // A failure finishes what can be finished: a volume moved aside is deleted, one still
    // under its name stays.
    held.journaled(
        IntentOp::Delete,
        Phase::Deleting,
        with_snapshots,
        |_| {
            fault::point("delete:journaled")?;
            driver.rename(live, Slot::old(volume))?;
            fault::point("delete:detached")?;
            driver.destroy(Slot::old(volume), with_snapshots)?;
            fault::point("delete:destroyed")
        },
        LockedVolume::recover_from(IntentOp::Delete, Phase::Deleting, with_snapshots),
    )?;
    held.journal.clear(volume)?;
    driver.forget(volume)?;
    held.events.progress(EventPhase::Cleanup, 1, 1, Unit::Steps);
    Ok(out::VolumeResult {
        volume: no_volume(volume),
    })
}
