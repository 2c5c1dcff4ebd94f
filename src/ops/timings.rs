//! Wall time of each phase of a request, for the result's `timings_ms`.

use super::*;

/// Wall time of each phase, for `timings_ms`.
#[derive(Default)]
pub(super) struct Timings {
    pub(super) phases: Map<String, Value>,
    pub(super) started: Option<Instant>,
}

impl Timings {
    pub(super) fn start() -> Self {
        Timings {
            phases: Map::new(),
            started: Some(Instant::now()),
        }
    }

    pub(super) fn time<T>(&mut self, name: &str, step: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = step();
        let ms = t.elapsed().as_millis() as u64;
        let before = self.phases.get(name).and_then(Value::as_u64).unwrap_or(0);
        self.phases.insert(name.to_owned(), (before + ms).into());
        out
    }

    pub(super) fn to_json(&self) -> Value {
        let mut m = self.phases.clone();
        if let Some(s) = self.started {
            m.insert("total".into(), (s.elapsed().as_millis() as u64).into());
        }
        Value::Object(m)
    }
}
