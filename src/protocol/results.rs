//! What each op returns: the fields of its final `result` event besides `event` and `ok`.
//! Every field here is part of the contract (docs/protocol.md); schema/events.json is
//! generated from these types.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Serialize;

use crate::image::{Compression, Format};

/// One op's result, tagged with the op's name (`op`).
#[derive(Debug, Serialize, JsonSchema)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpResult {
    Measure(Measured),
    Inspect(VolumeResult),
    Create(Filled),
    Rebuild(Filled),
    Delete(VolumeResult),
    Resize(VolumeResult),
    Recover(Recovered),
    Images(ImageVolumes),
    Prune(Pruned),
}

impl OpResult {
    /// The op's name, as in the request.
    pub fn op(&self) -> &'static str {
        match self {
            OpResult::Measure(_) => "measure",
            OpResult::Inspect(_) => "inspect",
            OpResult::Create(_) => "create",
            OpResult::Rebuild(_) => "rebuild",
            OpResult::Delete(_) => "delete",
            OpResult::Resize(_) => "resize",
            OpResult::Recover(_) => "recover",
            OpResult::Images(_) => "images",
            OpResult::Prune(_) => "prune",
        }
    }

    /// The volume the result describes, if any.
    pub fn volume(&self) -> Option<&VolumeInfo> {
        match self {
            OpResult::Inspect(r) | OpResult::Delete(r) | OpResult::Resize(r) => Some(&r.volume),
            OpResult::Create(Filled::Done(r)) | OpResult::Rebuild(Filled::Done(r)) => {
                Some(&r.volume)
            }
            _ => None,
        }
    }

    /// What the volume was filled from, if the op filled or measured one.
    pub fn image(&self) -> Option<&ImageInfo> {
        match self {
            OpResult::Measure(m) => Some(&m.image),
            OpResult::Create(Filled::Done(r)) | OpResult::Rebuild(Filled::Done(r)) => {
                Some(&r.image)
            }
            OpResult::Create(Filled::DryRun(r)) | OpResult::Rebuild(Filled::DryRun(r)) => {
                Some(&r.image)
            }
            _ => None,
        }
    }
}

/// Wall time of each phase in milliseconds, in the order the phases ran, and `total` last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimingsMs(pub Vec<(String, u64)>);

impl TimingsMs {
    /// Adds `ms` to phase `name`, which is appended when it is new.
    pub fn add(&mut self, name: &str, ms: u64) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, total)) => *total += ms,
            None => self.0.push((name.to_owned(), ms)),
        }
    }
}

impl Serialize for TimingsMs {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, ms) in &self.0 {
            map.serialize_entry(name, ms)?;
        }
        map.end()
    }
}

impl JsonSchema for TimingsMs {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TimingsMs".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Milliseconds per phase (hash, measure, prepare, unpack, preserve, sync, swap, cleanup), in the order they ran, and total.",
            "type": "object",
            "additionalProperties": {"type": "integer", "minimum": 0}
        })
    }
}

/// `measure`: what the image holds.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Measured {
    pub image: ImageInfo,
    pub timings_ms: TimingsMs,
}

/// `inspect`, `resize`, `delete`: the volume as it is now.
#[derive(Debug, Serialize, JsonSchema)]
pub struct VolumeResult {
    pub volume: VolumeInfo,
}

/// `create`, `rebuild`: the volume filled, or with `dry_run` the plan.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Filled {
    Done(FillDone),
    DryRun(DryRun),
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct FillDone {
    pub volume: VolumeInfo,
    pub image: ImageInfo,
    pub timings_ms: TimingsMs,
}

