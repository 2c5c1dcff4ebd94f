//! Parsing of the one JSON request on stdin into a typed, validated [`Request`].
//!
//! Strictness is the point: an unknown field, a duplicate key, a wrong type or a value out of
//! range is `invalid_request` with the JSON path of the offending value in `details.path`,
//! before anything else happens. Each op has its own struct with `deny_unknown_fields`, so a
//! field that another op would accept is still rejected.

use std::path::PathBuf;

use reimage_driver::VolumeName;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;

pub use crate::unpack::idmap::IdRange;
pub use crate::unpack::UnsupportedMetadata;

use super::size::Size;
use crate::error::{Code, Error, Result};

pub const API_VERSION: u64 = 1;
/// Requests are small; anything larger is not one.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotPolicy {
    Refuse,
    Delete,
    Keep,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum Mode {
    #[serde(rename = "atomic")]
    Atomic,
    #[serde(rename = "in-place")]
    InPlace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SizePolicy {
    /// The volume grows to fit the image (the default).
    Grow,
    /// `size` is exact: an image that needs more is an error.
    Exact,
}

/// Where the new content comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Image {
        path: PathBuf,
        rootfs_prefix: Option<String>,
    },
    /// A snapshot of another volume of the same pool, cloned.
    Template {
        volume: VolumeName,
        snapshot: String,
    },
    Empty,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fill {
    pub source: Source,
    pub size: Option<u64>,
    pub headroom: f64,
    pub size_policy: SizePolicy,
    pub idmap: Vec<IdRange>,
    pub dry_run: bool,
    pub unsupported_metadata: UnsupportedMetadata,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Measure {
        source: Source,
    },
    Inspect {
        pool: String,
        volume: VolumeName,
        /// Count the volume's bytes and inodes by walking its tree where the pool keeps no
        /// counter of them (dir, btrfs and overlay with quotas off); otherwise they are null.
        walk: bool,
    },
    Create {
        pool: String,
        volume: VolumeName,
        fill: Fill,
    },
    Rebuild {
        pool: String,
        volume: VolumeName,
        fill: Fill,
        snapshots: SnapshotPolicy,
        mode: Mode,
        preserve: Vec<PathBuf>,
    },
    Delete {
        pool: String,
        volume: VolumeName,
        snapshots: SnapshotPolicy,
    },
    Resize {
        pool: String,
        volume: VolumeName,
        size: u64,
    },
    Recover {
        pool: String,
        volume: Option<VolumeName>,
    },
    /// A pool's image volumes.
    Images {
        pool: String,
    },
    /// Removes the image volumes no volume depends on (and, with `older_than`, only those
    /// unused for that many seconds).
    Prune {
        pool: String,
        older_than: Option<u64>,
        dry_run: bool,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Measure { .. } => "measure",
            Op::Inspect { .. } => "inspect",
            Op::Create { .. } => "create",
            Op::Rebuild { .. } => "rebuild",
            Op::Delete { .. } => "delete",
            Op::Resize { .. } => "resize",
            Op::Recover { .. } => "recover",
            Op::Images { .. } => "images",
            Op::Prune { .. } => "prune",
        }
    }

    pub fn pool(&self) -> Option<&str> {
        match self {
            Op::Measure { .. } => None,
            Op::Inspect { pool, .. }
            | Op::Create { pool, .. }
            | Op::Rebuild { pool, .. }
            | Op::Delete { pool, .. }
            | Op::Resize { pool, .. }
            | Op::Recover { pool, .. }
            | Op::Images { pool }
            | Op::Prune { pool, .. } => Some(pool),
        }
    }

    pub fn volume(&self) -> Option<&VolumeName> {
        match self {
            Op::Measure { .. } | Op::Images { .. } | Op::Prune { .. } => None,
            Op::Recover { volume, .. } => volume.as_ref(),
            Op::Inspect { volume, .. }
            | Op::Create { volume, .. }
            | Op::Rebuild { volume, .. }
            | Op::Delete { volume, .. }
            | Op::Resize { volume, .. } => Some(volume),
        }
    }

    pub fn source(&self) -> Option<&Source> {
        match self {
            Op::Measure { source } => Some(source),
            Op::Create { fill, .. } | Op::Rebuild { fill, .. } => Some(&fill.source),
            _ => None,
        }
    }
}

