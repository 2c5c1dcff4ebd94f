//! Filling a volume from an image volume: the image unpacked once per pool into a volume of
//! its own, sealed, and cloned into every volume filled from it.
//!
//! An image volume's key is the SHA-256 of the image file and of everything that changes the
//! unpacked tree (`rootfs_prefix`, `idmap`, the driver and the filesystem it makes), so two
//! requests share one only when they would unpack the same tree. It is built under a lock
//! named by its key, so that requests that need the same missing image volume build it once
//! (the others wait for it and clone it), and it is sealed as the build's last step: an
//! unsealed image volume is never cloned, and one left by a crash is removed by `recover` or
//! by the next build of its key.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reimage_driver::{Cloned, ImageKey};

use crate::measure::alongside::Measured;

use super::*;

/// How long a request waits for another one building the image volume it needs.
const BUILD_WAIT: Duration = Duration::from_secs(1800);

/// The image volume key of `content` unpacked with `idmap` by `driver`, or `None` when the
/// fill does not use image volumes.
pub(super) fn image_key(driver: &dyn Driver, content: &Content, idmap: &IdMap) -> Option<ImageKey> {
    let Content::Image {
        sha256,
        prefix_request,
        ..
    } = content
    else {
        return None;
    };
    key_of(driver, sha256, prefix_request.as_deref(), idmap)
}

/// Where a fill that clones `content`'s image volume (where the pool keeps them) gets its
/// blocks: shared with an image volume the pool holds (one this request just built too), or
/// from one it must build first; unpacked when there is no image volume to clone.
pub(super) fn blocks_of(driver: &dyn Driver, content: &Content, idmap: &IdMap) -> Result<Blocks> {
    let Some(key) = image_key(driver, content, idmap) else {
        return Ok(Blocks::Unpacked);
    };
    if let Content::Image {
        built_image_volume: true,
        ..
    } = content
    {
        return Ok(Blocks::Shared);
    }
    let held_by_pool = driver
        .images()?
        .iter()
        .any(|image| image.sealed && image.key == key);
    Ok(if held_by_pool {
        Blocks::Shared
    } else {
        Blocks::NewImageVolume
    })
}

/// What the key of an image volume is made of besides the image's SHA-256: the request's
/// `rootfs_prefix` (detection being a function of the image's bytes, the request's value
/// determines the tree as well as the detected one, and is known before the image is read),
/// the idmap, and the driver with the variant of tree it makes.
struct KeyParts {
    prefix: Vec<u8>,
    ranges: String,
    driver: String,
}

impl KeyParts {
    /// `None` where the pool keeps no image volumes.
    fn of(driver: &dyn Driver, prefix_request: Option<&str>, idmap: &IdMap) -> Option<KeyParts> {
        if !driver.capabilities().image_volumes {
            return None;
        }
        let prefix = match prefix_request {
            None => b"detect".to_vec(),
            Some(p) => {
                let normal = normalize(p.as_bytes())
                    .map_or_else(|_| p.as_bytes().to_vec(), |r| r.as_bytes().to_vec());
                [b"=".as_slice(), &normal].concat()
            }
        };
        let ranges: String = idmap
            .ranges()
            .iter()
            .map(|r| format!("{}:{}:{};", r.host, r.container, r.count))
            .collect();
        let variant = driver.image_variant();
        let driver = if variant.is_empty() {
            driver.name().to_owned()
        } else {
            format!("{}:{variant}", driver.name())
        };
        Some(KeyParts {
            prefix,
            ranges,
            driver,
        })
    }

    /// The key of the image with SHA-256 `sha256`.
    fn key(&self, sha256: &str) -> Option<ImageKey> {
        self.hashed(b"reimage image volume 2", sha256)
    }

    /// The provisional key of a build begun before the image's SHA-256 is known, from the
    /// file's identity (its measure cache key): requests building from the same file share
    /// it, and no image's key can be it.
    fn provisional(&self, identity: &str) -> Option<ImageKey> {
        self.hashed(b"reimage unhashed image volume 1", identity)
    }

    fn hashed(&self, kind: &[u8], name: &str) -> Option<ImageKey> {
        ImageKey::parse(&digest::sha256_of(&[
            kind,
            name.as_bytes(),
            &self.prefix,
            self.ranges.as_bytes(),
            self.driver.as_bytes(),
        ]))
    }
}

