//! Finishing or rolling back what a crash interrupted.
//!
//! The journal says which operation was running and which step it was about to take; the
//! driver's slots say how far that step got. The rule that keeps guarantee 1: once the new
//! volume is complete and synced (phase `Committing`, its identity recorded) recovery finishes
//! the swap; before that it restores the old volume. Every action here is idempotent, so a
//! crash during recovery is recovered by the next run.

use reimage_driver::{Driver, Slot, SlotKind, VolumeName};

use crate::error::Result;
use crate::journal::{Intent, IntentOp, Journal, Phase};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The volume holds its old content again.
    RolledBack,
    /// The interrupted operation was completed.
    Completed,
    /// An in-place rebuild was interrupted after the old content was destroyed: the volume
    /// is gone (the documented risk of `in-place`).
    Lost,
    /// Temporary slots without a journal record were cleaned up.
    CleanedUp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub volume: VolumeName,
    pub op: Option<IntentOp>,
    pub action: Action,
}

impl Outcome {
    pub fn describe(&self) -> String {
        let what = match self.op {
            Some(IntentOp::Create) => "create",
            Some(IntentOp::Rebuild) => "rebuild",
            Some(IntentOp::RebuildInPlace) => "in-place rebuild",
            Some(IntentOp::RebuildRefill) => "rebuild keeping snapshots",
            Some(IntentOp::Delete) => "delete",
            None => "operation",
        };
        match self.action {
            Action::RolledBack => format!("an interrupted {what} of {} was rolled back; the old content is intact", self.volume),
            Action::Completed => format!("an interrupted {what} of {} was completed", self.volume),
            Action::Lost => format!(
                "an interrupted in-place rebuild of {} had already destroyed the old content; the volume is gone",
                self.volume
            ),
            Action::CleanedUp => format!("leftover temporary volumes of {} were removed", self.volume),
        }
    }
}

fn identity(driver: &dyn Driver, volume: &VolumeName, kind: SlotKind) -> Result<Option<String>> {
    Ok(driver.identity(Slot { volume, kind })?)
}

/// Destroys the temporary slots, except one holding `keep` (the new volume's identity).
fn destroy_leftovers(
    driver: &dyn Driver,
    volume: &VolumeName,
    keep: Option<&str>,
    with_snapshots: bool,
) -> Result<()> {
    for kind in [SlotKind::New, SlotKind::Old] {
        let id = identity(driver, volume, kind)?;
        if id.is_some() && id.as_deref() != keep {
            driver.destroy(Slot { volume, kind }, with_snapshots)?;
        }
    }
    Ok(())
}

/// Puts the slot holding `new_id` under the volume's name (the old content, if still under
/// the name, moves to a temporary slot), then destroys the leftovers.
fn finish_commit(
    driver: &dyn Driver,
    volume: &VolumeName,
    new_id: &str,
    with_snapshots: bool,
) -> Result<Action> {
    let live = identity(driver, volume, SlotKind::Live)?;
    if live.as_deref() != Some(new_id) {
        let new = identity(driver, volume, SlotKind::New)?;
        if new.as_deref() != Some(new_id) {
            // The complete new volume is nowhere: it was never created under this identity.
            // Restore the old one if it was moved aside.
            destroy_leftovers_restoring(driver, volume, with_snapshots)?;
            return Ok(Action::RolledBack);
        }
        if live.is_some() {
            if driver.capabilities().exchange {
                driver.exchange(Slot::live(volume), Slot::building(volume))?;
            } else {
                // The old content moves aside to the `Old` slot; what an earlier request
                // left there is a leftover, not the volume, and makes room first.
                if identity(driver, volume, SlotKind::Old)?.is_some() {
                    driver.destroy(Slot::old(volume), with_snapshots)?;
                }
                driver.rename(Slot::live(volume), Slot::old(volume))?;
                driver.rename(Slot::building(volume), Slot::live(volume))?;
            }
        } else {
            driver.rename(Slot::building(volume), Slot::live(volume))?;
        }
    }
    destroy_leftovers(driver, volume, Some(new_id), with_snapshots)?;
    Ok(Action::Completed)
}

