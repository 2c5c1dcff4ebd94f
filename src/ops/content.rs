//! What a volume is filled from: an image opened and measured once (or found in the
//! measure cache, or to be measured while it is unpacked), a template's snapshot, or nothing.

use super::*;

/// What a volume is filled from.
pub(super) enum Content {
    Empty,
    Image {
        file: File,
        path: PathBuf,
        measurement: Measurement,
        /// The SHA-256 of the image file.
        sha256: String,
        /// The request's `rootfs_prefix` (`None`: detected), part of the image volume key.
        prefix_request: Option<String>,
        /// This request built the image's image volume while measuring it.
        built_image_volume: bool,
    },
    /// A snapshot of another volume of the pool, cloned.
    Template {
        volume: VolumeName,
        snapshot: String,
    },
    /// An image to be measured while it is unpacked into the volume's new slot.
    Unmeasured(Opened),
}

impl Content {
    pub(super) fn measurement(&self) -> Measurement {
        match self {
            Content::Empty | Content::Template { .. } | Content::Unmeasured(_) => {
                Measurement::empty()
            }
            Content::Image { measurement, .. } => measurement.clone(),
        }
    }

    /// The content as results describe it; `cache` for an image a volume was filled from.
    pub(super) fn to_info(&self, cache: Option<Cache>) -> out::ImageInfo {
        match self {
            Content::Empty => out::ImageInfo::Empty { empty: true },
            Content::Template { volume, snapshot } => out::ImageInfo::Template {
                volume: volume.as_str().to_owned(),
                snapshot: snapshot.clone(),
            },
            Content::Unmeasured(opened) => out::ImageInfo::Unmeasured {
                path: opened.path.display().to_string(),
            },
            Content::Image {
                path,
                measurement,
                sha256,
                ..
            } => out::ImageInfo::Image(out::MeasuredImage {
                format: measurement.format,
                compression: measurement.compression,
                unpacked_bytes: measurement.tally.unpacked_bytes,
                allocated_bytes: measurement.tally.allocated_bytes,
                inodes: measurement.tally.inodes,
                entries: measurement.tally.entries,
                rootfs_prefix: measurement
                    .rootfs_prefix
                    .as_ref()
                    .map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned()),
                path: path.display().to_string(),
                sha256: sha256.clone(),
                cache,
            }),
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
            .progress(EventPhase::Unpack, done, self.total, Unit::Bytes);
    }
    fn warning(&mut self, code: Warning, message: &str) {
        self.events.warning(code, message);
    }
    fn cancelled(&self) -> bool {
        signals::cancelled()
    }
}

/// An image opened for a fill, not yet measured.
pub(super) struct Opened {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) detected: image::Detected,
    /// The request's `rootfs_prefix` (`None`: detect a unified image).
    pub(super) prefix: Option<String>,
    /// The measure cache's key for this file and these options.
    cache_key: Option<String>,
    /// What the measure cache held for it when it was opened: a measurement and the SHA-256.
    cached: Option<(Measurement, Option<String>)>,
}

impl Opened {
    /// The measurement and SHA-256 the measure cache remembered for this file when it was
    /// opened.
    pub(super) fn remembered(&self) -> Option<(Measurement, Option<String>)> {
        self.cached.clone()
    }

    /// The measure cache's key for this file and these options: the file's identity, which
    /// names an image volume's build begun before the image's SHA-256 is known.
    pub(super) fn identity(&self) -> Option<&str> {
        self.cache_key.as_deref()
    }

    /// Looks the file up in the measure cache again: a request this one waited for may have
    /// measured it meanwhile.
    pub(super) fn refresh(&mut self, state: &RecordDir) {
        self.cached = self
            .cache_key
            .as_deref()
            .and_then(|k| cache::lookup(state, k));
    }

    pub(super) fn remember(&self, state: &RecordDir, m: &Measurement, sha256: &str) {
        if let Some(k) = &self.cache_key {
            cache::store(state, k, m, sha256);
        }
    }

    pub(super) fn sha256(&self) -> Result<String> {
        digest::sha256(&self.file).map_err(|e| {
            Error::new(
                Code::ImageInvalid,
                format!("reading {}: {e}", self.path.display()),
            )
        })
    }

    /// Another handle on the same open image.
    pub(super) fn try_clone(&self) -> Result<Opened> {
        Ok(Opened {
            file: self
                .file
                .try_clone()
                .map_err(|e| Error::internal(format!("cannot duplicate the image's fd: {e}")))?,
            path: self.path.clone(),
            detected: self.detected,
            prefix: self.prefix.clone(),
            cache_key: self.cache_key.clone(),
            cached: self.cached.clone(),
        })
    }

    pub(super) fn into_content(
        self,
        measurement: Measurement,
        sha256: String,
        built: bool,
    ) -> Content {
        Content::Image {
            file: self.file,
            path: self.path,
            measurement,
            sha256,
            prefix_request: self.prefix,
            built_image_volume: built,
        }
    }
}

/// Opens the fill's image, if it has one, and looks it up in the measure cache (in `state`).
pub(super) fn open_image(
    config: &Config,
    state: &RecordDir,
    source: &Source,
    image: Option<&OpenedImage>,
    idmap: &IdMap,
) -> Result<Option<Opened>> {
    let (path, prefix) = match source {
        Source::Empty => return Ok(None),
        Source::Template { .. } => return Err(Error::internal("a template source has no image")),
        Source::Image {
            path,
            rootfs_prefix,
        } => (path, rootfs_prefix.clone()),
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
    let cache_key = cache::key(&file, prefix.as_deref(), idmap.ranges());
    let cached = cache_key.as_deref().and_then(|k| cache::lookup(state, k));
    Ok(Some(Opened {
        file,
        path: resolved,
        detected,
        prefix,
        cache_key,
        cached,
    }))
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
    match open_image(config, state, source, image, idmap)? {
        None => Ok(Content::Empty),
        Some(opened) => measure_opened(state, events, opened, idmap, None, timings),
    }
}

/// Measures an opened image (or finds it in the measure cache); `sha256` when already known.
pub(super) fn measure_opened(
    state: &RecordDir,
    events: &mut Events,
    opened: Opened,
    idmap: &IdMap,
    sha256: Option<String>,
    timings: &mut Timings,
) -> Result<Content> {
    let (measurement, sha256) = match opened.remembered() {
        Some((m, remembered)) => {
            timings.time("measure", || ());
            events.progress(EventPhase::Measure, 1, 1, Unit::Cached);
            let sha256 = match remembered.or(sha256) {
                Some(known) => known,
                None => timings.time("hash", || opened.sha256())?,
            };
            (m, sha256)
        }
        None => {
            // The hash reads the file beside the measure pass, on the other core, from the
            // same page cache.
            let (m, hashed) = timings.time("measure", || {
                std::thread::scope(|scope| {
                    let hashing = scope.spawn(|| match &sha256 {
                        Some(known) => Ok(known.clone()),
                        None => opened.sha256(),
                    });
                    let m = measure_image(
                        &opened.file,
                        opened.detected,
                        opened.prefix.as_deref(),
                        idmap,
                        &mut |done, total| {
                            events.progress(EventPhase::Measure, done, total, Unit::Bytes)
                        },
                    );
                    let sha256 = hashing
                        .join()
                        .unwrap_or_else(|_| Err(Error::internal("the image hash panicked")));
                    (m, sha256)
                })
            });
            let (m, sha256) = (m?, hashed?);
            opened.remember(state, &m, &sha256);
            (m, sha256)
        }
    };
    Ok(opened.into_content(measurement, sha256, false))
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
