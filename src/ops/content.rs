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
        /// The SHA-256 of the image file.
        sha256: String,
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
                path,
                measurement,
                sha256,
                ..
            } => {
                let mut v = measurement.to_json();
                v["path"] = path.display().to_string().into();
                v["sha256"] = sha256.as_str().into();
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
    let hash = |file: &File| {
        digest::sha256(file).map_err(|e| {
            Error::new(
                Code::ImageInvalid,
                format!("reading {}: {e}", resolved.display()),
            )
        })
    };
    let (measurement, sha256) = match remembered {
        Some((m, sha256)) => {
            timings.time("measure", || ());
            events.progress(EventPhase::Measure, 1, 1, "cached");
            let sha256 = match sha256 {
                Some(known) => known,
                None => timings.time("hash", || hash(&file))?,
            };
            (m, sha256)
        }
        None => {
            // The hash reads the file beside the measure pass, on the other core, from the
            // same page cache.
            let (m, sha256) = timings.time("measure", || {
                std::thread::scope(|scope| {
                    let hashing = scope.spawn(|| hash(&file));
                    let m = measure_image(&file, detected, prefix, idmap, &mut |done, total| {
                        events.progress(EventPhase::Measure, done, total, "bytes")
                    });
                    let sha256 = hashing
                        .join()
                        .unwrap_or_else(|_| Err(Error::internal("the image hash panicked")));
                    (m, sha256)
                })
            });
            let (m, sha256) = (m?, sha256?);
            if let Some(k) = &key {
                cache::store(state, k, &m, &sha256);
            }
            (m, sha256)
        }
    };
    Ok(Content::Image {
        file,
        path: resolved,
        measurement,
        sha256,
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