/// The key of the image with SHA-256 `sha256` unpacked with the request's `rootfs_prefix` and
/// `idmap` by `driver`; `None` where the pool keeps no image volumes.
fn key_of(
    driver: &dyn Driver,
    sha256: &str,
    prefix_request: Option<&str>,
    idmap: &IdMap,
) -> Option<ImageKey> {
    KeyParts::of(driver, prefix_request, idmap)?.key(sha256)
}

/// The lock of the image volume `key` in `pool`: named so that no volume's lock can be.
pub(super) fn lock_image(
    state: &RecordDir,
    pool: &str,
    key: &ImageKey,
    wait: bool,
) -> Result<VolumeLock> {
    let name = format!(".image.{key}");
    let started = Instant::now();
    loop {
        match VolumeLock::acquire(state, pool, &name) {
            Err(e) if e.code == Code::Locked && wait && started.elapsed() < BUILD_WAIT => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) if e.code == Code::Locked => {
                return Err(Error::new(
                    Code::Locked,
                    format!("image volume {key} of pool {pool} is being built or removed by another reimage request"),
                ))
            }
            other => return other,
        }
    }
}

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The record of what an image volume holds, kept beside it in the state directory.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub(super) struct ImageRecord {
    pub(super) sha256: String,
    /// The image file it was last filled from.
    pub(super) image: String,
    pub(super) unpacked_bytes: u64,
    pub(super) allocated_bytes: u64,
    pub(super) inodes: u64,
    pub(super) created: u64,
    pub(super) last_used: u64,
    /// What measure would have found, so that a request for the same image from another
    /// file needs no decode at all.
    #[serde(default)]
    pub(super) measurement: Option<cache::Stored>,
}

impl ImageRecord {
    fn new(content_path: &Path, sha256: &str, m: &Measurement) -> ImageRecord {
        let t = now();
        ImageRecord {
            sha256: sha256.to_owned(),
            image: content_path.display().to_string(),
            unpacked_bytes: m.tally.unpacked_bytes,
            allocated_bytes: m.tally.allocated_bytes,
            inodes: m.tally.inodes,
            created: t,
            last_used: t,
            measurement: Some(cache::Stored::of(m)),
        }
    }
}

pub(super) fn image_records(state: &RecordDir, pool: &str) -> Result<RecordDir> {
    state.area(&["images", pool]).map_err(|e| {
        Error::internal(format!(
            "cannot open the image volume records in {}: {e}",
            state.path().display()
        ))
    })
}

pub(super) fn read_record(records: &RecordDir, key: &ImageKey) -> Option<ImageRecord> {
    let bytes = records.read(&format!("{key}.json")).ok()??;
    serde_json::from_slice(&bytes).ok()
}

fn write_record(records: &RecordDir, key: &ImageKey, record: &ImageRecord) {
    if let Ok(text) = serde_json::to_vec(record) {
        let _ = records.replace(&format!("{key}.json"), &text, false);
    }
}

/// Makes the `New` slot of the held volume a clone of the image volume `key`, building the
/// image volume first when the pool has no sealed one; sizes the clone to `target_size` and
/// opens its root. Fault points: `build:*` while building, then `created` once the clone is
/// there.
pub(super) fn clone_new(
    held: &mut LockedVolume<'_>,
    pool: &str,
    key: &ImageKey,
    filling: &Filling<'_>,
    created: &str,
    timings: &mut Timings,
) -> Result<(Mounted, Cache)> {
    let (driver, volume) = (held.driver, held.volume);
    let is_sealed = |images: &[reimage_driver::ImageVolume]| {
        images.iter().any(|image| image.sealed && &image.key == key)
    };
    let records = image_records(held.state, pool)?;
    // What interrupted builds left goes first, as a volume's own leftovers do.
    let images = driver.images()?;
    remove_unsealed_of(held.state, pool, driver, &images)?;
    // Held until the clone exists, so that no prune removes the image volume in between.
    let _lock = lock_image(held.state, pool, key, true)?;
    // Listed again only when it was missing: a request we waited for may have built it.
    let cache = if is_sealed(&images) || is_sealed(&driver.images()?) {
        match filling.content {
            Content::Image {
                built_image_volume: true,
                ..
            } => Cache::Miss,
            _ => Cache::Hit,
        }
    } else {
        build_image(held, &records, key, filling, timings)?;
        Cache::Miss
    };
    let root = prepare_new(held, created, timings, || {
        let slot = Slot::building(volume);
        if let Cloned::CopyFrom(image) = driver.clone_image(key, slot)? {
            let copy = driver.open_root(slot)?;
            crate::preserve::reflink_tree(image.root(), copy.root())?;
            copy.release()?;
            image.release()?;
        }
        size_clone(driver, slot, filling)
    })?;
    if let Some(mut record) = read_record(&records, key) {
        record.last_used = now();
        write_record(&records, key, &record);
    }
    Ok((root, cache))
}

