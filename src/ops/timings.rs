//! Wall time of each phase of a request, for the result's `timings_ms`.

use super::*;

/// Wall time of each phase, for `timings_ms`.
#[derive(Default)]
pub(super) struct Timings {
    pub(super) phases: out::TimingsMs,
    pub(super) started: Option<Instant>,
}

impl Timings {
    pub(super) fn start() -> Self {
        Timings {
            phases: out::TimingsMs::default(),
            started: Some(Instant::now()),
        }
    }

    pub(super) fn time<T>(&mut self, name: &str, step: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = step();
        let ms = t.elapsed().as_millis() as u64;
        self.phases.add(name, ms);
        out
    }

    /// Each phase's milliseconds, and `total` since the start.
    pub(super) fn to_ms(&self) -> out::TimingsMs {
        let mut m = self.phases.clone();
        if let Some(s) = self.started {
            m.add("total", s.elapsed().as_millis() as u64);
        }
        m
    }
}
