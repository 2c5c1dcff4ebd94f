//! The event stream: JSON Lines on stdout for programs; log lines, progress and a summary on
//! stderr for people (see `screen.rs`).
//!
//! Contract kept here: every stdout line is one object with an `event` key; nothing follows
//! the final `result` or `error`; progress is rate-limited to about ten events a second.
//! A caller that closes stdout does not stop the operation half-way: write failures are
//! reported once on stderr and the work goes on, so the volume still ends complete.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::screen::{Display, Screen};
use crate::error::{Error, Warning};

/// The phases named in `progress` events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Measure,
    Prepare,
    Unpack,
    Preserve,
    Sync,
    Swap,
    Cleanup,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Measure => "measure",
            Phase::Prepare => "prepare",
            Phase::Unpack => "unpack",
            Phase::Preserve => "preserve",
            Phase::Sync => "sync",
            Phase::Swap => "swap",
            Phase::Cleanup => "cleanup",
        }
    }
}

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
        }
    }

    /// Events for tests and library callers: everything to the given writer, no progress.
    pub fn to_writer(out: Box<dyn Write + Send>) -> Self {
        Events::new(out, Box::new(std::io::sink()), Display::Off, false)
    }

    fn emit(&mut self, value: Value) {
        if self.finished {
            return;
        }
        let mut line = value.to_string();
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

    pub fn start(&mut self, op: &str, driver: &str, pool: Option<&str>, volume: Option<&str>) {
        let mut v = json!({"event": "start", "api": 1, "op": op, "driver": driver});
        if let Some(pool) = pool {
            v["pool"] = pool.into();
        }
        if let Some(volume) = volume {
            v["volume"] = volume.into();
        }
        self.emit(v);
    }

    /// Reports progress. An event is dropped when it repeats the previous one, or when less
    /// than 100 ms passed since the previous one of the same phase, except a phase's first and
    /// final (`done == total`) event.
    pub fn progress(&mut self, phase: Phase, done: u64, total: u64, unit: &str) {
        let now = Instant::now();
        if let Some((at, last_phase, last_done)) = self.last_progress {
            if last_phase == phase
                && (done == last_done || (done < total && now.duration_since(at) < MIN_INTERVAL))
            {
                return;
            }
        }
        self.last_progress = Some((now, phase, done));
        self.emit(json!({
            "event": "progress", "phase": phase.as_str(), "done": done, "total": total, "unit": unit
        }));
        self.screen.progress(phase, done, total, unit);
    }

    pub fn warning(&mut self, code: Warning, message: &str) {
        self.log(&format!("warning: {message}"));
        self.emit(json!({"event": "warning", "code": code.as_str(), "message": message}));
    }

    /// The final success event; `body` holds the op's fields (`volume`, `image`, ...).
    pub fn result(&mut self, op: &str, body: Map<String, Value>) {
        let summary = self
            .screen
            .shows_progress()
            .then(|| summary(op, &body, self.started));
        let mut v = Map::new();
        v.insert("event".into(), "result".into());
        v.insert("ok".into(), true.into());
        v.insert("op".into(), op.into());
        v.extend(body);
        self.emit(Value::Object(v));
        self.finished = true;
        self.screen.finish(summary.as_deref());
    }

    /// The final failure event.
    pub fn error(&mut self, err: &Error) {
        self.log(&format!("error: {}: {}", err.code, err.message));
        self.emit(json!({
            "event": "error", "code": err.code.as_str(), "message": err.message, "details": err.details
        }));
        self.finished = true;
        self.screen.finish(None);
    }
}

/// The one line that ends a request shown with progress: what was done to what, how long it
/// took, and where an image volume was involved, whether it was there already.
fn summary(op: &str, body: &Map<String, Value>, started: Instant) -> String {
    let volume = body
        .get("volume")
        .and_then(|v| v.get("name"))
        .and_then(Value::as_str)
        .map(|name| format!(" {name}"))
        .unwrap_or_default();
    let cache = match body
        .get("image")
        .and_then(|i| i.get("cache"))
        .and_then(Value::as_str)
    {
        Some("hit") => " (cloned from its image volume)",
        Some("miss") => " (image volume built, then cloned)",
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
            ev.progress(Phase::Unpack, i, 1000, "bytes");
        }
        ev.progress(Phase::Unpack, 1000, 1000, "bytes");
        ev.result("measure", Map::new());
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
}
