//! `rebuild`: checks, then the choice of a strategy — atomic (build beside, swap),
//! in-place (move the old aside first), or a refill under a guard snapshot.

use super::*;

pub(super) fn rebuild(
    mut ctx: Ctx<'_>,
    volume: &VolumeName,
    fill: &Fill,
    snapshots: SnapshotPolicy,
    mode: Mode,
    preserve_list: &[PathBuf],
) -> Result<Map<String, Value>> {
    let mut timings = Timings::start();
    let config = ctx.config;
    let mut vop = lock_volume(&mut ctx, volume)?;
    let driver = vop.driver;
    let pending = vop.journal.read(volume)?.is_some();
    if !fill.dry_run {
        vop.recover_first()?;
    }
    let live = Slot::live(volume);
    if driver.identity(live)?.is_none() {
        return Err(Error::new(
            Code::NotFound,
            format!("volume {volume} does not exist; use create"),
        ));
    }
    vop.check_not_busy(live)?;
    let existing = driver.snapshots(live)?;
    if !existing.is_empty() {
        match snapshots {
            SnapshotPolicy::Refuse => {
                return Err(Error::new(
                    Code::VolumeHasSnapshots,
                    format!(
                        "volume {volume} has snapshots ({}); pass \"snapshots\": \"delete\" or \"keep\"",
                        existing.join(", ")
                    ),
                )
                .with("snapshots", existing))
            }
            SnapshotPolicy::Keep if driver.capabilities().keep_snapshots == KeepSnapshots::No => {
                return Err(Error::new(
                    Code::Unsupported,
                    format!("the {} driver cannot keep snapshots across a rebuild; use \"delete\"", driver.name()),
                ))
            }
            _ => {}
        }
    }
    let with_snapshots = snapshots == SnapshotPolicy::Delete;
    if with_snapshots {
        refuse_clones(driver, volume)?;
    }
    // Snapshots that live inside the volume survive only if the volume itself is refilled.
    let refill = snapshots == SnapshotPolicy::Keep
        && !existing.is_empty()
        && driver.capabilities().keep_snapshots == KeepSnapshots::Refill;
    let keep = preserve_paths(preserve_list)?;
    let idmap = IdMap::new(fill.idmap.clone());
    let current = driver.usage(live)?;
    let (content, plan) = measure_and_plan(
        config,
        &mut vop,
        fill,
        &idmap,
        Some(&current),
        mode,
        &mut timings,
    )?;
    if fill.dry_run {
        let steps: &[&str] = match mode {
            _ if refill => &[
                "guard snapshot",
                "empty",
                "unpack",
                "preserve",
                "sync",
                "drop guard",
            ],
            Mode::Atomic => &[
                "create new",
                "unpack",
                "preserve",
                "sync",
                "swap",
                "destroy old",
            ],
            Mode::InPlace => &[
                "move old aside",
                "create new",
                "preserve",
                "destroy old",
                "unpack",
                "sync",
                "publish",
            ],
        };
        return Ok(dry_run_result(&plan, &content, steps, pending));
    }
    cancelled_check()?;
    if refill {
        refill_in_place(
            &mut vop,
            &content,
            &plan,
            &current,
            fill,
            &keep,
            &mut timings,
        )?;
        return fill_result(driver, volume, &content, &timings);
    }
    match mode {
        Mode::Atomic => {
            vop.intent(IntentOp::Rebuild, Phase::Building, with_snapshots)?;
            let built = (|| -> Result<String> {
                fault::point("rebuild:journaled")?;
                vop.events.progress(EventPhase::Prepare, 0, 1, "steps");
                timings.time("prepare", || {
                    driver.create(
                        Slot::new(volume),
                        fault::quota_override().or(plan.target_size),
                    )
                })?;
                fault::point("rebuild:created")?;
                let root = driver.open_root(Slot::new(volume))?;
                vop.events.progress(EventPhase::Prepare, 1, 1, "steps");
                let events = &mut *vop.events;
                timings.time("unpack", || {
                    unpack_into(
                        events,
                        &root,
                        &content,
                        &idmap,
                        &[],
                        fill.unsupported_metadata,
                    )
                    .map_err(|e| with_fill_numbers(driver, e, &root, &content, plan.target_size))
                })?;
                fault::point("rebuild:unpacked")?;
                if !keep.is_empty() {
                    let old = driver.open_root(live)?;
                    let events = &mut *vop.events;
                    timings.time("preserve", || {
                        copy_preserved(events, &old, &root, &keep, fill.unsupported_metadata)
                    })?;
                    old.release()?;
                }
                let id = seal(driver, vop.events, root, Slot::new(volume), &mut timings)?;
                fault::point("rebuild:synced")?;
                Ok(id)
            })();
            let new_id = match built {
                Ok(id) => id,
                Err(e) => return Err(vop.roll_back_new(e)),
            };
            vop.commit(IntentOp::Rebuild, new_id, with_snapshots, &mut timings)?;
        }
        Mode::InPlace => {
            vop.intent(IntentOp::RebuildInPlace, Phase::Detaching, with_snapshots)?;
            let op = IntentOp::RebuildInPlace;
            // Until the old content is destroyed, a failure puts it back.
            let prepared = (|| -> Result<Mounted> {
                fault::point("inplace:journaled")?;
                vop.events.progress(EventPhase::Prepare, 0, 1, "steps");
                driver.rename(live, Slot::old(volume))?;
                fault::point("inplace:detached")?;
                timings.time("prepare", || {
                    driver.create(
                        Slot::new(volume),
                        fault::quota_override().or(plan.target_size),
                    )
                })?;
                fault::point("inplace:created")?;
                let root = driver.open_root(Slot::new(volume))?;
                vop.events.progress(EventPhase::Prepare, 1, 1, "steps");
                if !keep.is_empty() {
                    let old = driver.open_root(Slot::old(volume))?;
                    let events = &mut *vop.events;
                    timings.time("preserve", || {
                        copy_preserved(events, &old, &root, &keep, fill.unsupported_metadata)
                    })?;
                    old.release()?;
                }
                cancelled_check()?;
                Ok(root)
            })();
            let root = match prepared {
                Ok(root) => root,
                Err(e) => return Err(vop.recover_after(e, op, Phase::Detaching, with_snapshots)),
            };
            vop.intent(op, Phase::DestroyingOld, with_snapshots)?;
            let built = (|| -> Result<String> {
                fault::point("inplace:destroying")?;
                timings.time("cleanup", || {
                    driver.destroy(Slot::old(volume), with_snapshots)
                })?;
                let events = &mut *vop.events;
                timings.time("unpack", || {
                    unpack_into(
                        events,
                        &root,
                        &content,
                        &idmap,
                        &keep,
                        fill.unsupported_metadata,
                    )
                    .map_err(|e| with_fill_numbers(driver, e, &root, &content, plan.target_size))
                })?;
                fault::point("inplace:unpacked")?;
                seal(driver, vop.events, root, Slot::new(volume), &mut timings)
            })();
            match built {
                Ok(new_id) => vop.commit(op, new_id, with_snapshots, &mut timings)?,
                Err(e) => {
                    // Past the point of no return: finish destroying the old content (a
                    // failure there may have left part of it), then drop the half-built new
                    // volume. If the old one cannot be destroyed now, the journal stays at
                    // this phase and `recover` finishes it.
                    let e = match driver.destroy(Slot::old(volume), with_snapshots) {
                        Ok(()) => vop.roll_back_new(e),
                        Err(again) => recovery_pending(e, &Error::from(again)),
                    };
                    return Err(e.with("volume_lost", true).context(format!(
                        "in-place rebuild failed after the old content of {volume} was destroyed; the volume is gone"
                    )));
                }
            }
        }
    }
    fill_result(driver, volume, &content, &timings)
}

/// Refuses to go on when the volume cannot be destroyed because other volumes are clones of
/// its snapshots: found now, before anything changes, not when the old content is cleaned up.
pub(super) fn refuse_clones(driver: &dyn Driver, volume: &VolumeName) -> Result<()> {
    let clones = driver.clones(Slot::live(volume))?;
    if clones.is_empty() {
        return Ok(());
    }
    Err(Error::new(
        Code::VolumeHasClones,
        format!(
            "the snapshots of volume {volume} have clones ({}), so they cannot be deleted; \
             promote the clones (`zfs promote`) or destroy them first, or rebuild with \
             \"snapshots\": \"keep\"",
            clones.join(", ")
        ),
    )
    .with("clones", clones))
}
