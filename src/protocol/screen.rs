//! What people see on stderr: log lines, and with `--progress` a progress display and a
//! one-line summary at the end.
//!
//! On a terminal the display is one line redrawn in place: a bar for the phases counted in
//! bytes, a spinner with the elapsed time for the others (kept turning by a ticker thread while
//! a step runs). It is cleared before any other line is written to the terminal (a log line
//! here, or, when stdout is the same terminal, an event line) and drawn again after, so the
//! two never garble each other. Into a file (`--progress always` with stderr redirected) it is
//! plain lines, at most one a second per phase, never an escape sequence.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::event::{Phase, Unit};

const SPINNER: [char; 4] = ['-', '\\', '|', '/'];
const TICK: Duration = Duration::from_millis(100);
const PLAIN_INTERVAL: Duration = Duration::from_secs(1);
const WIDTH: usize = 30;

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Display {
    /// Log lines only.
    Off,
    /// A line redrawn in place (stderr is a terminal).
    Terminal,
    /// Plain progress lines (stderr is not a terminal, `--progress always`).
    Lines,
}

struct Shown {
    phase: Phase,
    done: u64,
    total: u64,
    unit: Unit,
    since: Instant,
}

struct State {
    err: Box<dyn Write + Send>,
    display: Display,
    /// The progress line is on the screen.
    drawn: bool,
    current: Option<Shown>,
    frame: usize,
    last_line: Option<(Phase, Instant)>,
}

pub struct Screen {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Screen {
    pub fn new(err: Box<dyn Write + Send>, display: Display) -> Screen {
        let state = Arc::new(Mutex::new(State {
            err,
            display,
            drawn: false,
            current: None,
            frame: 0,
            last_line: None,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = (display == Display::Terminal).then(|| {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    let mut s = lock(&state);
                    if s.drawn && s.current.as_ref().is_some_and(|c| !counts_bytes(c.unit)) {
                        s.frame += 1;
                        s.draw();
                    }
                }
            })
        });
        Screen {
            state,
            stop,
            ticker,
        }
    }

    /// Progress is shown at all.
    pub fn shows_progress(&self) -> bool {
        lock(&self.state).display != Display::Off
    }

    /// A line for people (the progress line is cleared first and drawn again after).
    pub fn line(&self, text: &str) {
        let mut s = lock(&self.state);
        s.clear();
        let _ = writeln!(s.err, "reimage: {text}");
        s.draw();
    }

    /// Runs `write` (output to the same terminal) with the progress line cleared.
    pub fn around(&self, write: impl FnOnce()) {
        let mut s = lock(&self.state);
        s.clear();
        write();
        s.draw();
    }

    pub fn progress(&self, phase: Phase, done: u64, total: u64, unit: Unit) {
        let mut s = lock(&self.state);
        let since = match &s.current {
            Some(c) if c.phase == phase => c.since,
            _ => Instant::now(),
        };
        s.current = Some(Shown {
            phase,
            done,
            total,
            unit,
            since,
        });
        match s.display {
            Display::Off => {}
            Display::Terminal => s.draw(),
            Display::Lines => s.plain_line(),
        }
    }