/// What a fill would do; nothing was changed.
#[derive(Debug, Serialize, JsonSchema)]
pub struct DryRun {
    /// Always `true`.
    #[schemars(extend("const" = true))]
    pub dry_run: bool,
    pub plan: PlanInfo,
    pub image: ImageInfo,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct PlanInfo {
    /// Bytes the image needs on this pool, as measured.
    pub measured_bytes: u64,
    pub needed_with_headroom: u64,
    /// The size the volume gets (`null`: the pool cannot limit it).
    pub target_size: Option<u64>,
    pub required_space: u64,
    pub available_space: u64,
    /// What the thin pool's volumes are promised in all (thin LVM only).
    pub provisioned_space: Option<u64>,
    /// Bytes the image volume this fill would build first takes (an image the pool keeps no
    /// image volume of yet); counted in `required_space`. Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_bytes: Option<u64>,
    /// The steps a real run takes, in order.
    pub steps: Vec<String>,
    /// An interrupted request on this volume would be recovered first.
    pub pending_recovery: bool,
}

/// A volume. When `exists` is false, only `name` (and for `inspect`, `pending_recovery` and
/// `capabilities`) are there.
#[derive(Debug, Serialize, JsonSchema)]
pub struct VolumeInfo {
    pub name: String,
    pub exists: bool,
    #[serde(flatten)]
    pub state: Option<VolumeState>,
    /// `inspect` only: an interrupted request left something to recover.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_recovery: Option<bool>,
    /// `inspect` only: what the pool's driver can do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
}

/// An existing volume's size and usage. `used` and `inodes` are `null` where knowing them
/// would take a walk of the whole tree (dir and overlay after create and rebuild).
#[derive(Debug, Serialize, JsonSchema)]
pub struct VolumeState {
    /// The volume's limit in bytes (`null`: none).
    pub size: Option<u64>,
    pub used: Option<u64>,
    pub inodes: Option<u64>,
    pub snapshots: Vec<String>,
    /// What a manager mounts, for volumes that are layers (overlay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount: Option<MountInfo>,
}

/// A mount: the filesystem type and its options (overlay: `lowerdir`, `upperdir`, `workdir`).
#[derive(Debug, Serialize, JsonSchema)]
pub struct MountInfo {
    #[serde(rename = "type")]
    pub fstype: String,
    #[serde(flatten)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Capabilities {
    pub snapshots: bool,
    pub keep_snapshots: bool,
    /// How snapshots are kept by a rebuild (`null`: they are not).
    pub keep_snapshots_by: Option<KeepSnapshotsBy>,
    pub size_limit: SizeLimit,
    pub shrink: bool,
    pub image_volumes: bool,
    pub templates: bool,
    /// Whether `size` limits the image's content too (false for overlay: only what the volume
    /// changes counts).
    pub size_counts_image: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeepSnapshotsBy {
    /// Snapshots outlive the volume they were taken of.
    Independent,
    /// The volume is refilled in place under a guard snapshot.
    Refill,
}

#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SizeLimit {
    None,
    Quota,
    Allocated,
}

/// What a volume is filled from.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ImageInfo {
    Image(MeasuredImage),
    /// A snapshot of another volume, cloned.
    Template {
        volume: String,
        snapshot: String,
    },
    /// No content (`source: {"empty": true}`); always `true`.
    Empty {
        empty: bool,
    },
    /// An image not measured yet (a dry run that would measure while unpacking).
    Unmeasured {
        path: String,
    },
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct MeasuredImage {
    pub format: Format,
    pub compression: Compression,
    pub unpacked_bytes: u64,
    pub allocated_bytes: u64,
    pub inodes: u64,
    pub entries: u64,
    /// The directory of the image that became the volume root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs_prefix: Option<String>,
    pub path: String,
    pub sha256: String,
    /// `create` and `rebuild`: whether the volume was cloned from an image volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Cache {
    /// Cloned from an image volume that was there.
    Hit,
    /// The image volume was built now, then cloned.
    Miss,
    /// Unpacked into the volume: the pool keeps no image volumes, or the fill has no image.
    Off,
}

/// `recover`: what was finished or rolled back.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Recovered {
    pub recovered: Vec<RecoveredVolume>,
    /// For a whole pool that keeps image volumes: the keys of the unsealed image volumes
    /// (left by interrupted builds) that were removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsealed_images_removed: Option<Vec<String>>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RecoveredVolume {
    pub volume: String,
    /// The interrupted op (`null`: only temporary volumes were left).
    pub op: Option<InterruptedOp>,
    pub action: RecoveryAction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InterruptedOp {
    Create,
    Rebuild,
    RebuildInPlace,
    RebuildKeepingSnapshots,
    Delete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryAction {
    /// The volume holds its old content again.
    RolledBack,
    /// The interrupted operation was completed.
    Completed,
    /// An in-place rebuild was interrupted after the old content was destroyed.
    Lost,
    /// Temporary slots without a journal record were removed.
    CleanedUp,
}

/// `images`: the pool's image volumes.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ImageVolumes {
    /// Whether the pool keeps image volumes.
    pub image_volumes: bool,
    pub images: Vec<ImageVolume>,
}

/// An image volume. The fields from its record are `null` when the record is missing.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ImageVolume {
    pub key: String,
    /// Unsealed: left by a build that did not finish; never cloned, removed by `prune`.
    pub sealed: bool,
    pub sha256: Option<String>,
    /// The image file it was last filled from.
    pub image: Option<String>,
    pub unpacked_bytes: Option<u64>,
    pub allocated_bytes: Option<u64>,
    pub inodes: Option<u64>,
    /// The volumes cloned from it.
    pub volumes: Vec<String>,
    /// Volumes refilled in place since they were cloned from it (zfs): they hold other
    /// content but still depend on it, so `prune` parks it rather than destroying it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<String>,
    /// Seconds since the epoch.
    pub created: Option<u64>,
    pub last_used: Option<u64>,
}

/// `prune`: the image volumes removed (with `dry_run`: that would be) and kept.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Pruned {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    pub removed: Vec<PrunedImage>,
    pub kept: Vec<KeptImage>,
    /// Image volumes no volume holds the content of, which volumes refilled in place still
    /// depend on (zfs): renamed aside, no longer listed or cloned, and destroyed with the
    /// last of `holders`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parked: Vec<ParkedImage>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ParkedImage {
    pub key: String,
    pub holders: Vec<String>,
    pub allocated_bytes: Option<u64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct PrunedImage {
    pub key: String,
    pub sealed: bool,
    pub allocated_bytes: Option<u64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct KeptImage {
    pub key: String,
    pub why: KeptWhy,
    /// `in use`: the volumes cloned from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<String>>,
    /// `mounted`: who holds the mount that uses it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub enum KeptWhy {
    #[serde(rename = "in use")]
    InUse,
    #[serde(rename = "used recently")]
    UsedRecently,
    #[serde(rename = "a running request is using it")]
    RequestRunning,
    #[serde(rename = "mounted")]
    Mounted,
}