/// Unpacks the image into a new image volume and seals it; on failure removes what it built.
fn build_image(
    held: &mut LockedVolume<'_>,
    records: &RecordDir,
    key: &ImageKey,
    filling: &Filling<'_>,
    timings: &mut Timings,
) -> Result<()> {
    let driver = held.driver;
    // An unsealed one is what an interrupted build left: never used, built again.
    driver.destroy_image(key, false)?;
    let built = (|| {
        driver.create_image(key, filling.image_size)?;
        fault::point("image:created")?;
        let root = driver.open_image(key)?;
        let events = &mut *held.events;
        timings.time("unpack", || {
            unpack_into(
                events,
                &root,
                filling.content,
                filling.idmap,
                &[],
                filling.metadata,
            )
            .map_err(|e| with_fill_numbers(driver, e, &root, filling.content, None))
        })?;
        fault::point("image:unpacked")?;
        seal_image(driver, key, root, timings)?;
        Ok(())
    })();
    if let Err(e) = built {
        return Err(match driver.destroy_image(key, false) {
            Ok(()) => e,
            Err(again) => recovery_pending(e, &Error::from(again)),
        });
    }
    fault::point("image:sealed")?;
    if let Content::Image {
        path,
        measurement,
        sha256,
        ..
    } = filling.content
    {
        write_record(records, key, &ImageRecord::new(path, sha256, measurement));
    }
    Ok(())
}

/// The build's last steps: the unpacked image volume synced, closed and sealed.
fn seal_image(
    driver: &dyn Driver,
    key: &ImageKey,
    root: Mounted,
    timings: &mut Timings,
) -> Result<()> {
    sync_image(root, timings)?;
    driver.seal_image(key, key).map_err(Error::from)
}

/// The unpacked image volume synced and closed, ready to be sealed.
fn sync_image(root: Mounted, timings: &mut Timings) -> Result<()> {
    timings.time("sync", || syncfs(root.root()))?;
    closed_synced(root)
}

/// The image volume, already synced, closed and ready to be sealed.
fn closed_synced(root: Mounted) -> Result<()> {
    root.release()?;
    cancelled_check()
}

/// Everything written to the filesystem of `root` made durable.
fn syncfs(root: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    rustix::fs::syncfs(root).map_err(|e| Error::new(Code::DriverError, format!("syncfs: {e}")))
}

/// Removes the unsealed image volumes that no running request is building: what interrupted
/// builds left. Returns their keys.
pub(super) fn remove_unsealed(
    state: &RecordDir,
    pool: &str,
    driver: &dyn Driver,
) -> Result<Vec<String>> {
    if !driver.capabilities().image_volumes {
        return Ok(Vec::new());
    }
    remove_unsealed_of(state, pool, driver, &driver.images()?)
}

/// [`remove_unsealed`] among `images`, as the driver listed them.
fn remove_unsealed_of(
    state: &RecordDir,
    pool: &str,
    driver: &dyn Driver,
    images: &[reimage_driver::ImageVolume],
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for image in images.iter().filter(|image| !image.sealed) {
        let Ok(_lock) = lock_image(state, pool, &image.key, false) else {
            continue; // being built right now
        };
        driver.destroy_image(&image.key, false)?;
        removed.push(image.key.to_string());
    }
    Ok(removed)
}