/// Rolls back: destroys the `New` slot and moves `Old` back under the name if the name is
/// free.
fn destroy_leftovers_restoring(
    driver: &dyn Driver,
    volume: &VolumeName,
    with_snapshots: bool,
) -> Result<()> {
    driver.destroy(Slot::building(volume), with_snapshots)?;
    if identity(driver, volume, SlotKind::Old)?.is_some() {
        if identity(driver, volume, SlotKind::Live)?.is_none() {
            driver.rename(Slot::old(volume), Slot::live(volume))?;
        } else {
            driver.destroy(Slot::old(volume), with_snapshots)?;
        }
    }
    Ok(())
}

/// Returns a volume refilled in place to its guard snapshot, and its size limit to what it
/// was (`None`: no limit). Before the guard was taken nothing had changed but, perhaps, the
/// size.
pub fn roll_back_refill(
    driver: &dyn Driver,
    volume: &VolumeName,
    size_before: Option<u64>,
) -> Result<()> {
    let live = Slot::live(volume);
    driver.roll_back_to_guard(live)?;
    if driver.identity(live)?.is_some() && driver.usage(live)?.size != size_before {
        driver.set_size(live, size_before.unwrap_or(0))?;
    }
    Ok(())
}

/// Recovers one volume from its journal record (the caller holds the volume's lock).
pub fn recover_volume(
    driver: &dyn Driver,
    journal: &Journal,
    volume: &VolumeName,
    intent: &Intent,
) -> Result<Outcome> {
    let snaps = intent.with_snapshots;
    let action = match (&intent.op, &intent.phase) {
        (_, Phase::Committing { new_id }) => finish_commit(driver, volume, new_id, snaps)?,
        (_, Phase::Refilling { size_before }) => {
            roll_back_refill(driver, volume, *size_before)?;
            Action::RolledBack
        }
        (_, Phase::Refilled) => {
            driver.drop_guard(Slot::live(volume))?;
            Action::Completed
        }
        (IntentOp::Delete, _) => {
            // The volume moved aside is destroyed (the delete completes); a `New` slot some
            // earlier request left goes too, so nothing temporary outlives the record.
            let detached = identity(driver, volume, SlotKind::Old)?.is_some();
            destroy_leftovers(driver, volume, None, snaps)?;
            if detached {
                Action::Completed
            } else {
                Action::RolledBack
            }
        }
        (IntentOp::RebuildInPlace, Phase::DestroyingOld) => {
            driver.destroy(Slot::old(volume), snaps)?;
            driver.destroy(Slot::building(volume), snaps)?;
            if identity(driver, volume, SlotKind::Live)?.is_some() {
                Action::RolledBack
            } else {
                Action::Lost
            }
        }
        _ => {
            destroy_leftovers_restoring(driver, volume, snaps)?;
            Action::RolledBack
        }
    };
    journal.clear(volume)?;
    Ok(Outcome {
        volume: volume.clone(),
        op: Some(intent.op),
        action,
    })
}

/// Temporary slots with no journal record (the state directory was lost or reset): an
/// orphaned `New` slot is destroyed (it cannot be known complete); an orphaned `Old` slot is
/// moved back under the name if the name is free, and otherwise left alone and reported.
pub fn recover_orphans(driver: &dyn Driver, volume: &VolumeName) -> Result<Option<Outcome>> {
    let [live, new, old] = driver.identities(volume)?;
    if new.is_none() && old.is_none() {
        return Ok(None);
    }
    driver.destroy(Slot::building(volume), false)?;
    let action = if old.is_some() && live.is_none() {
        driver.rename(Slot::old(volume), Slot::live(volume))?;
        Action::RolledBack
    } else {
        Action::CleanedUp
    };
    Ok(Some(Outcome {
        volume: volume.clone(),
        op: None,
        action,
    }))
}
