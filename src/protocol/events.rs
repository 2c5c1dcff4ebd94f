//! The event stream: JSON Lines on stdout for programs; log lines, progress and a summary on
//! stderr for people (see `screen.rs`).
//!
//! Contract kept here: every stdout line is one object with an `event` key; nothing follows
//! the final `result` or `error`; progress is rate-limited to about ten events a second.
//! A caller that closes stdout does not stop the operation half-way: write failures are
//! reported once on stderr and the work goes on, so the volume still ends complete.

use std::io::Write;
use std::time::{Duration, Instant};

use super::event::{Confinement, ErrorEvent, Event, Progress, ResultEvent, Start, WarningEvent};
use super::results::{Cache, OpResult};
use super::screen::{Display, Screen};
use crate::error::{Error, Warning};

pub use super::event::{Phase, Unit};

/// Whether stderr shows progress (`--progress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarMode {
    Auto,
    Always,
    Never,
}

const MIN_INTERVAL: Duration = Duration::from_millis(100);

pub struct Events {
    out: Box<dyn Write + Send>,
    screen: Screen,
    /// stdout is the terminal the progress line is drawn on.
    stdout_on_screen: bool,
    started: Instant,
    finished: bool,
    out_failed: bool,
    last_progress: Option<(Instant, Phase, u64)>,
    /// The phases that reported their start (`done` 0).
    started_phases: Vec<Phase>,
}

impl Events {
    /// Events on `out`; `err` for people, with progress shown as `display` says.
    /// `stdout_on_screen`: stdout is the same terminal as stderr, so the progress line is
    /// cleared before each event line.
    pub fn new(
        out: Box<dyn Write + Send>,
        err: Box<dyn Write + Send>,
        display: Display,
        stdout_on_screen: bool,
    ) -> Self {
        Events {
            out,
            screen: Screen::new(err, display),
            stdout_on_screen: stdout_on_screen && display == Display::Terminal,
            started: Instant::now(),
            finished: false,
            out_failed: false,
            last_progress: None,
            started_phases: Vec::new(),
        }
    }

    /// Events for tests and library callers: everything to the given writer, no progress.
    pub fn to_writer(out: Box<dyn Write + Send>) -> Self {
        Events::new(out, Box::new(std::io::sink()), Display::Off, false)
    }

    fn emit(&mut self, event: &Event) {
        if self.finished {
            return;
        }
        let mut line = match serde_json::to_string(event) {
            Ok(line) => line,
            Err(e) => {
                self.log(&format!("internal error: cannot write an event: {e}"));
                return;
            }
        };
        line.push('\n');
        let out = &mut self.out;
        let mut written = Ok(());
        let mut write = || written = out.write_all(line.as_bytes()).and_then(|_| out.flush());
        if self.stdout_on_screen {
            self.screen.around(write);
        } else {
            write();
        }
        if let Err(e) = written {
            if !self.out_failed {
                self.out_failed = true;
                self.log(&format!("cannot write events to stdout ({e}); carrying on"));
            }
        }
    }

    /// A human-readable line on stderr.
    pub fn log(&mut self, message: &str) {
        self.screen.line(message);
    }

    pub fn start(
        &mut self,
        op: &str,
        driver: &str,
        target: (Option<&str>, Option<&str>),
        confinement: Confinement,
    ) {
        self.emit(&Event::Start(Start {
            api: super::request::API_VERSION,
            op: op.to_owned(),
            driver: driver.to_owned(),
            pool: target.0.map(str::to_owned),
            volume: target.1.map(str::to_owned),
            confinement: Some(confinement),
        }));
    }