/// The build's first steps: the `New` slot made a clone of the template's snapshot, or of the
/// content's image volume when the pool keeps them (`key`), or created at the plan's size and
/// unpacked into otherwise (measuring while it unpacks, for `Unmeasured` content). Returns
/// its open root, the cache's answer, and the content once measured when it was not before.
pub(super) fn build_new(
    held: &mut LockedVolume<'_>,
    pool: &str,
    key: Option<&ImageKey>,
    filling: &Filling<'_>,
    created: &str,
    timings: &mut Timings,
) -> Result<(Mounted, Cache, Option<Content>)> {
    match filling.content {
        Content::Template { volume, snapshot } => {
            let root = clone_template(held, volume, snapshot, filling, created, timings)?;
            return Ok((root, Cache::Off, None));
        }
        Content::Unmeasured(opened) => {
            let (root, content) = fill_new_in_one_pass(held, opened, filling, created, timings)?;
            return Ok((root, Cache::Off, Some(content)));
        }
        _ => {}
    }
    if let Some(key) = key {
        let (root, cache) = clone_new(held, pool, key, filling, created, timings)?;
        return Ok((root, cache, None));
    }
    let root = create_new(held, filling.target_size, created, timings)?;
    unpack_step(held, &root, filling, &[], timings)?;
    Ok((root, Cache::Off, None))
}

/// The content of a fill that clones an image volume: measured from the measure cache, from
/// the record of its image volume, or while building that image volume (one decode of the
/// image instead of two). It is measured first, as without image volumes, where none of these
/// applies: an image whose first entry misled the guess of its rootfs prefix, an image the build refused (so that it is
/// refused as anywhere else, by measure), and a pool whose image volumes are sized when
/// created (no `late_limit`: an LV's filesystem).
pub(super) fn measure_or_build(
    held: &mut LockedVolume<'_>,
    pool: &str,
    mut opened: Opened,
    idmap: &IdMap,
    fill: &Fill,
    timings: &mut Timings,
) -> Result<Content> {
    let driver = held.driver;
    let parts = KeyParts::of(driver, opened.prefix.as_deref(), idmap);
    let provisional = parts
        .as_ref()
        .zip(opened.identity())
        .and_then(|(parts, identity)| parts.provisional(identity));
    let (Some(parts), Some(provisional)) = (parts, provisional) else {
        return measure_opened(held.state, held.events, opened, idmap, None, timings);
    };
    if opened.remembered().is_some() || !driver.capabilities().late_limit {
        return measure_opened(held.state, held.events, opened, idmap, None, timings);
    }
    // One build per file at a time: a request building from it already is waited for, and
    // what it measured is then in the measure cache.
    let _lock = lock_image(held.state, pool, &provisional, true)?;
    opened.refresh(held.state);
    if opened.remembered().is_some() {
        return measure_opened(held.state, held.events, opened, idmap, None, timings);
    }
    let build = Provisional {
        pool,
        key: &provisional,
        parts: &parts,
        opened: &opened,
        idmap,
        fill,
    };
    let (sha256, found) = build.run(held, timings)?;
    match found {
        Some((m, built)) => {
            opened.remember(held.state, &m, &sha256);
            Ok(opened.into_content(m, sha256, built))
        }
        None => measure_opened(
            held.state,
            held.events,
            opened,
            idmap,
            Some(sha256),
            timings,
        ),
    }
}

/// A new image volume built from an image seen for the first time, before its key is known:
/// under a provisional key (one decode and no pass before it). Once both the unpack and the
/// image's SHA-256 are done it is sealed under the image's key, or dropped where an image
/// volume with that key is there already (the same bytes seen in another file). When the pool
/// holds a sealed image volume, the hash is read beside the unpack on the other core, so that
/// finding it there stops the unpack early; otherwise no hash can stop it, and the hash is read
/// while the new image volume syncs, when the cores would wait on the disk.
struct Provisional<'a> {
    pool: &'a str,
    key: &'a ImageKey,
    parts: &'a KeyParts,
    opened: &'a Opened,
    idmap: &'a IdMap,
    fill: &'a Fill,
}

