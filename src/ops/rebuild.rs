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
) -> Result<out::Filled> {
    let mut timings = Timings::start();
    let config = ctx.config;
    let pool = needs(&ctx)?.0.name.clone();
    let mut held = lock_volume(&mut ctx, volume)?;
    let driver = held.driver;
    let pending = held.journal.read(volume)?.is_some();
    if !fill.dry_run {
        held.recover_first()?;
    }
    let live = Slot::live(volume);
    held.require_live("; use create")?;
    held.check_not_busy(live)?;
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
    if refill && matches!(fill.source, Source::Template { .. }) {
        return Err(Error::new(
            Code::Unsupported,
            format!(
                "the {} driver keeps snapshots by refilling the volume in place, and a template is cloned, not unpacked; rebuild from it with \"snapshots\": \"delete\"",
                driver.name()
            ),
        ));
    }
    let preserved = preserve_paths(preserve_list)?;
    let idmap = IdMap::new(fill.idmap.clone());
    let current = live_usage(driver, live, mode == Mode::InPlace || refill)?;
    // Only a new slot built beside the volume can be a clone of an image volume.
    let clones = mode == Mode::Atomic && !refill;
    let (content, plan) = measure_and_plan(
        config,
        &mut held,
        fill,
        &idmap,
        Some(&current),
        mode,
        clones,
        &pool,
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
            Mode::Atomic if matches!(content, Content::Template { .. }) => {
                &["clone", "preserve", "sync", "swap", "destroy old"]
            }
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
        return Ok(dry_run_result(&planned(plan)?, &content, steps, pending));
    }
    if !clones && driver.capabilities().image_volumes && matches!(content, Content::Image { .. }) {
        let why = if refill {
            format!(
                "keeping snapshots on the {} driver refills the volume in place",
                driver.name()
            )
        } else {
            "an in-place rebuild builds in the volume's own place".to_owned()
        };
        held.events.warning(
            Warning::ImageVolumeUnused,
            &format!(
                "the image was unpacked into volume {volume}, not cloned from the pool's \
                 image volume: {why} (an atomic rebuild that deletes snapshots clones it)"
            ),
        );
    }
    cancelled_check()?;
    if refill {
        refill_in_place(
            &mut held,
            &content,
            &planned(plan)?,
            &current,
            fill,
            &preserved,
            &mut timings,
        )?;
        return fill_result(driver, volume, &content, Cache::Off, &timings);
    }
    let key = image_key(driver, &content, &idmap);
    let mut cache = Cache::Off;
    let filling = Filling::new(
        &content,
        &idmap,
        plan.as_ref(),
        PlanLater {
            fill,
            current: Some(&current),
            mode,
        },
    );
    let mut measured = None;
    match mode {
        Mode::Atomic => {
            let op = IntentOp::Rebuild;
            let new_id = held.journaled(
                op,
                Phase::Building,
                with_snapshots,
                |held| {
                    fault::point("rebuild:journaled")?;
                    let (root, used, content) = build_new(
                        held,
                        &pool,
                        key.as_ref(),
                        &filling,
                        "rebuild:created",
                        &mut timings,
                    )?;
                    cache = used;
                    measured = content;
                    fault::point("rebuild:unpacked")?;
                    preserve_step(
                        held,
                        || driver.open_root(live),
                        &root,
                        &preserved,
                        filling.metadata,
                        &mut timings,
                    )?;
                    let id = seal(
                        driver,
                        held.events,
                        root,
                        Slot::building(volume),
                        &mut timings,
                    )?;
                    fault::point("rebuild:synced")?;
                    Ok(id)
                },
                LockedVolume::roll_back_new,
            )?;
            held.commit(op, new_id, with_snapshots, &mut timings)?;
        }
        Mode::InPlace => {
            let op = IntentOp::RebuildInPlace;
            // Until the old content is destroyed, a failure puts it back.
            let root = held.journaled(
                op,
                Phase::Detaching,
                with_snapshots,
                |held| {
                    fault::point("inplace:journaled")?;
                    driver.rename(live, Slot::old(volume))?;
                    fault::point("inplace:detached")?;
                    let root =
                        create_new(held, filling.target_size, "inplace:created", &mut timings)?;
                    preserve_step(
                        held,
                        || driver.open_root(Slot::old(volume)),
                        &root,
                        &preserved,
                        filling.metadata,
                        &mut timings,
                    )?;
                    cancelled_check()?;
                    Ok(root)
                },
                LockedVolume::recover_from(op, Phase::Detaching, with_snapshots),
            )?;
            let new_id = held.journaled(
                op,
                Phase::DestroyingOld,
                with_snapshots,
                |held| {
                    fault::point("inplace:destroying")?;
                    timings.time("cleanup", || {
                        driver.destroy(Slot::old(volume), with_snapshots)
                    })?;
                    unpack_step(held, &root, &filling, &preserved, &mut timings)?;
                    fault::point("inplace:unpacked")?;
                    seal(driver, held.events, root, Slot::building(volume), &mut timings)
                },
                |held, e| {
                    // Past the point of no return: finish destroying the old content (a
                    // failure there may have left part of it), then drop the half-built new
                    // volume. If the old one cannot be destroyed now, the journal stays at
                    // this phase and `recover` finishes it.
                    let e = match driver.destroy(Slot::old(volume), with_snapshots) {
                        Ok(()) => held.roll_back_new(e),
                        Err(again) => recovery_pending(e, &Error::from(again)),
                    };
                    e.with("volume_lost", true).context(format!(
                        "in-place rebuild failed after the old content of {volume} was destroyed; the volume is gone"
                    ))
                },
            )?;
            held.commit(op, new_id, with_snapshots, &mut timings)?;
        }
    }
    let content = measured.unwrap_or(content);
    fill_result(driver, volume, &content, cache, &timings)
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

/// What the plan needs of the volume being replaced: its limit always; its bytes and inodes
/// only when it is refilled or replaced in place (what the fill frees or must leave room
/// for). A pool without counters (quotas off) has no limits either, so an atomic rebuild
/// there reads nothing: a walk of the old tree would cost time proportional to its files.
fn live_usage(driver: &dyn Driver, live: Slot<'_>, in_place: bool) -> Result<Usage> {
    if in_place || driver.capabilities().cheap_usage {
        return driver.usage(live).map_err(Error::from);
    }
    Ok(Usage {
        size: None,
        used: 0,
        inodes: None,
    })
}
