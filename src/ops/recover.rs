//! `recover`: finishes or rolls back what interrupted requests left, for a pool or a volume.

use super::*;

pub(super) fn recover(mut ctx: Ctx<'_>, only: Option<&VolumeName>) -> Result<Map<String, Value>> {
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
            recovered.push(outcome.to_json());
        }
    }
    let mut out = Map::new();
    out.insert("recovered".into(), Value::Array(recovered));
    if only.is_none() && driver.capabilities().image_volumes {
        let removed = remove_unsealed(ctx.state, &pool.name, driver)?;
        out.insert("unsealed_images_removed".into(), removed.into());
    }
    Ok(out)
}
