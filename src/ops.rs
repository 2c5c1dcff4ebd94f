//! The operations: each takes a parsed request, plans it (measure, size, space) before it
//! changes anything, then carries the plan out step by step, journaling before every
//! destructive step and rolling back on failure.
//!
//! Flow, with no step going back to an earlier one: lock → recover what a crash left →
//! check → measure → plan → (dry run stops here) → build in a temporary slot → commit under
//! the volume's name → clean up → result.

use std::fs::File;
use std::path::PathBuf;
use std::time::Instant;

use reimage_driver::{tree, Driver, KeepSnapshots, Mounted, Slot, SlotKind, Usage, VolumeName};
use serde_json::{json, Map, Value};

use crate::config::{Config, Pool};
use crate::error::{Code, Error, Result};
use crate::image::{self, Format};
use crate::journal::{Intent, IntentOp, Journal, Phase};
use crate::lock::VolumeLock;
use crate::measure::{cache, measure_squashfs, measure_tar, Measurement};
use crate::plan::{plan_fill, Need, Plan};
use crate::protocol::events::{Events, Phase as EventPhase};
use crate::protocol::request::{Fill, Mode, Op, SnapshotPolicy, Source, UnsupportedMetadata};
use crate::recover::{recover_orphans, recover_volume, Outcome};
use crate::unpack::idmap::IdMap;
use crate::unpack::path::{normalize, RelPath};
use crate::unpack::{self, Observer};
use crate::{fault, preserve, signals};

/// Everything an operation works with.
pub struct Ctx<'a> {
    pub config: &'a Config,
    pub pool: Option<&'a Pool>,
    pub driver: Option<&'a dyn Driver>,
    pub events: &'a mut Events,
}

/// Wall time of each phase, for `timings_ms`.
#[derive(Default)]
struct Timings {
    phases: Map<String, Value>,
    started: Option<Instant>,
}

impl Timings {
    fn start() -> Self {
        Timings {
            phases: Map::new(),
            started: Some(Instant::now()),
        }
    }

    fn time<T>(&mut self, name: &str, step: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = step();
        let ms = t.elapsed().as_millis() as u64;
        let before = self.phases.get(name).and_then(Value::as_u64).unwrap_or(0);
        self.phases.insert(name.to_owned(), (before + ms).into());
        out
    }

    fn to_json(&self) -> Value {
        let mut m = self.phases.clone();
        if let Some(s) = self.started {
            m.insert("total".into(), (s.elapsed().as_millis() as u64).into());
        }
        Value::Object(m)
    }
}

/// An image opened and measured, or nothing for an empty volume.
enum Content {
    Empty,
    Image {
        file: File,
        path: PathBuf,
        measurement: Measurement,
    },
}

impl Content {
    fn measurement(&self) -> Measurement {
        match self {
            Content::Empty => Measurement::empty(),
            Content::Image { measurement, .. } => measurement.clone(),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Content::Empty => json!({"empty": true}),
            Content::Image {
                path, measurement, ..
            } => {
                let mut v = measurement.to_json();
                v["path"] = path.display().to_string().into();
                v
            }
        }
    }
}

/// Progress and cancellation for the unpacker.
struct UnpackObserver<'e> {
    events: &'e mut Events,
    total: u64,
}

impl Observer for UnpackObserver<'_> {
    fn progress(&mut self, done: u64) {
        self.events
            .progress(EventPhase::Unpack, done, self.total, "bytes");
    }
    fn warning(&mut self, code: &str, message: &str) {
        self.events.warning(code, message);
    }
    fn cancelled(&self) -> bool {
        signals::cancelled()
    }
}

fn open_and_measure(
    config: &Config,
    events: &mut Events,
    source: &Source,
    idmap: &IdMap,
    timings: &mut Timings,
) -> Result<Content> {
    let (path, prefix) = match source {
        Source::Empty => return Ok(Content::Empty),
        Source::Image {
            path,
            rootfs_prefix,
        } => (path, rootfs_prefix.as_deref()),
    };
    let (file, resolved) = config.open_image(path)?;
    let detected = image::detect(&file)?;
    let key = cache::key(&file, prefix, idmap.ranges());
    let remembered = key
        .as_deref()
        .and_then(|k| cache::lookup(&config.state_dir, k));
    let measurement = match remembered {
        Some(m) => {
            timings.time("measure", || ());
            events.progress(EventPhase::Measure, 1, 1, "cached");
            m
        }
        None => {
            let m = timings.time("measure", || match detected.format {
                Format::Tar => measure_tar(
                    &file,
                    detected.compression,
                    prefix,
                    idmap,
                    &mut |done, total| events.progress(EventPhase::Measure, done, total, "bytes"),
                ),
                Format::Squashfs => measure_squashfs(&file, prefix, idmap),
            })?;
            if let Some(k) = &key {
                cache::store(&config.state_dir, k, &m);
            }
            m
        }
    };
    Ok(Content::Image {
        file,
        path: resolved,
        measurement,
    })
}

