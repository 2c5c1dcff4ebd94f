//! A volume under its lock: its driver, journal and lock, and the journaled steps
//! every operation shares (intents, recovery after a failed step, the commit that swaps a
//! complete new volume in).

use super::*;

/// A volume under its lock: its driver and journal, and the steps that journal.
pub(super) struct LockedVolume<'a> {
    pub(super) driver: &'a dyn Driver,
    pub(super) journal: Journal,
    /// The state directory (the measure cache).
    pub(super) state: &'a RecordDir,
    pub(super) volume: &'a VolumeName,
    pub(super) events: &'a mut Events,
    pub(super) image: Option<&'a OpenedImage>,
    pub(super) _lock: VolumeLock,
}

impl LockedVolume<'_> {
    pub(super) fn intent(&self, op: IntentOp, phase: Phase, with_snapshots: bool) -> Result<()> {
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
    pub(super) fn recover_first(&mut self) -> Result<Option<Outcome>> {
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
            self.events.warning(Warning::Recovered, &o.describe());
        }
        Ok(outcome)
    }

    /// Finishes or rolls back from `phase` at once, as `recover` would after a crash there.
    pub(super) fn try_recover(
        &self,
        op: IntentOp,
        phase: Phase,
        with_snapshots: bool,
    ) -> Result<()> {
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
    pub(super) fn recover_after(
        &self,
        err: Error,
        op: IntentOp,
        phase: Phase,
        with_snapshots: bool,
    ) -> Error {
        match self.try_recover(op, phase, with_snapshots) {
            Ok(()) => err,
            Err(again) => recovery_pending(err, &again),
        }
    }

    /// Journals `phase`, then runs `step`; if it fails, `undo` turns the failure into what the
    /// request reports (rolling back, or recovering from `phase` as `recover` would).
    pub(super) fn journaled<T>(
        &mut self,
        op: IntentOp,
        phase: Phase,
        with_snapshots: bool,
        step: impl FnOnce(&mut Self) -> Result<T>,
        undo: impl FnOnce(&mut Self, Error) -> Error,
    ) -> Result<T> {
        self.intent(op, phase, with_snapshots)?;
        step(self).map_err(|e| undo(self, e))
    }

    /// The `undo` of a step whose failure is recovered from its phase, as after a crash.
    pub(super) fn recover_from(
        op: IntentOp,
        phase: Phase,
        with_snapshots: bool,
    ) -> impl FnOnce(&mut Self, Error) -> Error {
        move |held: &mut Self, e: Error| held.recover_after(e, op, phase, with_snapshots)
    }

    /// Destroys the `New` slot after a failure and clears the journal; if that fails too the
    /// journal stays so that the next request finishes the job, and the error says so.
    pub(super) fn roll_back_new(&mut self, err: Error) -> Error {
        let undone = self
            .driver
            .destroy(Slot::building(self.volume), false)
            .map_err(Error::from)
            .and_then(|()| self.journal.clear(self.volume));
        match undone {
            Ok(()) => err,
            Err(e) => recovery_pending(err, &e).context("rolled back only partly"),
        }
    }

    /// The volume must exist; `hint` ends the error's message (what to do instead).
    pub(super) fn require_live(&self, hint: &str) -> Result<()> {
        if self.driver.identity(Slot::live(self.volume))?.is_none() {
            return Err(Error::new(
                Code::NotFound,
                format!("volume {} does not exist{hint}", self.volume),
            ));
        }
        Ok(())
    }

    pub(super) fn check_not_busy(&self, slot: Slot<'_>) -> Result<()> {
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
    pub(super) fn commit(
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
        let (driver, volume) = (self.driver, self.volume);
        self.events.progress(EventPhase::Swap, 0, 1, Unit::Steps);
        let swapped = timings.time("swap", || -> Result<()> {
            fault::point("commit:journaled")?;
            let live_exists = driver.identity(Slot::live(volume))?.is_some();
            if !live_exists {
                driver.rename(Slot::building(volume), Slot::live(volume))?;
            } else if driver.capabilities().exchange {
                driver.exchange(Slot::live(volume), Slot::building(volume))?;
            } else {
                driver.rename(Slot::live(volume), Slot::old(volume))?;
                driver.rename(Slot::building(volume), Slot::live(volume))?;
            }
            Ok(())
        });
        if let Err(e) = swapped {
            // The new volume is complete: finishing the swap is the recovery.
            return self
                .try_recover(op, Phase::Committing { new_id }, with_snapshots)
                .map_err(|again| recovery_pending(e, &again));
        }
        self.events.progress(EventPhase::Swap, 1, 1, Unit::Steps);
        self.events.progress(EventPhase::Cleanup, 0, 1, Unit::Steps);
        let cleaned = timings.time("cleanup", || -> Result<()> {
            fault::point("commit:swapped")?;
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
                Warning::CleanupPending,
                &format!("the new volume is in place but the old content could not be removed yet ({}); the next request or `recover` removes it", e.message),
            ),
        }
        self.events.progress(EventPhase::Cleanup, 1, 1, Unit::Steps);
        Ok(())
    }
}