    /// The end: the progress line is removed for good and `summary`, if any, printed.
    pub fn finish(&mut self, summary: Option<&str>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
        let mut s = lock(&self.state);
        s.clear();
        s.current = None;
        if let (Some(summary), true) = (summary, s.display != Display::Off) {
            let _ = writeln!(s.err, "reimage: {summary}");
        }
        let _ = s.err.flush();
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn counts_bytes(unit: Unit) -> bool {
    matches!(unit, Unit::Bytes | Unit::ImageBytes)
}

impl State {
    fn clear(&mut self) {
        if self.drawn {
            let _ = self.err.write_all(b"\r\x1b[2K");
            let _ = self.err.flush();
            self.drawn = false;
        }
    }

    /// Draws the progress line in place (a terminal only).
    fn draw(&mut self) {
        if self.display != Display::Terminal {
            return;
        }
        let Some(text) = self.current.as_ref().map(|c| describe(c, self.frame)) else {
            return;
        };
        let _ = write!(self.err, "\r\x1b[2K{text}");
        let _ = self.err.flush();
        self.drawn = true;
    }

    /// A plain progress line, at most one a second per phase (and each phase's first and
    /// last).
    fn plain_line(&mut self) {
        let Some(c) = &self.current else { return };
        let now = Instant::now();
        let last = c.total > 0 && c.done >= c.total;
        let due = match self.last_line {
            Some((phase, at)) => {
                phase != c.phase || last || now.duration_since(at) >= PLAIN_INTERVAL
            }
            None => true,
        };
        if !due {
            return;
        }
        let text = describe(c, 0);
        self.last_line = Some((c.phase, now));
        let _ = writeln!(self.err, "reimage: {}", text.trim_end());
    }
}

/// The progress line: a bar for byte counts, a spinner for steps; the phase's elapsed time.
fn describe(c: &Shown, frame: usize) -> String {
    let elapsed = c.since.elapsed().as_secs_f64();
    if counts_bytes(c.unit) {
        let fraction = if c.total == 0 {
            1.0
        } else {
            (c.done as f64 / c.total as f64).min(1.0)
        };
        let filled = (fraction * WIDTH as f64) as usize;
        let of = if c.unit == Unit::ImageBytes {
            " of the image"
        } else {
            ""
        };
        format!(
            "{:<8} [{}{}] {:>3}% {:.1}/{:.1} MiB{of} {elapsed:.1} s",
            c.phase.as_str(),
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            (fraction * 100.0) as u32,
            c.done as f64 / 1048576.0,
            c.total as f64 / 1048576.0,
        )
    } else {
        let spinner = if c.total > 0 && c.done >= c.total {
            ' '
        } else {
            SPINNER[frame % SPINNER.len()]
        };
        format!("{:<8} {spinner} {elapsed:.1} s", c.phase.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            lock_buf(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    fn lock_buf(b: &Mutex<Vec<u8>>) -> MutexGuard<'_, Vec<u8>> {
        b.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[test]
    fn lines_into_a_file_carry_no_escape_sequences() {
        let buf = Shared::default();
        let mut screen = Screen::new(Box::new(buf.clone()), Display::Lines);
        for done in 0..=100 {
            screen.progress(Phase::Unpack, done, 100, Unit::Bytes);
        }
        screen.progress(Phase::Sync, 0, 1, Unit::Steps);
        screen.line("warning: something");
        screen.finish(Some("rebuild c1: done"));
        let text = String::from_utf8(lock_buf(&buf.0).clone()).unwrap_or_default();
        assert!(!text.contains('\x1b') && !text.contains('\r'), "{text:?}");
        let lines: Vec<&str> = text.lines().collect();
        // The first and the last of the unpack, the sync, the warning, the summary.
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert!(lines[1].contains("100%"), "{lines:?}");
        assert_eq!(lines[4], "reimage: rebuild c1: done");
    }

    #[test]
    fn the_progress_line_is_cleared_before_other_output_and_drawn_again() {
        let buf = Shared::default();
        let mut screen = Screen::new(Box::new(buf.clone()), Display::Terminal);
        screen.progress(Phase::Unpack, 50, 100, Unit::Bytes);
        screen.around(|| lock_buf(&buf.0).extend_from_slice(b"{\"event\":\"x\"}\n"));
        screen.finish(None);
        let text = String::from_utf8(lock_buf(&buf.0).clone()).unwrap_or_default();
        // The event line starts on a cleared line and the bar comes back after it.
        let event = text.find("{\"event\"").unwrap_or(0);
        assert!(text[..event].ends_with("\r\x1b[2K"), "{text:?}");
        assert!(text[event..].contains("unpack"), "{text:?}");
        assert!(text.ends_with("\r\x1b[2K"), "{text:?}");
    }
}
