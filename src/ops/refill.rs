//! A rebuild that keeps snapshots living inside the volume: refilled in place under a guard
//! snapshot.

use super::*;

/// A rebuild that keeps snapshots living inside the volume ([`KeepSnapshots::Refill`]): the
/// volume is emptied and refilled where it is, after a guard snapshot of its old content was
/// taken. Any failure before the new content is synced, and any crash (through `recover`),
/// rolls the volume back to the guard, and its size back to what it was; success drops the
/// guard. Existing snapshots are never touched.
pub(super) fn refill_in_place(
    held: &mut LockedVolume<'_>,
    content: &Content,
    plan: &Plan,
    current: &Usage,
    fill: &Fill,
    preserved: &[RelPath],
    timings: &mut Timings,
) -> Result<()> {
    let idmap = IdMap::new(fill.idmap.clone());
    let filling = Filling::new(
        content,
        &idmap,
        Some(plan),
        PlanLater {
            fill,
            current: Some(current),
            mode: Mode::Atomic,
        },
    );
    let (driver, volume) = (held.driver, held.volume);
    let live = Slot::live(volume);
    let op = IntentOp::RebuildRefill;
    let counts_snapshots = driver.capabilities().size_counts_snapshots;
    let refilling = Phase::Refilling {
        size_before: current.size,
    };
    held.journaled(
        op,
        refilling.clone(),
        false,
        |held| {
            fault::point("refill:journaled")?;
            held.events.progress(EventPhase::Prepare, 0, 1, Unit::Steps);
            driver.set_guard(live)?;
            fault::point("refill:guarded")?;
            if let Some(target) = plan.target_size {
                // A limit that counts snapshots must also hold the old content the guard
                // keeps.
                let during = if counts_snapshots {
                    target.saturating_add(current.used)
                } else {
                    target
                };
                if Some(during) != current.size {
                    driver.set_size(live, during)?;
                }
            }
            if let Some(bytes) = fault::quota_override() {
                driver.set_size(live, bytes)?;
            }
            let root = driver.open_root(live)?;
            timings.time("prepare", || {
                tree::empty(root.root(), &live.to_string()).map_err(Error::from)
            })?;
            fault::point("refill:emptied")?;
            held.events.progress(EventPhase::Prepare, 1, 1, Unit::Steps);
            unpack_step(held, &root, &filling, &[], timings)?;
            fault::point("refill:unpacked")?;
            preserve_step(
                held,
                || driver.open_guard(live),
                &root,
                preserved,
                filling.metadata,
                timings,
            )?;
            seal(driver, held.events, root, live, timings)?;
            fault::point("refill:synced")
        },
        LockedVolume::recover_from(op, refilling, false),
    )?;
    held.intent(op, Phase::Refilled, false)?;
    fault::point("refill:committed")?;
    let cleaned = timings.time("cleanup", || -> Result<()> {
        driver.drop_guard(live)?;
        if let (true, Some(target)) = (counts_snapshots, plan.target_size) {
            let used = driver.usage(live)?.used;
            driver.set_size(live, target.max(used))?;
        }
        Ok(())
    });
    match cleaned {
        Ok(()) => held.journal.clear(volume)?,
        Err(e) => held.events.warning(
            Warning::CleanupPending,
            &format!("the volume holds the new content but its guard snapshot could not be removed yet ({}); the next request or `recover` removes it", e.message),
        ),
    }
    held.events.progress(EventPhase::Cleanup, 1, 1, Unit::Steps);
    Ok(())
}
