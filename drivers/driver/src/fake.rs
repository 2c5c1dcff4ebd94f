//! A driver for testing the core's orchestration, not storage: slots and their identities live
//! in memory, each volume's content in a plain directory of its own under a scratch
//! directory, and every call is recorded. Any call can be made to fail, or to end the
//! process's work there as a crash would (an unwind that skips every rollback), by its
//! number. The real backends' suites stay the evidence that a driver works; this one lets
//! the core's combinations of steps and failures be tried in milliseconds.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use crate::{
    Capabilities, Cloned, Driver, Error, ErrorKind, ImageKey, ImageVolume, KeepSnapshots, Mounted,
    PoolSpace, Result, SizeModel, Slot, SlotKind, Usage, VolumeName,
};

/// What happens at the chosen call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected {
    /// The call fails with a driver error; the core sees it and rolls back or recovers.
    Failure,
    /// The call never returns: the work unwinds with [`SimulatedCrash`], past every rollback,
    /// leaving the journal and the slots as a `kill -9` there would.
    Crash,
}

/// The payload of a simulated crash's unwind.
#[derive(Debug)]
pub struct SimulatedCrash;

struct Object {
    id: String,
    dir: PathBuf,
    size: Option<u64>,
    /// The image volume it is a clone of.
    origin: Option<ImageKey>,
}

#[derive(Default)]
struct State {
    slots: BTreeMap<(String, SlotKind), Object>,
    /// Image volumes by key and sealed state.
    images: BTreeMap<(ImageKey, bool), PathBuf>,
    /// Snapshots of live volumes, by volume and name: what templates are cloned from.
    snapshots: BTreeMap<(String, String), PathBuf>,
    next_id: u64,
    calls: Vec<String>,
    inject: Option<(usize, Injected)>,
}

pub struct FakeDriver {
    scratch: PathBuf,
    capabilities: Capabilities,
    state: RefCell<State>,
}

impl FakeDriver {
    /// A driver whose volumes live in directories under `scratch` (which must exist).
    pub fn new(scratch: &Path) -> FakeDriver {
        FakeDriver {
            scratch: scratch.to_owned(),
            capabilities: Capabilities {
                snapshots: false,
                keep_snapshots: KeepSnapshots::No,
                size_counts_snapshots: false,
                limit_reads_as_full: false,
                size_model: SizeModel::Quota,
                shrink: true,
                exchange: false,
                cheap_usage: true,
                image_volumes: false,
                templates: true,
                late_limit: true,
                size_counts_image: true,
                full_at_size: false,
            },
            state: RefCell::new(State::default()),
        }
    }

    /// Keeps image volumes (as btrfs does): a clone is a copy of the image volume's directory.
    pub fn with_image_volumes(mut self) -> FakeDriver {
        self.capabilities.image_volumes = true;
        self
    }

    /// The pool's image volumes: key and sealed state.
    pub fn image_volumes(&self) -> Vec<(ImageKey, bool)> {
        self.state.borrow().images.keys().cloned().collect()
    }

    /// A new scratch directory for an object.
    fn new_dir(&self) -> Result<(String, PathBuf)> {
        let mut state = self.state.borrow_mut();
        state.next_id += 1;
        let id = format!("fake-{}", state.next_id);
        let dir = self.scratch.join(&id);
        std::fs::create_dir(&dir).map_err(|e| io("create", e))?;
        Ok((id, dir))
    }

    fn image_call(&self, method: &str, key: &ImageKey) -> Result<()> {
        self.call(&format!("{method}(image {})", &key.as_str()[..8]), None)
    }

    /// Swaps by [`Driver::exchange`] (as dir and btrfs do) instead of two renames.
    pub fn with_exchange(mut self) -> FakeDriver {
        self.capabilities.exchange = true;
        self
    }

    /// Makes call number `n` (counted from 1, over every method) do `what`.
    pub fn inject(&self, n: usize, what: Injected) {
        let mut state = self.state.borrow_mut();
        state.inject = Some((state.calls.len() + n, what));
    }

    /// Takes snapshot `name` of the live `volume` (a copy of its content), for templates.
    /// Not counted as a call.
    pub fn take_snapshot(&self, volume: &VolumeName, name: &str) -> Result<()> {
        let source = self
            .content(volume, SlotKind::Live)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no volume {volume}")))?;
        let (_, dir) = self.new_dir()?;
        copy_tree(&source, &dir)?;
        self.state
            .borrow_mut()
            .snapshots
            .insert((volume.as_str().to_owned(), name.to_owned()), dir);
        Ok(())
    }

