//! The operations: each takes a parsed request, plans it (measure, size, space) before it
//! changes anything, then carries the plan out step by step, journaling before every
//! destructive step and rolling back on failure.
//!
//! Flow, with no step going back to an earlier one: lock → recover what a crash left →
//! check → measure → plan → (dry run stops here) → build in a temporary slot → commit under
//! the volume's name → clean up → result.

mod content;
mod create;
mod delete;
mod fill;
mod image_volume;
mod images;
mod inspect;
mod locked_volume;
mod measure;
mod one_pass;
mod prune;
mod rebuild;
mod recover;
mod refill;
mod resize;
mod template;
mod timings;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::PathBuf;
use std::time::Instant;

use reimage_driver::records::RecordDir;
use reimage_driver::{
    tree, Driver, KeepSnapshots, Mounted, PoolWarning, Slot, SlotKind, Usage, VolumeName,
};

use crate::config::{Config, Pool};
use crate::error::{Code, Error, Result, Warning};
use crate::image;
use crate::journal::{Intent, IntentOp, Journal, Phase};
use crate::lock::VolumeLock;
use crate::measure::{cache, digest, measure_image, Measurement, Tally};
use crate::plan::{plan_fill, Blocks, Need, Plan};
use crate::protocol::events::{Events, Phase as EventPhase, Unit};
use crate::protocol::request::{
    Fill, Mode, Op, SizePolicy, SnapshotPolicy, Source, UnsupportedMetadata,
};
use crate::protocol::results::{self as out, Cache, OpResult};
use crate::recover::{recover_orphans, recover_volume, Action, Outcome};
use crate::unpack::idmap::IdMap;
use crate::unpack::path::{normalize, RelPath};
use crate::unpack::{self, Observer};
use crate::{fault, preserve, signals};

use content::*;
use create::*;
use delete::*;
use fill::*;
use image_volume::*;
use images::*;
use inspect::*;
use locked_volume::*;
use measure::*;
use one_pass::*;
use prune::*;
use rebuild::*;
use recover::*;
use refill::*;
use resize::*;
use template::*;
use timings::*;

/// Everything an operation works with.
pub struct Ctx<'a> {
    pub config: &'a Config,
    /// The state directory, opened once per request.
    pub state: &'a RecordDir,
    pub pool: Option<&'a Pool>,
    pub driver: Option<&'a dyn Driver>,
    pub events: &'a mut Events,
    /// The request's image, opened once when the policy allowed it (`None` without one).
    pub image: Option<&'a OpenedImage>,
}

/// An image file opened by its resolved path, and that path.
pub type OpenedImage = (File, PathBuf);

pub fn run(ctx: Ctx<'_>, op: &Op) -> Result<OpResult> {
    if let Some(driver) = ctx.driver {
        for (condition, message) in driver.warnings() {
            let code = match condition {
                PoolWarning::QuotaUnavailable => Warning::QuotaUnavailable,
            };
            ctx.events.warning(code, &message);
        }
    }
    match op {
        Op::Measure { source } => measure(ctx, source).map(OpResult::Measure),
        Op::Recover { volume, .. } => recover(ctx, volume.as_ref()).map(OpResult::Recover),
        Op::Inspect { volume, walk, .. } => inspect(ctx, volume, *walk).map(OpResult::Inspect),
        Op::Create { volume, fill, .. } => create(ctx, volume, fill).map(OpResult::Create),
        Op::Rebuild {
            volume,
            fill,
            snapshots,
            mode,
            preserve,
            ..
        } => rebuild(ctx, volume, fill, *snapshots, *mode, preserve).map(OpResult::Rebuild),
        Op::Delete {
            volume, snapshots, ..
        } => delete(ctx, volume, *snapshots).map(OpResult::Delete),
        Op::Resize { volume, size, .. } => resize(ctx, volume, *size).map(OpResult::Resize),
        Op::Images { .. } => images(ctx).map(OpResult::Images),
        Op::Prune {
            older_than,
            dry_run,
            ..
        } => prune(ctx, *older_than, *dry_run).map(OpResult::Prune),
    }
}

fn needs<'a>(ctx: &Ctx<'a>) -> Result<(&'a Pool, &'a dyn Driver)> {
    match (ctx.pool, ctx.driver) {
        (Some(p), Some(d)) => Ok((p, d)),
        _ => Err(Error::internal("this op needs a pool")),
    }
}

fn lock_volume<'a>(ctx: &'a mut Ctx<'_>, volume: &'a VolumeName) -> Result<LockedVolume<'a>> {
    let (pool, driver) = needs(ctx)?;
    let lock = VolumeLock::acquire(ctx.state, &pool.name, volume.as_str())?;
    Ok(LockedVolume {
        driver,
        journal: Journal::open(ctx.state, &pool.name)?,
        state: ctx.state,
        volume,
        events: ctx.events,
        image: ctx.image,
        _lock: lock,
    })
}

fn cancelled_check() -> Result<()> {
    if signals::cancelled() {
        return Err(Error::new(
            Code::Interrupted,
            "interrupted by a signal; nothing was changed",
        ));
    }
    Ok(())
}

/// `err`, saying that recovery failed too and is left to `recover`.
fn recovery_pending(err: Error, again: &Error) -> Error {
    err.with(
        "recovery",
        format!("pending: {}; run recover", again.message),
    )
}