fn preserve_paths(paths: &[PathBuf]) -> Result<Vec<RelPath>> {
    paths
        .iter()
        .map(|p| {
            use std::os::unix::ffi::OsStrExt;
            normalize(p.as_os_str().as_bytes())
                .map_err(|e| Error::new(Code::InvalidRequest, e.message).with("path", "preserve"))
        })
        .collect()
}

/// A full volume, with the numbers that explain it: its size, what measure expected, and
/// what the filesystem had left in bytes and inodes when it refused.
fn with_fill_numbers(
    driver: &dyn Driver,
    err: Error,
    root: &Mounted,
    content: &Content,
    size: Option<u64>,
) -> Error {
    if !matches!(err.code, Code::InsufficientSpace | Code::QuotaExceeded) {
        return err;
    }
    let mut err = err;
    if err.code == Code::InsufficientSpace && driver.capabilities().limit_reads_as_full {
        // The volume is full but the pool is not: that is the volume's limit.
        if driver.pool_space().is_ok_and(|s| s.available > 1 << 20) {
            err.code = Code::QuotaExceeded;
            err.message = format!(
                "{} — the volume's quota is exhausted (this filesystem reports it as a full disk)",
                err.message
            );
        }
    }
    let mut err = err
        .with("volume_size", size)
        .with("measured", content.measurement().tally.allocated_bytes);
    if let Ok(st) = rustix::fs::fstatvfs(root.root()) {
        err = err
            .with("free_bytes", st.f_bavail.saturating_mul(st.f_frsize))
            .with("free_inodes", st.f_favail);
    }
    err
}

/// Unpacks `content` into the open root of the volume being built.
fn unpack_into(
    events: &mut Events,
    root: &Mounted,
    content: &Content,
    idmap: &IdMap,
    skip: &[RelPath],
    metadata: UnsupportedMetadata,
) -> Result<()> {
    let Content::Image {
        file, measurement, ..
    } = content
    else {
        if !idmap.is_identity() {
            let owner = idmap.map(0).unwrap_or(0);
            rustix::fs::fchown(
                root.root(),
                Some(rustix::fs::Uid::from_raw(owner)),
                Some(rustix::fs::Gid::from_raw(owner)),
            )
            .map_err(|e| {
                Error::new(
                    Code::DriverError,
                    format!("chown of the new volume's root: {e}"),
                )
            })?;
        }
        return Ok(());
    };
    let options = unpack::Options {
        prefix: measurement.rootfs_prefix.clone(),
        idmap: idmap.clone(),
        skip: skip.to_vec(),
        expected_bytes: Some(measurement.tally.unpacked_bytes),
        unsupported_metadata: metadata,
    };
    let total = measurement.tally.unpacked_bytes;
    events.progress(EventPhase::Unpack, 0, total, "bytes");
    match measurement.format {
        Format::Tar => {
            let (stream, _) = image::open_stream(file, measurement.compression)?;
            let mut reader = image::tar::TarReader::new(stream);
            let mut observer = UnpackObserver { events, total };
            unpack::unpack(&mut reader, root.root(), &options, &mut observer)?;
        }
        Format::Squashfs => {
            let mut image = image::squashfs::Squashfs::open(file)?;
            let mut observer = UnpackObserver { events, total };
            unpack::unpack(&mut image, root.root(), &options, &mut observer)?;
            for socket in &image.skipped_sockets {
                events.warning("socket_skipped", &format!("{socket} is a socket; sockets belong to running programs and are not unpacked"));
            }
        }
    }
    Ok(())
}

