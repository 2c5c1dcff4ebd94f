//! Filling a volume from a template: a writable clone of a snapshot of another volume of the
//! same pool (the fleet case: one template volume, its snapshots cloned into many volumes).
//!
//! Nothing is measured or unpacked: the clone shares every block with the snapshot, its limit
//! is grown to what it shares (unless the size is exact), and `preserve`, sync and the swap
//! go as for any rebuild. The template volume is not locked: a snapshot deleted meanwhile
//! makes the clone fail, and the request rolls back.

use super::*;

/// The content of a fill from snapshot `snapshot` of `template`, on a driver that can clone
/// snapshots.
pub(super) fn template_content(
    driver: &dyn Driver,
    template: &VolumeName,
    snapshot: &str,
) -> Result<Content> {
    if !driver.capabilities().templates {
        return Err(Error::new(
            Code::Unsupported,
            format!(
                "the {} driver cannot fill a volume from a snapshot of another volume; templates need writable clones of snapshots (btrfs, zfs, thin lvm)",
                driver.name()
            ),
        ));
    }
    // Checked now, so that a wrong name changes nothing (and a dry run says so).
    let live = Slot::live(template);
    if driver.identity(live)?.is_none() {
        return Err(Error::new(
            Code::NotFound,
            format!("template volume {template} does not exist"),
        ));
    }
    let snapshots = driver.snapshots(live)?;
    if !snapshots.iter().any(|s| s == snapshot) {
        return Err(Error::new(
            Code::NotFound,
            format!(
                "volume {template} has no snapshot {snapshot} (it has: {})",
                if snapshots.is_empty() {
                    "none".to_owned()
                } else {
                    snapshots.join(", ")
                }
            ),
        ));
    }
    Ok(Content::Template {
        volume: template.clone(),
        snapshot: snapshot.to_owned(),
    })
}

/// Makes the `New` slot of the held volume a clone of the template's snapshot, sizes it and
/// opens its root. Fault point `created` once the clone is there.
pub(super) fn clone_template(
    held: &mut LockedVolume<'_>,
    template: &VolumeName,
    snapshot: &str,
    filling: &Filling<'_>,
    created: &str,
    timings: &mut Timings,
) -> Result<Mounted> {
    let (driver, volume) = (held.driver, held.volume);
    prepare_new(held, created, timings, || {
        driver.clone_snapshot(template, snapshot, Slot::building(volume))?;
        size_clone(driver, Slot::building(volume), filling)
    })
}