impl Provisional<'_> {
    /// Returns the image's SHA-256 and, when the pool now has its image volume, the image's
    /// measurement and whether this request built it (`None`: the guessed rootfs prefix was
    /// wrong or the build failed, and nothing of it is left; the caller measures first).
    fn run(
        &self,
        held: &mut LockedVolume<'_>,
        timings: &mut Timings,
    ) -> Result<(String, Option<(Measurement, bool)>)> {
        let driver = held.driver;
        let sealed: Vec<ImageKey> = driver
            .images()?
            .into_iter()
            .filter(|image| image.sealed)
            .map(|image| image.key)
            .collect();
        // An unsealed one is what an interrupted build left: never used, built again.
        driver.destroy_image(self.key, false)?;
        let budget = budget_of(driver, self.fill)?;
        let superseded = AtomicBool::new(false);
        let early = !sealed.is_empty();
        let (built, hashed, synced) = std::thread::scope(|scope| {
            let hashing = early.then(|| {
                scope.spawn(|| {
                    let sha256 = self.opened.sha256()?;
                    if self.parts.key(&sha256).is_some_and(|k| sealed.contains(&k)) {
                        superseded.store(true, Ordering::Relaxed);
                    }
                    Ok::<_, Error>(sha256)
                })
            });
            let built: Result<Option<(Mounted, Measurement)>> = (|| {
                driver.create_image(self.key, None)?;
                fault::point("image:created")?;
                let root = driver.open_image(self.key)?;
                let measured = timings.time("unpack", || {
                    unpack_alongside(
                        &mut *held.events,
                        &root,
                        self.opened,
                        self.idmap,
                        self.fill,
                        budget,
                        &superseded,
                    )
                })?;
                let Measured::Unpacked(m) = measured else {
                    root.release()?;
                    return Ok(None);
                };
                fault::point("image:unpacked")?;
                Ok(Some((root, m)))
            })();
            // `synced`: the image volume's sync when it ran beside the hash, `None` if not yet.
            let (hashed, synced) = match (hashing, &built) {
                (Some(hashing), _) => (
                    hashing
                        .join()
                        .unwrap_or_else(|_| Err(Error::internal("the image hash panicked"))),
                    None,
                ),
                (None, Ok(Some((root, _)))) => timings.time("sync", || {
                    let root = root.root();
                    std::thread::scope(|inner| {
                        let syncing = inner.spawn(move || syncfs(root));
                        let hashed = self.opened.sha256();
                        let synced = syncing
                            .join()
                            .unwrap_or_else(|_| Err(Error::internal("the image sync panicked")));
                        (hashed, Some(synced))
                    })
                }),
                (None, _) => (self.opened.sha256(), None),
            };
            (built, hashed, synced)
        });
        let removed = |e: Error| match driver.destroy_image(self.key, false) {
            Ok(()) => e,
            Err(again) => recovery_pending(e, &Error::from(again)),
        };
        let sha256 = match hashed {
            Ok(sha256) => sha256,
            Err(e) => return Err(removed(e)),
        };
        let key = self
            .parts
            .key(&sha256)
            .ok_or_else(|| removed(Error::internal("an image volume key that is not one")))?;
        let records = image_records(held.state, self.pool)?;
        if sealed.contains(&key) && !signals::cancelled() {
            // The pool had it from the start (the same bytes in another file): a hit, with
            // this build's measurement or the one recorded with the image volume.
            let ours = match built {
                Ok(Some((root, m))) => {
                    root.release()?;
                    Some(m)
                }
                _ => None,
            };
            driver.destroy_image(self.key, false)?;
            let m = ours.or_else(|| read_record(&records, &key)?.measurement?.measurement());
            return Ok((sha256, m.map(|m| (m, false))));
        }
        let (root, m) = match built {
            Ok(Some(built)) => built,
            Ok(None) => {
                driver.destroy_image(self.key, false)?;
                return Ok((sha256, None));
            }
            // Interrupted, or not cleaned up: the request stops; otherwise it measures first.
            Err(e) => {
                let e = removed(e);
                if e.code == Code::Interrupted || e.details.contains_key("recovery") {
                    return Err(e);
                }
                return Ok((sha256, None));
            }
        };
        let sealing = (|| {
            match synced {
                Some(synced) => synced.and_then(|()| closed_synced(root))?,
                None => sync_image(root, timings)?,
            }
            // Sealed under its key by this request, or by another one meanwhile.
            let _lock = lock_image(held.state, self.pool, &key, true)?;
            if driver.images()?.iter().any(|i| i.sealed && i.key == key) {
                driver.destroy_image(self.key, false)?;
                return Ok(());
            }
            driver.seal_image(self.key, &key)?;
            fault::point("image:sealed")?;
            write_record(
                &records,
                &key,
                &ImageRecord::new(&self.opened.path, &sha256, &m),
            );
            Ok(())
        })();
        match sealing {
            Ok(()) => Ok((sha256, Some((m, true)))),
            Err(e) => Err(removed(e)),
        }
    }
}
