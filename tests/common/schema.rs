//! Every end-to-end run is checked against the committed contract: each event line against
//! schema/events.json, the stream's order rules, and each request that succeeded against
//! schema/request.json.

use std::sync::OnceLock;

use serde_json::Value;

const EVENTS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/schema/events.json"));
const REQUEST: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/schema/request.json"));

fn validator(
    cell: &'static OnceLock<jsonschema::Validator>,
    text: &str,
) -> &'static jsonschema::Validator {
    cell.get_or_init(|| {
        let schema: Value = serde_json::from_str(text).expect("a committed schema is JSON");
        jsonschema::validator_for(&schema).expect("a committed schema compiles")
    })
}

/// Fails the test when an event does not match the schema, or the stream breaks its rules:
/// nothing after `result` or `error`, and every phase that reports its end (`done == total`)
/// reported its start (`done` 0) before.
pub fn check_events(events: &[Value]) {
    static CELL: OnceLock<jsonschema::Validator> = OnceLock::new();
    let events_schema = validator(&CELL, EVENTS);
    let mut started: Vec<&str> = Vec::new();
    for (i, event) in events.iter().enumerate() {
        if let Err(e) = events_schema.validate(event) {
            panic!("event {i} does not match schema/events.json: {e}\n{event}");
        }
        match event["event"].as_str() {
            Some("result" | "error") => {
                assert_eq!(
                    i + 1,
                    events.len(),
                    "events after the final one: {events:?}"
                )
            }
            Some("progress") => {
                let phase = event["phase"].as_str().unwrap_or_default();
                if event["done"] == 0 {
                    started.push(phase);
                } else if event["done"] == event["total"] {
                    assert!(
                        started.contains(&phase),
                        "phase {phase} ended without a start event: {events:?}"
                    );
                }
            }
            _ => {}
        }
    }
}

/// Fails the test when a request reimage accepted does not match schema/request.json.
pub fn check_request(request: &Value) {
    static CELL: OnceLock<jsonschema::Validator> = OnceLock::new();
    if let Err(e) = validator(&CELL, REQUEST).validate(request) {
        panic!("an accepted request does not match schema/request.json: {e}\n{request}");
    }
}
