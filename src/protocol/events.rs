//! The event stream: JSON Lines on stdout for programs, log lines and a progress bar on stderr
//! for people.
//!
//! Contract kept here: every stdout line is one object with an `event` key; nothing follows
//! the final `result` or `error`; progress is rate-limited to about ten events a second.
//! A caller that closes stdout does not stop the operation half-way: write failures are
//! reported once on stderr and the work goes on, so the volume still ends complete.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

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

/// Whether stderr shows a progress bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarMode {
    Auto,
    Always,
    Never,
}

const MIN_INTERVAL: Duration = Duration::from_millis(100);

pub struct Events {
    out: Box<dyn Write + Send>,
    err: Box<dyn Write + Send>,
    bar: bool,
    bar_drawn: bool,
    finished: bool,
    out_failed: bool,
    last_progress: Option<(Instant, Phase, u64)>,
}

impl Events {
    pub fn new(out: Box<dyn Write + Send>, err: Box<dyn Write + Send>, bar: bool) -> Self {
        Events {
            out,
            err,
            bar,
            bar_drawn: false,
            finished: false,
            out_failed: false,
            last_progress: None,
        }
    }

    /// Events for tests and library callers: everything to the given writer, no bar.
    pub fn to_writer(out: Box<dyn Write + Send>) -> Self {
        Events::new(out, Box::new(std::io::sink()), false)
    }

    fn emit(&mut self, value: Value) {
        if self.finished {
            return;
        }
        let mut line = value.to_string();
        line.push('\n');
        if let Err(e) = self
            .out
            .write_all(line.as_bytes())
            .and_then(|_| self.out.flush())
        {
            if !self.out_failed {
                self.out_failed = true;
                self.log(&format!("cannot write events to stdout ({e}); carrying on"));
            }
        }
    }

    fn clear_bar(&mut self) {
        if self.bar_drawn {
            let _ = self.err.write_all(b"\r\x1b[2K");
            self.bar_drawn = false;
        }
    }

    /// A human-readable line on stderr.
    pub fn log(&mut self, message: &str) {
        self.clear_bar();
        let _ = writeln!(self.err, "reimage: {message}");
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
        if self.bar {
            self.draw_bar(phase, done, total, unit);
        }
    }

    fn draw_bar(&mut self, phase: Phase, done: u64, total: u64, unit: &str) {
        const WIDTH: usize = 30;
        let fraction = if total == 0 {
            1.0
        } else {
            (done as f64 / total as f64).min(1.0)
        };
        let filled = (fraction * WIDTH as f64) as usize;
        let amount = if unit == "bytes" {
            format!(
                "{:.1}/{:.1} MiB",
                done as f64 / 1048576.0,
                total as f64 / 1048576.0
            )
        } else {
            format!("{done}/{total} {unit}")
        };
        let _ = write!(
            self.err,
            "\r\x1b[2K{:<8} [{}{}] {:>3}% {amount}",
            phase.as_str(),
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            (fraction * 100.0) as u32
        );
        let _ = self.err.flush();
        self.bar_drawn = true;
    }

    pub fn warning(&mut self, code: Warning, message: &str) {
        self.log(&format!("warning: {message}"));
        self.emit(json!({"event": "warning", "code": code.as_str(), "message": message}));
    }

    /// The final success event; `body` holds the op's fields (`volume`, `image`, ...).
    pub fn result(&mut self, op: &str, body: Map<String, Value>) {
        self.clear_bar();
        let mut v = Map::new();
        v.insert("event".into(), "result".into());
        v.insert("ok".into(), true.into());
        v.insert("op".into(), op.into());
        v.extend(body);
        self.emit(Value::Object(v));
        self.finished = true;
    }

    /// The final failure event.
    pub fn error(&mut self, err: &Error) {
        self.log(&format!("error: {}: {}", err.code, err.message));
        self.emit(json!({
            "event": "error", "code": err.code.as_str(), "message": err.message, "details": err.details
        }));
        self.finished = true;
    }
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
