//! `create`: a new volume, built in a temporary slot and published under its name.

use super::*;

pub(super) fn create(
    mut ctx: Ctx<'_>,
    volume: &VolumeName,
    fill: &Fill,
) -> Result<Map<String, Value>> {
    let mut timings = Timings::start();
    let config = ctx.config;
    let mut vop = lock_volume(&mut ctx, volume)?;
    let driver = vop.driver;
    if !fill.dry_run {
        vop.recover_first()?;
    }
    if driver.identity(Slot::live(volume))?.is_some() {
        return Err(Error::new(
            Code::AlreadyExists,
            format!("volume {volume} already exists; use rebuild to replace its content"),
        ));
    }
    // A new volume starts with no history, whatever an earlier one of that name left.
    if !fill.dry_run {
        driver.forget(volume)?;
    }
    let idmap = IdMap::new(fill.idmap.clone());
    let (content, plan) = measure_and_plan(
        config,
        &mut vop,
        fill,
        &idmap,
        None,
        Mode::Atomic,
        &mut timings,
    )?;
    if fill.dry_run {
        return Ok(dry_run_result(
            &plan,
            &content,
            &["create", "unpack", "sync", "publish"],
            false,
        ));
    }
    cancelled_check()?;
    vop.intent(IntentOp::Create, Phase::Building, false)?;
    let built = (|| -> Result<String> {
        fault::point("create:journaled")?;
        vop.events.progress(EventPhase::Prepare, 0, 1, "steps");
        timings.time("prepare", || {
            driver.create(
                Slot::new(volume),
                fault::quota_override().or(plan.target_size),
            )
        })?;
        fault::point("create:created")?;
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
        fault::point("create:unpacked")?;
        seal(driver, vop.events, root, Slot::new(volume), &mut timings)
    })();
    let new_id = match built {
        Ok(id) => id,
        Err(e) => return Err(vop.roll_back_new(e)),
    };
    vop.commit(IntentOp::Create, new_id, false, &mut timings)?;
    fill_result(driver, volume, &content, &timings)
}