/// The volume as results describe it. `with_usage` false leaves `used` and `inodes` null for
/// drivers that would have to walk the whole tree to know them.
fn volume_json(driver: &dyn Driver, volume: &VolumeName) -> Result<Value> {
    volume_json_with(driver, volume, true)
}

fn volume_json_with(driver: &dyn Driver, volume: &VolumeName, with_usage: bool) -> Result<Value> {
    let usage = (with_usage || driver.capabilities().cheap_usage)
        .then(|| driver.usage(Slot::live(volume)))
        .transpose()?;
    let snapshots = driver.snapshots(Slot::live(volume))?;
    Ok(json!({
        "name": volume.as_str(),
        "exists": true,
        "size": usage.as_ref().and_then(|u| u.size),
        "used": usage.as_ref().map(|u| u.used),
        "inodes": usage.as_ref().and_then(|u| u.inodes),
        "snapshots": snapshots,
    }))
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

/// One volume's operation context: driver, journal and the held lock.
struct VolumeOp<'a> {
    driver: &'a dyn Driver,
    journal: Journal,
    volume: &'a VolumeName,
    events: &'a mut Events,
    _lock: VolumeLock,
}

impl VolumeOp<'_> {
    fn intent(&self, op: IntentOp, phase: Phase, with_snapshots: bool) -> Result<()> {
        self.journal.write(
            self.volume,
            &Intent {
                op,
                phase,
                with_snapshots,
                pid: std::process::id(),
            },
        )
    }

    /// Finishes or rolls back what an earlier, interrupted request left for this volume.
    fn recover_first(&mut self) -> Result<Option<Outcome>> {
        let outcome = match self.journal.read(self.volume)? {
            Some(intent) => Some(recover_volume(
                self.driver,
                &self.journal,
                self.volume,
                &intent,
            )?),
            None => recover_orphans(self.driver, self.volume)?,
        };
        if let Some(o) = &outcome {
            self.events.warning("recovered", &o.describe());
        }
        Ok(outcome)
    }

    /// Finishes or rolls back from `phase` at once, as `recover` would after a crash there.
    fn try_recover(&self, op: IntentOp, phase: Phase, with_snapshots: bool) -> Result<()> {
        let intent = Intent {
            op,
            phase,
            with_snapshots,
            pid: std::process::id(),
        };
        recover_volume(self.driver, &self.journal, self.volume, &intent).map(|_| ())
    }

    /// After a failed step: recovers from `phase` and returns `err`, noting when even that
    /// failed (the journal then stays for `recover`).
    fn recover_after(&self, err: Error, op: IntentOp, phase: Phase, with_snapshots: bool) -> Error {
        match self.try_recover(op, phase, with_snapshots) {
            Ok(()) => err,
            Err(again) => recovery_pending(err, &again),
        }
    }

    /// Destroys the `New` slot after a failure and clears the journal; if that fails too the
    /// journal stays so that the next request finishes the job, and the error says so.
    fn roll_back_new(&mut self, err: Error) -> Error {
        let undone = self
            .driver
            .destroy(Slot::new(self.volume), false)
            .map_err(Error::from)
            .and_then(|()| self.journal.clear(self.volume));
        match undone {
            Ok(()) => err,
            Err(e) => recovery_pending(err, &e).context("rolled back only partly"),
        }
    }

    fn check_not_busy(&self, slot: Slot<'_>) -> Result<()> {
        if let Some(holder) = self.driver.busy(slot)? {
            return Err(Error::new(
                Code::VolumeBusy,
                format!("{slot} is in use ({holder}); stop what uses it first"),
            )
            .with("holder", holder));
        }
        Ok(())
    }

    /// Commits the complete new volume (identity `new_id`) under the volume's name.
    fn commit(
        &mut self,
        op: IntentOp,
        new_id: String,
        with_snapshots: bool,
        timings: &mut Timings,
    ) -> Result<()> {
        self.intent(
            op,
            Phase::Committing {
                new_id: new_id.clone(),
            },
            with_snapshots,
        )?;
        fault::point("commit:journaled")?;
        let (driver, volume) = (self.driver, self.volume);
        let swapped = timings.time("swap", || -> Result<()> {
            let live_exists = driver.identity(Slot::live(volume))?.is_some();
            if !live_exists {
                driver.rename(Slot::new(volume), Slot::live(volume))?;
            } else if driver.capabilities().exchange {
                driver.exchange(Slot::live(volume), Slot::new(volume))?;
            } else {
                driver.rename(Slot::live(volume), Slot::old(volume))?;
                driver.rename(Slot::new(volume), Slot::live(volume))?;
            }
            Ok(())
        });
        if let Err(e) = swapped {
            // The new volume is complete: finishing the swap is the recovery.
            return self
                .try_recover(op, Phase::Committing { new_id }, with_snapshots)
                .map_err(|again| recovery_pending(e, &again));
        }
        fault::point("commit:swapped")?;
        self.events.progress(EventPhase::Swap, 1, 1, "steps");
        let cleaned = timings.time("cleanup", || -> Result<()> {
            let [_, new, old] = driver.identities(volume)?;
            for (kind, id) in [(SlotKind::New, new), (SlotKind::Old, old)] {
                if id.is_some_and(|id| id != new_id) {
                    driver.destroy(Slot { volume, kind }, with_snapshots)?;
                }
            }
            Ok(())
        });
        let cleaned = cleaned.and_then(|()| fault::point("commit:cleaned"));
        match cleaned {
            Ok(()) => self.journal.clear(volume)?,
            Err(e) => self.events.warning(
                "cleanup_pending",
                &format!("the new volume is in place but the old content could not be removed yet ({}); the next request or `recover` removes it", e.message),
            ),
        }
        self.events.progress(EventPhase::Cleanup, 1, 1, "steps");
        Ok(())
    }
}