    /// Methods called so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.state.borrow().calls.clone()
    }

    /// The directory holding the content of the volume in `slot`, if the slot is filled.
    pub fn content(&self, volume: &VolumeName, kind: SlotKind) -> Option<PathBuf> {
        let state = self.state.borrow();
        state
            .slots
            .get(&(volume.as_str().to_owned(), kind))
            .map(|o| o.dir.clone())
    }

    /// Counts a call and carries out what was injected for it.
    fn call(&self, method: &str, slot: Option<Slot<'_>>) -> Result<()> {
        let mut state = self.state.borrow_mut();
        let name = match slot {
            Some(s) => format!("{method}({}:{})", s.volume, s.kind.as_str()),
            None => method.to_owned(),
        };
        state.calls.push(name);
        match state.inject {
            Some((n, what)) if n == state.calls.len() => {
                state.inject = None;
                drop(state);
                match what {
                    Injected::Failure => Err(Error::new(
                        ErrorKind::Failed,
                        format!("injected failure in {method}"),
                    )),
                    Injected::Crash => std::panic::resume_unwind(Box::new(SimulatedCrash)),
                }
            }
            _ => Ok(()),
        }
    }

    /// Fills the empty `slot` with a copy of `source` (a clone of a snapshot or of the image
    /// volume `origin`).
    fn clone_into(&self, source: &Path, slot: Slot<'_>, origin: Option<ImageKey>) -> Result<()> {
        if self.state.borrow().slots.contains_key(&Self::key(slot)) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{slot} exists"),
            ));
        }
        let (id, dir) = self.new_dir()?;
        copy_tree(source, &dir)?;
        self.state.borrow_mut().slots.insert(
            Self::key(slot),
            Object {
                id,
                dir,
                size: None,
                origin,
            },
        );
        Ok(())
    }

    fn key(slot: Slot<'_>) -> (String, SlotKind) {
        (slot.volume.as_str().to_owned(), slot.kind)
    }
}

/// Copies the content of directory `from` into the existing directory `to`.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(from.join("."))
        .arg(to)
        .status()
        .map_err(|e| io("cp", e))?;
    if !copied.success() {
        return Err(Error::new(ErrorKind::Failed, "cp -a failed"));
    }
    Ok(())
}

/// A content directory, opened as a volume's root.
fn open_dir(dir: &Path) -> Result<Mounted> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::new(ErrorKind::Failed, "a path with NUL"))?;
    let fd = rustix::fs::open(
        path.as_c_str(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::errno(format!("opening {}", dir.display()), e))?;
    Ok(Mounted::unmanaged(fd))
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::io(what, e)
}

impl Driver for FakeDriver {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    fn identity(&self, slot: Slot<'_>) -> Result<Option<String>> {
        self.call("identity", Some(slot))?;
        Ok(self
            .state
            .borrow()
            .slots
            .get(&Self::key(slot))
            .map(|o| o.id.clone()))
    }

