//! `measure`: the image's size and validity, changing nothing.

use super::*;

pub(super) fn measure(ctx: Ctx<'_>, source: &Source) -> Result<out::Measured> {
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
    Ok(out::Measured {
        image: content.to_info(None),
        timings_ms: timings.to_ms(),
    })
}
