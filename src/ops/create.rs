//! `create`: a new volume, built in a temporary slot and published under its name.

use super::*;

pub(super) fn create(mut ctx: Ctx<'_>, volume: &VolumeName, fill: &Fill) -> Result<out::Filled> {
    let mut timings = Timings::start();
    let config = ctx.config;
    let pool = needs(&ctx)?.0.name.clone();
    let mut held = lock_volume(&mut ctx, volume)?;
    let driver = held.driver;
    if !fill.dry_run {
        held.recover_first()?;
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
        &mut held,
        fill,
        &idmap,
        None,
        Mode::Atomic,
        true,
        &pool,
        &mut timings,
    )?;
    if fill.dry_run {
        return Ok(dry_run_result(
            &planned(plan)?,
            &content,
            match content {
                Content::Template { .. } => &["clone", "sync", "publish"],
                _ => &["create", "unpack", "sync", "publish"],
            },
            false,
        ));
    }
    cancelled_check()?;
    let key = image_key(driver, &content, &idmap);
    let mut cache = Cache::Off;
    let filling = Filling::new(
        &content,
        &idmap,
        plan.as_ref(),
        PlanLater {
            fill,
            current: None,
            mode: Mode::Atomic,
        },
    );
    let mut measured = None;
    let new_id = held.journaled(
        IntentOp::Create,
        Phase::Building,
        false,
        |held| {
            fault::point("create:journaled")?;
            let (root, used, content) = build_new(
                held,
                &pool,
                key.as_ref(),
                &filling,
                "create:created",
                &mut timings,
            )?;
            cache = used;
            measured = content;
            fault::point("create:unpacked")?;
            seal(
                driver,
                held.events,
                root,
                Slot::building(volume),
                &mut timings,
            )
        },
        LockedVolume::roll_back_new,
    )?;
    held.commit(IntentOp::Create, new_id, false, &mut timings)?;
    let content = measured.unwrap_or(content);
    fill_result(driver, volume, &content, cache, &timings)
}
