//! `measure`: the image's size and validity, changing nothing.

use super::*;

pub(super) fn measure(ctx: Ctx<'_>, source: &Source) -> Result<Map<String, Value>> {
    let mut timings = Timings::start();
    let content = open_and_measure(
        ctx.config,
        ctx.state,
        ctx.events,
        source,
        ctx.image,
        &IdMap::default(),
        &mut timings,
    )?;
    let mut out = Map::new();
    out.insert("image".into(), content.to_json());
    out.insert("timings_ms".into(), timings.to_json());
    Ok(out)
}