    /// Reports progress. An event is dropped when it repeats the previous one, or when less
    /// than 100 ms passed since the previous one of the same phase, except a phase's first and
    /// final (`done == total`) event. Every phase starts with an event whose `done` is 0: one
    /// is sent first when a phase's first report is later than that (a cached measure).
    pub fn progress(&mut self, phase: Phase, done: u64, total: u64, unit: Unit) {
        if !self.started_phases.contains(&phase) {
            self.started_phases.push(phase);
            if done != 0 {
                self.progress(phase, 0, total, unit);
            }
        }
        let now = Instant::now();
        if let Some((at, last_phase, last_done)) = self.last_progress {
            if last_phase == phase
                && (done == last_done || (done < total && now.duration_since(at) < MIN_INTERVAL))
            {
                return;
            }
        }
        self.last_progress = Some((now, phase, done));
        self.emit(&Event::Progress(Progress {
            phase,
            done,
            total,
            unit,
        }));
        self.screen.progress(phase, done, total, unit);
    }

    pub fn warning(&mut self, code: Warning, message: &str) {
        self.log(&format!("warning: {message}"));
        self.emit(&Event::Warning(WarningEvent {
            code,
            message: message.to_owned(),
        }));
    }

    /// The final success event.
    pub fn result(&mut self, result: OpResult) {
        let summary = self
            .screen
            .shows_progress()
            .then(|| summary(&result, self.started));
        self.emit(&Event::Result(Box::new(ResultEvent { ok: true, result })));
        self.finished = true;
        self.screen.finish(summary.as_deref());
    }

    /// The final failure event.
    pub fn error(&mut self, err: &Error) {
        self.log(&format!("error: {}: {}", err.code, err.message));
        self.emit(&Event::Error(ErrorEvent {
            ok: false,
            code: err.code,
            message: err.message.clone(),
            details: err.details.clone(),
        }));
        self.finished = true;
        self.screen.finish(None);
    }
}

/// The one line that ends a request shown with progress: what was done to what, how long it
/// took, and where an image volume was involved, whether it was there already.
fn summary(result: &OpResult, started: Instant) -> String {
    let op = result.op();
    let volume = result
        .volume()
        .map(|v| format!(" {}", v.name))
        .unwrap_or_default();
    let cache = match result.image() {
        Some(super::results::ImageInfo::Image(image)) => match image.cache {
            Some(Cache::Hit) => " (cloned from its image volume)",
            Some(Cache::Miss) => " (image volume built, then cloned)",
            _ => "",
        },
        _ => "",
    };
    format!(
        "{op}{volume}: done in {:.2} s{cache}",
        started.elapsed().as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::results::{self, OpResult};
    use serde_json::Value;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn progress_is_rate_limited_and_nothing_follows_the_end() {
        let buf = Shared::default();
        let mut ev = Events::to_writer(Box::new(buf.clone()));
        for i in 0..1000 {
            ev.progress(Phase::Unpack, i, 1000, Unit::Bytes);
        }
        ev.progress(Phase::Unpack, 1000, 1000, Unit::Bytes);
        ev.result(OpResult::Images(results::ImageVolumes {
            image_volumes: false,
            images: Vec::new(),
        }));
        ev.warning(Warning::Recovered, "dropped");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(lines.len() <= 4, "{lines:?}");
        assert_eq!(lines[lines.len() - 2]["done"], 1000);
        assert_eq!(lines.last().unwrap()["event"], "result");
    }

    #[test]
    fn every_phase_starts_at_zero_and_errors_say_not_ok() {
        let buf = Shared::default();
        let mut ev = Events::to_writer(Box::new(buf.clone()));
        ev.progress(Phase::Measure, 1, 1, Unit::Cached);
        ev.progress(Phase::Unpack, 0, 10, Unit::Bytes);
        ev.progress(Phase::Unpack, 10, 10, Unit::Bytes);
        ev.error(&Error::new(crate::error::Code::NotFound, "gone"));
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let done: Vec<(&str, u64)> = lines
            .iter()
            .filter(|l| l["event"] == "progress")
            .map(|l| (l["phase"].as_str().unwrap(), l["done"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            done,
            [
                ("measure", 0),
                ("measure", 1),
                ("unpack", 0),
                ("unpack", 10)
            ]
        );
        assert_eq!(lines.last().unwrap()["ok"], false);
    }
}