/// `err`, saying that recovery failed too and is left to `recover`.
fn recovery_pending(err: Error, again: &Error) -> Error {
    err.with(
        "recovery",
        format!("pending: {}; run recover", again.message),
    )
}

/// Syncs and closes the volume being built in `slot`, and returns its identity.
fn seal(
    driver: &dyn Driver,
    events: &mut Events,
    root: Mounted,
    slot: Slot<'_>,
    timings: &mut Timings,
) -> Result<String> {
    events.progress(EventPhase::Sync, 0, 1, "steps");
    timings.time("sync", || driver.sync(slot, root.root()))?;
    root.release()?;
    events.progress(EventPhase::Sync, 1, 1, "steps");
    cancelled_check()?;
    driver
        .identity(slot)?
        .ok_or_else(|| Error::internal(format!("{slot} vanished before it was committed")))
}

pub fn run(ctx: Ctx<'_>, op: &Op) -> Result<Map<String, Value>> {
    if let Some(driver) = ctx.driver {
        for (code, message) in driver.warnings() {
            ctx.events.warning(code, &message);
        }
    }
    match op {
        Op::Measure { source } => measure(ctx, source),
        Op::Recover { volume, .. } => recover(ctx, volume.as_ref()),
        Op::Inspect { volume, .. } => inspect(ctx, volume),
        Op::Create { volume, fill, .. } => create(ctx, volume, fill),
        Op::Rebuild {
            volume,
            fill,
            snapshots,
            mode,
            preserve,
            ..
        } => rebuild(ctx, volume, fill, *snapshots, *mode, preserve),
        Op::Delete {
            volume, snapshots, ..
        } => delete(ctx, volume, *snapshots),
        Op::Resize { volume, size, .. } => resize(ctx, volume, *size),
    }
}

fn needs<'a>(ctx: &Ctx<'a>) -> Result<(&'a Pool, &'a dyn Driver)> {
    match (ctx.pool, ctx.driver) {
        (Some(p), Some(d)) => Ok((p, d)),
        _ => Err(Error::internal("this op needs a pool")),
    }
}

fn lock_volume<'a>(ctx: &'a mut Ctx<'_>, volume: &'a VolumeName) -> Result<VolumeOp<'a>> {
    let (pool, driver) = needs(ctx)?;
    let lock = VolumeLock::acquire(&ctx.config.state_dir, &pool.name, volume.as_str())?;
    Ok(VolumeOp {
        driver,
        journal: Journal::new(&ctx.config.state_dir, &pool.name),
        volume,
        events: ctx.events,
        _lock: lock,
    })
}

fn measure(ctx: Ctx<'_>, source: &Source) -> Result<Map<String, Value>> {
    let mut timings = Timings::start();
    let content = open_and_measure(
        ctx.config,
        ctx.events,
        source,
        &IdMap::default(),
        &mut timings,
    )?;
    let mut out = Map::new();
    out.insert("image".into(), content.to_json());
    out.insert("timings_ms".into(), timings.to_json());
    Ok(out)
}

