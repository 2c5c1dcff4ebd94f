//! `recover`: finishes or rolls back what interrupted requests left, for a pool or a volume.

use super::*;

pub(super) fn recover(mut ctx: Ctx<'_>, only: Option<&VolumeName>) -> Result<out::Recovered> {
    let (pool, driver) = needs(&ctx)?;
    let journal = Journal::open(ctx.state, &pool.name)?;
    let mut volumes: Vec<VolumeName> = match only {
        Some(v) => vec![v.clone()],
        None => {
            let mut v = journal.volumes()?;
            v.extend(driver.leftovers()?.into_iter().map(|(name, _)| name));
            v
        }
    };
    volumes.sort();
    volumes.dedup();
    let mut recovered = Vec::new();
    for volume in &volumes {
        let mut held = match lock_volume(&mut ctx, volume) {
            Ok(v) => v,
            Err(e) if e.code == Code::Locked => {
                ctx.events.warning(
                    Warning::Locked,
                    &format!("volume {volume} is in use by a running request; skipped"),
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(outcome) = held.recover_first()? {
            recovered.push(recovered_volume(&outcome));
        }
    }
    let unsealed_images_removed = (only.is_none() && driver.capabilities().image_volumes)
        .then(|| remove_unsealed(ctx.state, &pool.name, driver))
        .transpose()?;
    Ok(out::Recovered {
        recovered,
        unsealed_images_removed,
    })
}

/// A recovery as the result reports it.
fn recovered_volume(outcome: &Outcome) -> out::RecoveredVolume {
    out::RecoveredVolume {
        volume: outcome.volume.as_str().to_owned(),
        op: outcome.op.map(|op| match op {
            IntentOp::Create => out::InterruptedOp::Create,
            IntentOp::Rebuild => out::InterruptedOp::Rebuild,
            IntentOp::RebuildInPlace => out::InterruptedOp::RebuildInPlace,
            IntentOp::RebuildRefill => out::InterruptedOp::RebuildKeepingSnapshots,
            IntentOp::Delete => out::InterruptedOp::Delete,
        }),
        action: match outcome.action {
            Action::RolledBack => out::RecoveryAction::RolledBack,
            Action::Completed => out::RecoveryAction::Completed,
            Action::Lost => out::RecoveryAction::Lost,
            Action::CleanedUp => out::RecoveryAction::CleanedUp,
        },
    }
}