// ---- wire structs: exactly the fields each op accepts ----

/// What the volume is filled from: `image` (with `rootfs_prefix`), `empty`, or a template
/// `volume` and `snapshot` (same pool).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Source")]
struct WireSource {
    image: Option<String>,
    empty: Option<bool>,
    rootfs_prefix: Option<String>,
    volume: Option<String>,
    snapshot: Option<String>,
    pool: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WireMeasure {
    #[allow(dead_code)]
    #[schemars(range(min = 1, max = 1))]
    api: u64,
    #[allow(dead_code)]
    #[schemars(skip)]
    op: String,
    source: WireSource,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WireVolume {
    #[allow(dead_code)]
    #[schemars(range(min = 1, max = 1))]
    api: u64,
    #[allow(dead_code)]
    #[schemars(skip)]
    op: String,
    pool: String,
    volume: String,
    /// Count `used` and `inodes` by walking the volume's tree where the pool keeps no counter
    /// of them (dir, btrfs and overlay pools with quotas off): work proportional to the
    /// volume's files. Without it they are `null` on such pools.
    #[serde(default)]
    walk: bool,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WireCreate {
    #[allow(dead_code)]
    #[schemars(range(min = 1, max = 1))]
    api: u64,
    #[allow(dead_code)]
    #[schemars(skip)]
    op: String,
    pool: String,
    volume: String,
    source: WireSource,
    size: Option<Size>,
    headroom: Option<f64>,
    size_policy: Option<SizePolicy>,
    idmap: Option<Vec<IdRange>>,
    dry_run: Option<bool>,
    unsupported_metadata: Option<UnsupportedMetadata>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WireRebuild {
    #[allow(dead_code)]
    #[schemars(range(min = 1, max = 1))]
    api: u64,
    #[allow(dead_code)]
    #[schemars(skip)]
    op: String,
    pool: String,
    volume: String,
    source: WireSource,
    size: Option<Size>,
    headroom: Option<f64>,
    size_policy: Option<SizePolicy>,
    idmap: Option<Vec<IdRange>>,
    dry_run: Option<bool>,
    unsupported_metadata: Option<UnsupportedMetadata>,
    snapshots: Option<SnapshotPolicy>,
    mode: Option<Mode>,
    preserve: Option<Vec<String>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WireDelete {
    #[allow(dead_code)]
    #[schemars(range(min = 1, max = 1))]
    api: u64,
    #[allow(dead_code)]
    #[schemars(skip)]
    op: String,
    pool: String,
    volume: String,
    snapshots: Option<SnapshotPolicy>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WireResize {
    #[allow(dead_code)]
    #[schemars(range(min = 1, max = 1))]
    api: u64,
    #[allow(dead_code)]
    #[schemars(skip)]
    op: String,
    pool: String,
    volume: String,
    size: Size,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WireRecover {
    #[allow(dead_code)]
    #[schemars(range(min = 1, max = 1))]
    api: u64,
    #[allow(dead_code)]
    #[schemars(skip)]
    op: String,
    pool: String,
    volume: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WireImages {
    #[allow(dead_code)]
    #[schemars(range(min = 1, max = 1))]
    api: u64,
    #[allow(dead_code)]
    #[schemars(skip)]
    op: String,
    pool: String,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WirePrune {
    #[allow(dead_code)]
    #[schemars(range(min = 1, max = 1))]
    api: u64,
    #[allow(dead_code)]
    #[schemars(skip)]
    op: String,
    pool: String,
    /// Seconds since an image volume was last used.
    older_than: Option<u64>,
    #[serde(default)]
    dry_run: bool,
}

/// Every request, by its `op`: what schema/request.json is generated from. Parsing does not
/// use it (it reads `api` and `op` first, for errors that name them).
#[derive(JsonSchema)]
#[serde(tag = "op", rename_all = "snake_case")]
#[allow(dead_code)]
enum WireRequest {
    Measure(WireMeasure),
    Inspect(WireVolume),
    Create(WireCreate),
    Rebuild(WireRebuild),
    Delete(WireDelete),
    Resize(WireResize),
    Recover(WireRecover),
    Images(WireImages),
    Prune(WirePrune),
}

/// The schema of a request, made with `settings`.
pub(super) fn json_schema(settings: schemars::generate::SchemaSettings) -> schemars::Schema {
    settings
        .into_generator()
        .into_root_schema_for::<WireRequest>()
}

/// Only `api` and `op`, read first so that the op's own struct can be chosen.
#[derive(Deserialize)]
struct WireHead {
    api: Option<serde_json::Value>,
    op: Option<serde_json::Value>,
}

fn invalid(path: &str, message: impl Into<String>) -> Error {
    Error::new(Code::InvalidRequest, message).with("path", path)
}

/// Deserializes the whole text into `T`, turning serde's error into `invalid_request` with
/// the JSON path of the offending value.
fn strict<T: DeserializeOwned>(text: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        // A duplicate key is reported at its object; name the key itself.
        let path = match message
            .strip_prefix("duplicate field `")
            .and_then(|rest| rest.split('`').next())
        {
            Some(field) if path == "." || path.is_empty() => field.to_owned(),
            Some(field) => format!("{path}.{field}"),
            None if path.is_empty() => ".".to_owned(),
            None => path,
        };
        let message = match message.split(" at line ").next() {
            Some(m) => m.to_owned(),
            None => message,
        };
        invalid(&path, format!("{message} (at {path})"))
    })?;
    de.end()
        .map_err(|_| invalid(".", "the request must be exactly one JSON object"))?;
    Ok(value)
}

fn volume_name(text: String) -> Result<VolumeName> {
    VolumeName::parse(&text).map_err(|e| invalid("volume", format!("invalid volume name: {e}")))
}

/// The request's source; `target` is the request's pool and volume (none for `measure`).
fn source(wire: WireSource, target: Option<(&str, &VolumeName)>) -> Result<Source> {
    let kinds = [
        wire.image.is_some(),
        wire.empty.is_some(),
        wire.volume.is_some(),
    ];
    if kinds.iter().filter(|&&k| k).count() > 1 {
        return Err(invalid(
            "source",
            "source takes one of \"image\", \"volume\" (with \"snapshot\") or \"empty\"",
        ));
    }
    if let Some(template) = wire.volume {
        return template_source(
            template,
            wire.snapshot,
            wire.pool,
            wire.rootfs_prefix,
            target,
        );
    }
    if wire.snapshot.is_some() || wire.pool.is_some() {
        let field = if wire.snapshot.is_some() {
            "source.snapshot"
        } else {
            "source.pool"
        };
        return Err(invalid(
            field,
            "snapshot and pool only go with a template source: {\"volume\": NAME, \"snapshot\": SNAP}",
        ));
    }
    match (wire.image, wire.empty) {
        (Some(image), None) => {
            let path = PathBuf::from(&image);
            if !path.is_absolute() {
                return Err(invalid(
                    "source.image",
                    format!("image path {image:?} must be absolute"),
                ));
            }
            if let Some(prefix) = &wire.rootfs_prefix {
                if prefix.contains('\0') || prefix.split('/').any(|c| c == "..") {
                    return Err(invalid(
                        "source.rootfs_prefix",
                        "rootfs_prefix must be a relative path inside the image without '..'",
                    ));
                }
            }
            Ok(Source::Image {
                path,
                rootfs_prefix: wire.rootfs_prefix,
            })
        }
        (None, Some(true)) if wire.rootfs_prefix.is_none() => Ok(Source::Empty),
        (None, Some(true)) => Err(invalid(
            "source.rootfs_prefix",
            "rootfs_prefix only goes with an image source",
        )),
        (None, Some(false)) => Err(invalid(
            "source.empty",
            "source.empty must be true; to fill from an image, give source.image",
        )),
        (Some(_), Some(_)) => Err(invalid(
            "source",
            "source takes either \"image\" or \"empty\", not both",
        )),
        (None, None) => Err(invalid(
            "source",
            "source needs {\"image\": \"/abs/path\"} or {\"empty\": true}",
        )),
    }
}

fn template_source(
    template: String,
    snapshot: Option<String>,
    pool: Option<String>,
    rootfs_prefix: Option<String>,
    target: Option<(&str, &VolumeName)>,
) -> Result<Source> {
    let Some((target_pool, target_volume)) = target else {
        return Err(invalid(
            "source.volume",
            "measure takes an image; a template volume is cloned, not measured",
        ));
    };
    if rootfs_prefix.is_some() {
        return Err(invalid(
            "source.rootfs_prefix",
            "rootfs_prefix only goes with an image source",
        ));
    }
    let volume = VolumeName::parse(&template)
        .map_err(|e| invalid("source.volume", format!("invalid volume name: {e}")))?;
    let Some(snapshot) = snapshot else {
        return Err(invalid(
            "source.snapshot",
            format!("a template source names a snapshot of volume {volume}: {{\"volume\": \"{volume}\", \"snapshot\": SNAP}}"),
        ));
    };
    VolumeName::parse(&snapshot)
        .map_err(|e| invalid("source.snapshot", format!("invalid snapshot name: {e}")))?;
    if let Some(pool) = pool {
        if pool != target_pool {
            return Err(invalid(
                "source.pool",
                format!(
                    "the template is in pool {pool} but the volume in pool {target_pool}: a volume is cloned only from a snapshot in its own pool"
                ),
            ));
        }
    }
    if &volume == target_volume {
        return Err(invalid(
            "source.volume",
            format!(
                "volume {volume} cannot be filled from its own snapshot; roll it back with the storage's own tools, or clone the snapshot into another volume"
            ),
        ));
    }
    Ok(Source::Template { volume, snapshot })
}

fn idmap(ranges: Option<Vec<IdRange>>) -> Result<Vec<IdRange>> {
    let ranges = ranges.unwrap_or_default();
    for (i, r) in ranges.iter().enumerate() {
        let path = format!("idmap[{i}]");
        if r.count == 0 {
            return Err(invalid(
                &format!("{path}.count"),
                "count must be at least 1",
            ));
        }
        if u64::from(r.host) + u64::from(r.count) > 1 << 32
            || u64::from(r.container) + u64::from(r.count) > 1 << 32
        {
            return Err(invalid(
                &path,
                "the range runs past the largest id (4294967295)",
            ));
        }
        for (j, other) in ranges[..i].iter().enumerate() {
            let overlaps = |a: u32, b: u32| {
                u64::from(a) < u64::from(b) + u64::from(other.count)
                    && u64::from(b) < u64::from(a) + u64::from(r.count)
            };
            if overlaps(r.container, other.container) {
                return Err(invalid(
                    &path,
                    format!("the container ids of idmap[{i}] overlap those of idmap[{j}]"),
                ));
            }
            if overlaps(r.host, other.host) {
                return Err(invalid(
                    &path,
                    format!("the host ids of idmap[{i}] overlap those of idmap[{j}]"),
                ));
            }
        }
    }
    Ok(ranges)
}

fn headroom(value: Option<f64>) -> Result<f64> {
    match value {
        None => Ok(0.2),
        Some(h) if h.is_finite() && (0.0..=10.0).contains(&h) => Ok(h),
        Some(h) => Err(invalid(
            "headroom",
            format!("headroom {h} must be between 0 and 10"),
        )),
    }
}

fn size(value: Option<Size>, path: &str) -> Result<Option<u64>> {
    match value {
        Some(Size(0)) => Err(invalid(path, "size must be larger than 0")),
        Some(Size(n)) => Ok(Some(n)),
        None => Ok(None),
    }
}

fn preserve(paths: Option<Vec<String>>) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    for (i, p) in paths.unwrap_or_default().into_iter().enumerate() {
        let path = format!("preserve[{i}]");
        if !p.starts_with('/') {
            return Err(invalid(&path, format!("{p:?} must be an absolute path")));
        }
        if p.contains('\0') || p.split('/').any(|c| c == ".." || c == ".") {
            return Err(invalid(
                &path,
                format!("{p:?} must not contain '.' or '..' components"),
            ));
        }
        let normal: PathBuf = p.split('/').filter(|c| !c.is_empty()).collect();
        if normal.as_os_str().is_empty() {
            return Err(invalid(
                &path,
                "preserving \"/\" would keep the whole old volume",
            ));
        }
        out.push(PathBuf::from("/").join(normal));
    }
    Ok(out)
}

/// The fields `create` and `rebuild` share, as sent.
struct WireFill {
    source: WireSource,
    size: Option<Size>,
    headroom: Option<f64>,
    size_policy: Option<SizePolicy>,
    idmap: Option<Vec<IdRange>>,
    dry_run: Option<bool>,
    unsupported_metadata: Option<UnsupportedMetadata>,
}

/// Validates the fill of a request for `target` (its pool and volume).
fn fill(target: (&str, &VolumeName), wire: WireFill) -> Result<Fill> {
    let WireFill {
        source: wire_source,
        size: wire_size,
        headroom: wire_headroom,
        size_policy: wire_policy,
        idmap: wire_idmap,
        dry_run,
        unsupported_metadata,
    } = wire;
    let size = size(wire_size, "size")?;
    let size_policy = wire_policy.unwrap_or(SizePolicy::Grow);
    if size_policy == SizePolicy::Exact && size.is_none() {
        return Err(invalid("size_policy", "size_policy \"exact\" needs a size"));
    }
    Ok(Fill {
        source: source(wire_source, Some(target))?,
        size,
        headroom: headroom(wire_headroom)?,
        size_policy,
        idmap: idmap(wire_idmap)?,
        dry_run: dry_run.unwrap_or(false),
        unsupported_metadata: unsupported_metadata.unwrap_or_default(),
    })
}

/// Parses one request. Every failure is `invalid_request` with `details.path`.
pub fn parse(text: &str) -> Result<Op> {
    if text.len() > MAX_REQUEST_BYTES {
        return Err(invalid(
            ".",
            format!("the request is larger than {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    let head: WireHead = serde_json::from_str(text).map_err(|e| {
        let what = if e.is_data() {
            "the request must be a JSON object".to_owned()
        } else {
            format!("malformed JSON: {e}")
        };
        invalid(".", what)
    })?;
    match head.api {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(API_VERSION) => {}
        Some(other) => {
            return Err(invalid(
                "api",
                format!("api {other} is not supported; this reimage speaks api {API_VERSION}"),
            ))
        }
        None => return Err(invalid("api", format!("missing \"api\": {API_VERSION}"))),
    }
    let op = match head.op {
        Some(serde_json::Value::String(op)) => op,
        Some(_) => return Err(invalid("op", "op must be a string")),
        None => return Err(invalid("op", "missing \"op\"")),
    };
    Ok(match op.as_str() {
        "measure" => {
            let w: WireMeasure = strict(text)?;
            Op::Measure {
                source: source(w.source, None)?,
            }
        }
        "inspect" => {
            let w: WireVolume = strict(text)?;
            Op::Inspect {
                pool: w.pool,
                volume: volume_name(w.volume)?,
                walk: w.walk,
            }
        }
        "create" => {
            let w: WireCreate = strict(text)?;
            let volume = volume_name(w.volume)?;
            let fill = fill(
                (&w.pool, &volume),
                WireFill {
                    source: w.source,
                    size: w.size,
                    headroom: w.headroom,
                    size_policy: w.size_policy,
                    idmap: w.idmap,
                    dry_run: w.dry_run,
                    unsupported_metadata: w.unsupported_metadata,
                },
            )?;
            Op::Create {
                pool: w.pool,
                volume,
                fill,
            }
        }
        "rebuild" => {
            let w: WireRebuild = strict(text)?;
            let volume = volume_name(w.volume)?;
            let fill = fill(
                (&w.pool, &volume),
                WireFill {
                    source: w.source,
                    size: w.size,
                    headroom: w.headroom,
                    size_policy: w.size_policy,
                    idmap: w.idmap,
                    dry_run: w.dry_run,
                    unsupported_metadata: w.unsupported_metadata,
                },
            )?;
            let mode = w.mode.unwrap_or(Mode::Atomic);
            if mode == Mode::InPlace && matches!(fill.source, Source::Template { .. }) {
                return Err(invalid(
                    "mode",
                    "a template source is cloned beside the volume and swapped in; in-place does not apply (leave mode out)",
                ));
            }
            Op::Rebuild {
                pool: w.pool,
                volume,
                fill,
                snapshots: w.snapshots.unwrap_or(SnapshotPolicy::Refuse),
                mode,
                preserve: preserve(w.preserve)?,
            }
        }
        "delete" => {
            let w: WireDelete = strict(text)?;
            let snapshots = w.snapshots.unwrap_or(SnapshotPolicy::Refuse);
            if snapshots == SnapshotPolicy::Keep {
                return Err(invalid(
                    "snapshots",
                    "delete takes snapshots \"refuse\" or \"delete\"; a deleted volume keeps none",
                ));
            }
            Op::Delete {
                pool: w.pool,
                volume: volume_name(w.volume)?,
                snapshots,
            }
        }
        "resize" => {
            let w: WireResize = strict(text)?;
            let size = size(Some(w.size), "size")?.unwrap_or(0);
            Op::Resize {
                pool: w.pool,
                volume: volume_name(w.volume)?,
                size,
            }
        }
        "recover" => {
            let w: WireRecover = strict(text)?;
            Op::Recover {
                pool: w.pool,
                volume: w.volume.map(volume_name).transpose()?,
            }
        }
        "images" => {
            let w: WireImages = strict(text)?;
            Op::Images { pool: w.pool }
        }
        "prune" => {
            let w: WirePrune = strict(text)?;
            Op::Prune {
                pool: w.pool,
                older_than: w.older_than,
                dry_run: w.dry_run,
            }
        }
        other => {
            let shown: String = other.chars().take(40).collect();
            return Err(invalid(
                "op",
                format!(
                    "unknown op {shown:?}; one of measure, inspect, create, rebuild, delete, resize, recover, images, prune"
                ),
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_of(text: &str) -> String {
        let e = parse(text).unwrap_err();
        assert_eq!(e.code, Code::InvalidRequest, "{e}");
        e.details["path"].as_str().unwrap().to_owned()
    }

    #[test]
    fn a_full_rebuild() {
        let op = parse(
            r#"{"api":1,"op":"rebuild","pool":"default","volume":"c1",
                "source":{"image":"/img/a.tar"},"size":"1GiB","headroom":0.5,
                "snapshots":"keep","mode":"in-place","preserve":["/etc//ssh/"],
                "idmap":[{"host":100000,"container":0,"count":65536}],"dry_run":true}"#,
        )
        .unwrap();
        let Op::Rebuild {
            fill,
            snapshots,
            mode,
            preserve,
            ..
        } = op
        else {
            panic!()
        };
        assert_eq!(fill.size, Some(1 << 30));
        assert_eq!(snapshots, SnapshotPolicy::Keep);
        assert_eq!(mode, Mode::InPlace);
        assert_eq!(preserve, vec![PathBuf::from("/etc/ssh")]);
        assert!(fill.dry_run);
    }

    #[test]
    fn paths_name_the_offending_value() {
        let base = r#""api":1,"op":"rebuild","pool":"p","volume":"v","source":{"empty":true}"#;
        assert_eq!(path_of(&format!("{{{base},\"bogus\":1}}")), "bogus");
        assert_eq!(
            path_of(r#"{"api":1,"op":"measure","source":{"image":"/x","extra":1}}"#),
            "source.extra"
        );
        assert_eq!(path_of(&format!("{{{base},\"size\":true}}")), "size");
        assert_eq!(
            path_of(&format!(
                "{{{base},\"idmap\":[{{\"host\":1,\"container\":0}}]}}"
            )),
            "idmap[0]"
        );
        assert_eq!(path_of(&format!("{{{base},\"mode\":\"fast\"}}")), "mode");
        assert_eq!(
            path_of(r#"{"api":2,"op":"inspect","pool":"p","volume":"v"}"#),
            "api"
        );
        assert_eq!(path_of(r#"{"api":1,"op":"format","pool":"p"}"#), "op");
        assert_eq!(
            path_of(r#"{"api":1,"op":"inspect","pool":"p","volume":"-o"}"#),
            "volume"
        );
        // A field another op accepts is still unknown here.
        assert_eq!(
            path_of(r#"{"api":1,"op":"inspect","pool":"p","volume":"v","size":1}"#),
            "size"
        );
        assert_eq!(
            path_of(r#"{"api":1,"op":"inspect","pool":"p","volume":"v","pool":"q"}"#),
            "pool"
        );
    }

    #[test]
    fn malformed_input() {
        for text in [
            "",
            "{",
            "[]",
            "null",
            "{\"api\":1} {}",
            "\"x\"",
            "{\"api\":1,\"op\":\"inspect\"}",
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.code, Code::InvalidRequest, "{text:?}");
        }
    }

    #[test]
    fn sources_and_values() {
        let p = |src: &str| path_of(&format!(r#"{{"api":1,"op":"measure","source":{src}}}"#));
        assert_eq!(p(r#"{"image":"rel.tar"}"#), "source.image");
        assert_eq!(p(r#"{"image":"/a","empty":true}"#), "source");
        assert_eq!(p(r#"{}"#), "source");
        assert_eq!(p(r#"{"empty":false}"#), "source.empty");
        let r = |extra: &str| {
            path_of(&format!(
                r#"{{"api":1,"op":"rebuild","pool":"p","volume":"v","source":{{"empty":true}},{extra}}}"#
            ))
        };
        assert_eq!(r(r#""headroom":-1"#), "headroom");
        assert_eq!(r(r#""size":0"#), "size");
        assert_eq!(r(r#""size":-5"#), "size");
        assert_eq!(r(r#""preserve":["etc"]"#), "preserve[0]");
        assert_eq!(r(r#""preserve":["/a/../b"]"#), "preserve[0]");
        assert_eq!(r(r#""preserve":["/"]"#), "preserve[0]");
        assert_eq!(r(r#""size_policy":"exact""#), "size_policy");
        assert_eq!(
            r(
                r#""idmap":[{"host":0,"container":0,"count":10},{"host":100,"container":5,"count":10}]"#
            ),
            "idmap[1]"
        );
    }

    /// A template source: a snapshot of another volume of the request's pool.
    #[test]
    fn template_sources() {
        let rebuild = |src: &str, extra: &str| {
            format!(r#"{{"api":1,"op":"rebuild","pool":"p","volume":"v","source":{src}{extra}}}"#)
        };
        match parse(&rebuild(r#"{"volume":"t","snapshot":"s1","pool":"p"}"#, "")) {
            Ok(Op::Rebuild { fill, .. }) => assert_eq!(
                fill.source,
                Source::Template {
                    volume: VolumeName::parse("t").unwrap(),
                    snapshot: "s1".into()
                }
            ),
            other => panic!("{other:?}"),
        }
        let path = |src: &str, extra: &str| path_of(&rebuild(src, extra));
        assert_eq!(path(r#"{"volume":"t","image":"/a"}"#, ""), "source");
        assert_eq!(path(r#"{"volume":"t","empty":true}"#, ""), "source");
        assert_eq!(path(r#"{"volume":"t"}"#, ""), "source.snapshot");
        assert_eq!(
            path(r#"{"volume":"t","snapshot":"a/b"}"#, ""),
            "source.snapshot"
        );
        assert_eq!(
            path(r#"{"volume":"../t","snapshot":"s"}"#, ""),
            "source.volume"
        );
        assert_eq!(
            path(r#"{"volume":"v","snapshot":"s"}"#, ""),
            "source.volume"
        );
        assert_eq!(
            path(r#"{"volume":"t","snapshot":"s","pool":"q"}"#, ""),
            "source.pool"
        );
        assert_eq!(
            path(r#"{"volume":"t","snapshot":"s","rootfs_prefix":"x"}"#, ""),
            "source.rootfs_prefix"
        );
        assert_eq!(
            path(r#"{"image":"/a","snapshot":"s"}"#, ""),
            "source.snapshot"
        );
        assert_eq!(
            path(r#"{"volume":"t","snapshot":"s"}"#, r#","mode":"in-place""#),
            "mode"
        );
        assert_eq!(
            path_of(r#"{"api":1,"op":"measure","source":{"volume":"t","snapshot":"s"}}"#),
            "source.volume"
        );
    }
}