fn inspect(ctx: Ctx<'_>, volume: &VolumeName) -> Result<Map<String, Value>> {
    let (pool, driver) = needs(&ctx)?;
    let journal = Journal::new(&ctx.config.state_dir, &pool.name);
    let pending =
        journal.read(volume)?.is_some() || driver.leftovers()?.iter().any(|(v, _)| v == volume);
    let mut info = if driver.identity(Slot::live(volume))?.is_some() {
        volume_json(driver, volume)?
    } else {
        json!({"name": volume.as_str(), "exists": false})
    };
    info["pending_recovery"] = pending.into();
    // Added to v1: what the driver can do, so callers (and the conformance suite) need not guess.
    let caps = driver.capabilities();
    info["capabilities"] = json!({
        "snapshots": caps.snapshots,
        "keep_snapshots": caps.keep_snapshots != reimage_driver::KeepSnapshots::No,
        // Added: how snapshots are kept: "independent" (they outlive the volume) or
        // "refill" (the volume is refilled in place under a guard snapshot).
        "keep_snapshots_by": match caps.keep_snapshots {
            reimage_driver::KeepSnapshots::No => Value::Null,
            reimage_driver::KeepSnapshots::Independent => "independent".into(),
            reimage_driver::KeepSnapshots::Refill => "refill".into(),
        },
        "size_limit": match caps.size_model {
            reimage_driver::SizeModel::Unlimited => "none",
            reimage_driver::SizeModel::Quota => "quota",
            reimage_driver::SizeModel::Allocated => "allocated",
        },
        "shrink": caps.shrink,
    });
    let mut out = Map::new();
    out.insert("volume".into(), info);
    Ok(out)
}

fn fill_result(
    driver: &dyn Driver,
    volume: &VolumeName,
    content: &Content,
    timings: &Timings,
) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    out.insert("volume".into(), volume_json_with(driver, volume, false)?);
    out.insert("image".into(), content.to_json());
    out.insert("timings_ms".into(), timings.to_json());
    Ok(out)
}

fn dry_run_result(
    plan: &Plan,
    content: &Content,
    steps: &[&str],
    pending: bool,
) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("dry_run".into(), true.into());
    let mut p = plan.to_json(steps);
    p["pending_recovery"] = pending.into();
    out.insert("plan".into(), p);
    out.insert("image".into(), content.to_json());
    out
}

/// Measures the fill's content and plans its size and space against the pool (the steps
/// create and rebuild share before anything changes); warns when `size` cannot be enforced.
fn measure_and_plan(
    config: &Config,
    vop: &mut VolumeOp<'_>,
    fill: &Fill,
    idmap: &IdMap,
    current: Option<&reimage_driver::Usage>,
    mode: Mode,
    timings: &mut Timings,
) -> Result<(Content, Plan)> {
    let content = open_and_measure(config, vop.events, &fill.source, idmap, timings)?;
    let tally = content.measurement().tally;
    let need = Need {
        bytes: tally.allocated_bytes,
        inodes: tally.inodes,
    };
    let driver = vop.driver;
    let plan = plan_fill(
        driver.capabilities().size_model,
        fill,
        need,
        current,
        mode,
        driver.pool_space()?,
    )?;
    if let (Some((provisioned, total)), Some(size)) = (plan.provisioned, plan.target_size) {
        // The old volume's promise goes away in a rebuild; it is still counted here, as it
        // stands until the swap.
        if provisioned.saturating_add(size) > total {
            vop.events.warning(
                "overcommitted",
                &format!(
                    "the pool's volumes are promised {} bytes with this one, more than the {total} the pool has; writes fail when it fills up",
                    provisioned.saturating_add(size)
                ),
            );
        }
    }
    if plan.size_ignored {
        vop.events.warning(
            "size_ignored",
            &format!(
                "the {} driver cannot limit a volume's size on this pool; `size` is not enforced",
                driver.name()
            ),
        );
    }
    Ok((content, plan))
}

