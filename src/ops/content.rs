//! What a volume is filled from: an image opened and measured once (or found in the
//! measure cache), or nothing.

use super::*;

/// An image opened and measured, or nothing for an empty volume.
pub(super) enum Content {
    Empty,
    Image {
        file: File,
        path: PathBuf,
        measurement: Measurement,
    },
}

impl Content {
    pub(super) fn measurement(&self) -> Measurement {
        match self {
            Content::Empty => Measurement::empty(),
            Content::Image { measurement, .. } => measurement.clone(),
        }
    }

    pub(super) fn to_json(&self) -> Value {
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
pub(super) struct UnpackObserver<'e> {
    pub(super) events: &'e mut Events,
    pub(super) total: u64,
}

impl Observer for UnpackObserver<'_> {
    fn progress(&mut self, done: u64) {
        self.events
            .progress(EventPhase::Unpack, done, self.total, "bytes");
    }
    fn warning(&mut self, code: Warning, message: &str) {
        self.events.warning(code, message);
    }
    fn cancelled(&self) -> bool {
        signals::cancelled()
    }
}

pub(super) fn open_and_measure(
    config: &Config,
    state: &RecordDir,
    events: &mut Events,
    source: &Source,
    image: Option<&OpenedImage>,
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
    // The file the policy check opened, not the path again: what was checked is what is read.
    let (file, resolved) = match image {
        Some((file, resolved)) => (
            file.try_clone()
                .map_err(|e| Error::internal(format!("cannot duplicate the image's fd: {e}")))?,
            resolved.clone(),
        ),
        None => config.open_image(path)?,
    };
    let detected = image::detect(&file)?;
    let key = cache::key(&file, prefix, idmap.ranges());
    let remembered = key.as_deref().and_then(|k| cache::lookup(state, k));
    let measurement = match remembered {
        Some(m) => {
            timings.time("measure", || ());
            events.progress(EventPhase::Measure, 1, 1, "cached");
            m
        }
        None => {
            let m = timings.time("measure", || {
                measure_image(&file, detected, prefix, idmap, &mut |done, total| {
                    events.progress(EventPhase::Measure, done, total, "bytes")
                })
            })?;
            if let Some(k) = &key {
                cache::store(state, k, &m);
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

pub(super) fn preserve_paths(paths: &[PathBuf]) -> Result<Vec<RelPath>> {
    paths
        .iter()
        .map(|p| {
            use std::os::unix::ffi::OsStrExt;
            normalize(p.as_os_str().as_bytes())
                .map_err(|e| Error::new(Code::InvalidRequest, e.message).with("path", "preserve"))
        })
        .collect()
}