    fn create(&self, slot: Slot<'_>, size: Option<u64>) -> Result<()> {
        self.call("create", Some(slot))?;
        let mut state = self.state.borrow_mut();
        if state.slots.contains_key(&Self::key(slot)) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{slot} exists"),
            ));
        }
        state.next_id += 1;
        let id = format!("fake-{}", state.next_id);
        let dir = self.scratch.join(&id);
        std::fs::create_dir(&dir).map_err(|e| io("create", e))?;
        state.slots.insert(
            Self::key(slot),
            Object {
                id,
                dir,
                size,
                origin: None,
            },
        );
        Ok(())
    }

    fn destroy(&self, slot: Slot<'_>, _with_snapshots: bool) -> Result<()> {
        self.call("destroy", Some(slot))?;
        let removed = self.state.borrow_mut().slots.remove(&Self::key(slot));
        if let Some(o) = removed {
            std::fs::remove_dir_all(&o.dir).map_err(|e| io("destroy", e))?;
        }
        Ok(())
    }

    fn snapshots(&self, slot: Slot<'_>) -> Result<Vec<String>> {
        self.call("snapshots", Some(slot))?;
        if slot.kind != SlotKind::Live {
            return Ok(Vec::new());
        }
        Ok(self
            .state
            .borrow()
            .snapshots
            .keys()
            .filter(|(volume, _)| volume == slot.volume.as_str())
            .map(|(_, name)| name.clone())
            .collect())
    }

    fn clone_snapshot(&self, template: &VolumeName, snapshot: &str, slot: Slot<'_>) -> Result<()> {
        self.call("clone_snapshot", Some(slot))?;
        let source = self
            .state
            .borrow()
            .snapshots
            .get(&(template.as_str().to_owned(), snapshot.to_owned()))
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("no snapshot {template}@{snapshot}"),
                )
            })?;
        self.clone_into(&source, slot, None)
    }

    fn rename(&self, from: Slot<'_>, to: Slot<'_>) -> Result<()> {
        self.call("rename", Some(from))?;
        let mut state = self.state.borrow_mut();
        if state.slots.contains_key(&Self::key(to)) {
            return Err(Error::new(ErrorKind::AlreadyExists, format!("{to} exists")));
        }
        let object = state
            .slots
            .remove(&Self::key(from))
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{from} is empty")))?;
        state.slots.insert(Self::key(to), object);
        Ok(())
    }

    fn exchange(&self, a: Slot<'_>, b: Slot<'_>) -> Result<()> {
        self.call("exchange", Some(a))?;
        if !self.capabilities.exchange {
            return Err(Error::new(ErrorKind::Unsupported, "no exchange"));
        }
        let mut state = self.state.borrow_mut();
        let first = state.slots.remove(&Self::key(a));
        let second = state.slots.remove(&Self::key(b));
        let (Some(first), Some(second)) = (first, second) else {
            return Err(Error::new(ErrorKind::NotFound, "exchange of an empty slot"));
        };
        state.slots.insert(Self::key(a), second);
        state.slots.insert(Self::key(b), first);
        Ok(())
    }

    fn usage(&self, slot: Slot<'_>) -> Result<Usage> {
        self.call("usage", Some(slot))?;
        let state = self.state.borrow();
        let o = state
            .slots
            .get(&Self::key(slot))
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{slot} is empty")))?;
        Ok(Usage {
            size: o.size,
            used: 0,
            inodes: None,
        })
    }

    fn set_size(&self, slot: Slot<'_>, bytes: u64) -> Result<()> {
        self.call("set_size", Some(slot))?;
        let mut state = self.state.borrow_mut();
        let o = state
            .slots
            .get_mut(&Self::key(slot))
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{slot} is empty")))?;
        o.size = Some(bytes);
        Ok(())
    }

    fn pool_space(&self) -> Result<PoolSpace> {
        self.call("pool_space", None)?;
        Ok(PoolSpace {
            available: 1 << 40,
            total: 1 << 40,
            inodes_available: None,
            provisioned: None,
        })
    }

    fn open_root(&self, slot: Slot<'_>) -> Result<Mounted> {
        self.call("open_root", Some(slot))?;
        let dir = self
            .state
            .borrow()
            .slots
            .get(&Self::key(slot))
            .map(|o| o.dir.clone())
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{slot} is empty")))?;
        open_dir(&dir)
    }

    fn busy(&self, slot: Slot<'_>) -> Result<Option<String>> {
        self.call("busy", Some(slot))?;
        Ok(None)
    }

    fn sync(&self, slot: Slot<'_>, _root: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        self.call("sync", Some(slot))
    }

    fn leftovers(&self) -> Result<Vec<(VolumeName, SlotKind)>> {
        self.call("leftovers", None)?;
        let state = self.state.borrow();
        state
            .slots
            .keys()
            .filter(|(_, kind)| *kind != SlotKind::Live)
            .map(|(name, kind)| {
                VolumeName::parse(name)
                    .map(|v| (v, *kind))
                    .map_err(|e| Error::new(ErrorKind::Failed, e.to_string()))
            })
            .collect()
    }

    fn create_image(&self, key: &ImageKey, _size: Option<u64>) -> Result<()> {
        self.image_call("create_image", key)?;
        if self
            .state
            .borrow()
            .images
            .contains_key(&(key.clone(), false))
        {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                "unsealed image exists",
            ));
        }
        let (_, dir) = self.new_dir()?;
        self.state
            .borrow_mut()
            .images
            .insert((key.clone(), false), dir);
        Ok(())
    }

    fn open_image(&self, key: &ImageKey) -> Result<Mounted> {
        self.image_call("open_image", key)?;
        let dir = self
            .state
            .borrow()
            .images
            .get(&(key.clone(), false))
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, "no unsealed image"))?;
        open_dir(&dir)
    }

    fn seal_image(&self, building: &ImageKey, key: &ImageKey) -> Result<()> {
        self.image_call("seal_image", key)?;
        let mut state = self.state.borrow_mut();
        if state.images.contains_key(&(key.clone(), true)) {
            return Err(Error::new(ErrorKind::AlreadyExists, "sealed already"));
        }
        let dir = state
            .images
            .remove(&(building.clone(), false))
            .ok_or_else(|| Error::new(ErrorKind::NotFound, "no unsealed image"))?;
        state.images.insert((key.clone(), true), dir);
        Ok(())
    }

    fn clone_image(&self, key: &ImageKey, slot: Slot<'_>) -> Result<Cloned> {
        self.image_call("clone_image", key)?;
        let source = self
            .state
            .borrow()
            .images
            .get(&(key.clone(), true))
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, "no sealed image"))?;
        self.clone_into(&source, slot, Some(key.clone()))?;
        Ok(Cloned::Whole)
    }

    fn images(&self) -> Result<Vec<ImageVolume>> {
        self.call("images", None)?;
        let state = self.state.borrow();
        Ok(state
            .images
            .keys()
            .map(|(key, sealed)| ImageVolume {
                key: key.clone(),
                sealed: *sealed,
                clones: state
                    .slots
                    .iter()
                    .filter(|(_, o)| o.origin.as_ref() == Some(key) && *sealed)
                    .map(|((name, _), _)| name.clone())
                    .collect(),
                holders: Vec::new(),
            })
            .collect())
    }

    fn destroy_image(&self, key: &ImageKey, sealed: bool) -> Result<()> {
        self.image_call("destroy_image", key)?;
        let removed = self
            .state
            .borrow_mut()
            .images
            .remove(&(key.clone(), sealed));
        if let Some(dir) = removed {
            std::fs::remove_dir_all(&dir).map_err(|e| io("destroy_image", e))?;
        }
        Ok(())
    }
}
