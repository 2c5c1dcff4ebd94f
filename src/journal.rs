//! The intent journal: one small JSON record per volume, written and fsynced before every
//! destructive step, so that a crash at any point can be finished or rolled back.
//!
//! `state_dir/journal/POOL/VOLUME.json` holds the operation and the phase it reached. A phase
//! is recorded *before* the step it names; recovery therefore treats each phase as "this step
//! may or may not have happened" and looks at the driver's slots (and the identity of the new
//! volume, recorded once it is complete) to see which.

use reimage_driver::records::RecordDir;
use reimage_driver::VolumeName;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
    dir: RecordDir,
}

impl Journal {
    /// The journal of `pool` in the state directory (made when missing).
    pub fn open(state: &RecordDir, pool: &str) -> Result<Journal> {
        let dir = state.area(&["journal", pool]).map_err(|e| {
            Error::internal(format!(
                "cannot open the journal in {}: {e}",
                state.path().display()
            ))
        })?;
        Ok(Journal { dir })
    }

    fn name(volume: &VolumeName) -> String {
        format!("{volume}.json")
    }

    fn failed(&self, what: &str, e: std::io::Error) -> Error {
        Error::internal(format!(
            "cannot {what} the journal in {}: {e}",
            self.dir.path().display()
        ))
    }

    /// Durably records `intent` for `volume`, replacing any earlier record.
    pub fn write(&self, volume: &VolumeName, intent: &Intent) -> Result<()> {
        let text = serde_json::to_vec(intent).map_err(|e| Error::internal(e.to_string()))?;
        self.dir
            .replace(&Self::name(volume), &text, true)
            .map_err(|e| self.failed("write", e))
    }

    pub fn read(&self, volume: &VolumeName) -> Result<Option<Intent>> {
        let name = Self::name(volume);
        let Some(bytes) = self.dir.read(&name).map_err(|e| self.failed("read", e))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::new(
                crate::error::Code::RecoveryRequired,
                format!("the journal record {} is unreadable ({e}); inspect the volume and remove the record by hand", self.dir.path().join(&name).display()),
            )
        })
    }

    /// Removes the record once the operation is finished (or rolled back).
    pub fn clear(&self, volume: &VolumeName) -> Result<()> {
        if self
            .dir
            .remove(&Self::name(volume))
            .map_err(|e| self.failed("clear a record in", e))?
        {
            self.dir.sync().map_err(|e| self.failed("sync", e))?;
        }
        Ok(())
    }

    /// Volumes that have a record.
    pub fn volumes(&self) -> Result<Vec<VolumeName>> {
        let names = self.dir.names().map_err(|e| self.failed("list", e))?;
        let mut out: Vec<VolumeName> = names
            .iter()
            .filter_map(|n| n.strip_suffix(".json"))
            .filter_map(|n| VolumeName::parse(n).ok())
            .collect();
        out.sort();
        Ok(out)
    }
}