fn create(mut ctx: Ctx<'_>, volume: &VolumeName, fill: &Fill) -> Result<Map<String, Value>> {
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

fn rebuild(
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
                    let e = vop.roll_back_new(e);
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
fn refuse_clones(driver: &dyn Driver, volume: &VolumeName) -> Result<()> {
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

/// A rebuild that keeps snapshots living inside the volume ([`KeepSnapshots::Refill`]): the
/// volume is emptied and refilled where it is, after a guard snapshot of its old content was
/// taken. Any failure before the new content is synced, and any crash (through `recover`),
/// rolls the volume back to the guard, and its size back to what it was; success drops the
/// guard. Existing snapshots are never touched.
fn refill_in_place(
    vop: &mut VolumeOp<'_>,
    content: &Content,
    plan: &Plan,
    current: &Usage,
    fill: &Fill,
    keep: &[RelPath],
    timings: &mut Timings,
) -> Result<()> {
    let idmap = &IdMap::new(fill.idmap.clone());
    let metadata = fill.unsupported_metadata;
    let (driver, volume) = (vop.driver, vop.volume);
    let live = Slot::live(volume);
    let op = IntentOp::RebuildRefill;
    let counts_snapshots = driver.capabilities().size_counts_snapshots;
    let refilling = Phase::Refilling {
        size_before: current.size,
    };
    vop.intent(op, refilling.clone(), false)?;
    let built = (|| -> Result<()> {
        fault::point("refill:journaled")?;
        vop.events.progress(EventPhase::Prepare, 0, 1, "steps");
        driver.set_guard(live)?;
        fault::point("refill:guarded")?;
        if let Some(target) = plan.target_size {
            // A limit that counts snapshots must also hold the old content the guard keeps.
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
        vop.events.progress(EventPhase::Prepare, 1, 1, "steps");
        let events = &mut *vop.events;
        timings.time("unpack", || {
            unpack_into(events, &root, content, idmap, &[], metadata)
                .map_err(|e| with_fill_numbers(driver, e, &root, content, plan.target_size))
        })?;
        fault::point("refill:unpacked")?;
        if !keep.is_empty() {
            let old = driver.open_guard(live)?;
            let events = &mut *vop.events;
            timings.time("preserve", || {
                copy_preserved(events, &old, &root, keep, metadata)
            })?;
            old.release()?;
        }
        seal(driver, vop.events, root, live, timings)?;
        fault::point("refill:synced")
    })();
    if let Err(e) = built {
        return Err(vop.recover_after(e, op, refilling, false));
    }
    vop.intent(op, Phase::Refilled, false)?;
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
        Ok(()) => vop.journal.clear(volume)?,
        Err(e) => vop.events.warning(
            "cleanup_pending",
            &format!("the volume holds the new content but its guard snapshot could not be removed yet ({}); the next request or `recover` removes it", e.message),
        ),
    }
    vop.events.progress(EventPhase::Cleanup, 1, 1, "steps");
    Ok(())
}

fn copy_preserved(
    events: &mut Events,
    old: &Mounted,
    new: &Mounted,
    keep: &[RelPath],
    metadata: UnsupportedMetadata,
) -> Result<()> {
    events.progress(EventPhase::Preserve, 0, keep.len() as u64, "paths");
    let mut missing = Vec::new();
    preserve::preserve(
        old.root(),
        new.root(),
        keep,
        &mut |p| missing.push(p.shown()),
        &mut |path, failure| match metadata {
            UnsupportedMetadata::Fail => Err(unpack::unsupported_metadata(path, failure)),
            UnsupportedMetadata::Warn => {
                events.warning(
                    "xattr_failed",
                    &format!(
                        "could not set xattr {} on {}: {}",
                        failure.name,
                        path.shown(),
                        std::io::Error::from(failure.errno)
                    ),
                );
                Ok(())
            }
        },
    )?;
    for p in missing {
        events.warning(
            "preserve_missing",
            &format!("{p} does not exist in the old volume; nothing to preserve"),
        );
    }
    events.progress(
        EventPhase::Preserve,
        keep.len() as u64,
        keep.len() as u64,
        "paths",
    );
    Ok(())
}

fn delete(
    mut ctx: Ctx<'_>,
    volume: &VolumeName,
    snapshots: SnapshotPolicy,
) -> Result<Map<String, Value>> {
    let mut vop = lock_volume(&mut ctx, volume)?;
    let driver = vop.driver;
    vop.recover_first()?;
    let live = Slot::live(volume);
    if driver.identity(live)?.is_none() {
        return Err(Error::new(
            Code::NotFound,
            format!("volume {volume} does not exist"),
        ));
    }
    vop.check_not_busy(live)?;
    let existing = driver.snapshots(live)?;
    if !existing.is_empty() && snapshots == SnapshotPolicy::Refuse {
        return Err(Error::new(
            Code::VolumeHasSnapshots,
            format!(
                "volume {volume} has snapshots ({}); pass \"snapshots\": \"delete\"",
                existing.join(", ")
            ),
        )
        .with("snapshots", existing));
    }
    let with_snapshots = snapshots == SnapshotPolicy::Delete;
    if with_snapshots {
        refuse_clones(driver, volume)?;
    }
    vop.intent(IntentOp::Delete, Phase::Deleting, with_snapshots)?;
    vop.events.progress(EventPhase::Cleanup, 0, 1, "steps");
    let deleted = (|| -> Result<()> {
        fault::point("delete:journaled")?;
        driver.rename(live, Slot::old(volume))?;
        fault::point("delete:detached")?;
        driver.destroy(Slot::old(volume), with_snapshots)?;
        fault::point("delete:destroyed")
    })();
    if let Err(e) = deleted {
        // Finish what can be finished: a volume moved aside is deleted, one still under its
        // name stays.
        return Err(vop.recover_after(e, IntentOp::Delete, Phase::Deleting, with_snapshots));
    }
    vop.journal.clear(volume)?;
    driver.forget(volume)?;
    vop.events.progress(EventPhase::Cleanup, 1, 1, "steps");
    let mut out = Map::new();
    out.insert(
        "volume".into(),
        json!({"name": volume.as_str(), "exists": false}),
    );
    Ok(out)
}

fn resize(mut ctx: Ctx<'_>, volume: &VolumeName, size: u64) -> Result<Map<String, Value>> {
    let mut vop = lock_volume(&mut ctx, volume)?;
    let driver = vop.driver;
    vop.recover_first()?;
    let live = Slot::live(volume);
    if driver.identity(live)?.is_none() {
        return Err(Error::new(
            Code::NotFound,
            format!("volume {volume} does not exist"),
        ));
    }
    let caps = driver.capabilities();
    let usage = driver.usage(live)?;
    match caps.size_model {
        reimage_driver::SizeModel::Unlimited => {
            vop.events.warning(
                "size_ignored",
                &format!(
                    "the {} driver cannot limit a volume's size on this pool; nothing to resize",
                    driver.name()
                ),
            );
        }
        model => {
            let current = usage.size.unwrap_or(0);
            if size < current && !caps.shrink {
                return Err(Error::new(
                    Code::Unsupported,
                    format!(
                        "the {} driver cannot shrink volume {volume} ({current} → {size} bytes)",
                        driver.name()
                    ),
                ));
            }
            if size < usage.used {
                return Err(Error::new(
                    Code::InsufficientSpace,
                    format!(
                        "volume {volume} uses {} bytes, more than the requested size {size}",
                        usage.used
                    ),
                )
                .with("used", usage.used)
                .with("size", size));
            }
            if model == reimage_driver::SizeModel::Allocated && size > current {
                let available = driver.pool_space()?.available;
                if size - current > available {
                    return Err(Error::new(
                        Code::InsufficientSpace,
                        format!("growing {volume} by {} bytes needs more than the pool's {available} free", size - current),
                    )
                    .with("needed", size - current)
                    .with("available", available));
                }
            }
            driver.set_size(live, size)?;
        }
    }
    let mut out = Map::new();
    out.insert("volume".into(), volume_json(driver, volume)?);
    Ok(out)
}

fn recover(mut ctx: Ctx<'_>, only: Option<&VolumeName>) -> Result<Map<String, Value>> {
    let (pool, driver) = needs(&ctx)?;
    let journal = Journal::new(&ctx.config.state_dir, &pool.name);
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
        let mut vop = match lock_volume(&mut ctx, volume) {
            Ok(v) => v,
            Err(e) if e.code == Code::Locked => {
                ctx.events.warning(
                    "locked",
                    &format!("volume {volume} is in use by a running request; skipped"),
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(outcome) = vop.recover_first()? {
            recovered.push(outcome.to_json());
        }
    }
    let mut out = Map::new();
    out.insert("recovered".into(), Value::Array(recovered));
    Ok(out)
}
