//! The intent journal: one small JSON record per volume, written and fsynced before every
//! destructive step, so that a crash at any point can be finished or rolled back.
//!
//! `state_dir/journal/POOL/VOLUME.json` holds the operation and the phase it reached. A phase
//! is recorded *before* the step it names; recovery therefore treats each phase as "this step
//! may or may not have happened" and looks at the driver's slots (and the identity of the new
//! volume, recorded once it is complete) to see which.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use reimage_driver::VolumeName;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lock::private_dir;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntentOp {
    Create,
    Rebuild,
    RebuildInPlace,
    /// A rebuild that keeps snapshots living inside the volume: the volume itself is refilled
    /// under a guard snapshot ([`reimage_driver::KeepSnapshots::Refill`]).
    RebuildRefill,
    Delete,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "phase")]
pub enum Phase {
    /// The new volume is being built in the `New` slot; the old one is untouched.
    Building,
    /// In-place rebuild: the old volume is being moved to the `Old` slot (still intact).
    Detaching,
    /// In-place rebuild: the old volume is being destroyed. Past this point it is gone.
    DestroyingOld,
    /// The new volume (identity `new_id`) is complete and synced and is being put under the
    /// volume's name; afterwards only leftovers remain to be destroyed.
    Committing { new_id: String },
    /// Delete: the volume is being moved aside and destroyed.
    Deleting,
    /// Refill: the guard snapshot is being taken, then the volume emptied and refilled. Until
    /// the next phase, recovery rolls back to the guard and restores the size it had
    /// (`size_before`, `None` for no limit).
    Refilling { size_before: Option<u64> },
    /// Refill: the new content is complete and synced; only the guard remains to be dropped.
    Refilled,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub op: IntentOp,
    #[serde(flatten)]
    pub phase: Phase,
    /// Destroy the old volume's snapshots along with it.
    pub with_snapshots: bool,
    pub pid: u32,
}

pub struct Journal {
    dir: PathBuf,
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal {
    pub fn new(state_dir: &Path, pool: &str) -> Journal {
        Journal {
            dir: state_dir.join("journal").join(pool),
        }
    }

    fn path(&self, volume: &VolumeName) -> PathBuf {
        self.dir.join(format!("{volume}.json"))
    }

    /// Durably records `intent` for `volume`, replacing any earlier record.
    pub fn write(&self, volume: &VolumeName, intent: &Intent) -> Result<()> {
        private_dir(&self.dir)?;
        let fail = |e: std::io::Error| {
            Error::internal(format!(
                "cannot write the journal in {}: {e}",
                self.dir.display()
            ))
        };
        let path = self.path(volume);
        let tmp = self.dir.join(format!(".{volume}.json.tmp"));
        let text = serde_json::to_vec(intent).map_err(|e| Error::internal(e.to_string()))?;
        let mut file = File::create(&tmp).map_err(fail)?;
        file.write_all(&text).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &path).map_err(fail)?;
        fsync_dir(&self.dir).map_err(fail)
    }

    pub fn read(&self, volume: &VolumeName) -> Result<Option<Intent>> {
        let path = self.path(volume);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::new(
                    crate::error::Code::RecoveryRequired,
                    format!("the journal record {} is unreadable ({e}); inspect the volume and remove the record by hand", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::internal(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Removes the record once the operation is finished (or rolled back).
    pub fn clear(&self, volume: &VolumeName) -> Result<()> {
        match std::fs::remove_file(self.path(volume)) {
            Ok(()) => fsync_dir(&self.dir)
                .map_err(|e| Error::internal(format!("cannot sync {}: {e}", self.dir.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal(format!(
                "cannot clear the journal record: {e}"
            ))),
        }
    }

    /// Volumes that have a record.
    pub fn volumes(&self) -> Result<Vec<VolumeName>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::internal(format!(
                    "cannot list {}: {e}",
                    self.dir.display()
                )))
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Ok(v) = VolumeName::parse(name) {
                out.push(v);
            }
        }
        out.sort();
        Ok(out)
    }
}
