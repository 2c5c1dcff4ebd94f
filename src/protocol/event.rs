//! One line of the event stream on stdout, as a type. schema/events.json is generated from
//! [`Event`]; `events.rs` writes them.

use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value};

use super::results::OpResult;
use crate::error::{Code, Warning};

/// A line on stdout: `start` first, then `progress` and `warning`, and `result` or `error`
/// last.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start(Start),
    Progress(Progress),
    Warning(WarningEvent),
    Result(Box<ResultEvent>),
    Error(ErrorEvent),
}

/// The request was read: which op, on which driver, pool and volume.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Start {
    /// The protocol version the request asked for.
    pub api: u64,
    pub op: String,
    pub driver: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// How the threads that unpack an image are confined on this kernel (SECURITY.md).
    /// Always sent; optional in the schema, as a field added to api 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confinement: Option<Confinement>,
}

/// The confinement the unpack threads install on themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Confinement {
    /// A seccomp allow-list of system calls.
    pub seccomp: bool,
    /// The Landlock ABI the file-access ruleset is enforced with; `null` where the kernel
    /// has no Landlock (the unpack then warns `unconfined`).
    pub landlock_abi: Option<u32>,
}

/// How far a phase is. Every phase reports `done` 0 first and `done == total` last.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Progress {
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
    pub unit: Unit,
}

/// The phases of a request, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
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

/// What `done` and `total` count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Bytes of unpacked content.
    Bytes,
    /// Bytes of the image file read (an unpack that measures as it goes).
    ImageBytes,
    /// `preserve` paths copied.
    Paths,
    /// Steps of a phase that has no natural measure.
    Steps,
    /// The measurement came from the measure cache.
    Cached,
}

/// Something the caller should know that did not stop the request.
#[derive(Debug, Serialize, JsonSchema)]
pub struct WarningEvent {
    pub code: Warning,
    pub message: String,
}

/// The request succeeded; the op's fields follow `op`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ResultEvent {
    /// Always `true`.
    #[schemars(extend("const" = true))]
    pub ok: bool,
    #[serde(flatten)]
    pub result: OpResult,
}

/// The request failed; see `code` for what changed (docs/protocol.md).
#[derive(Debug, Serialize, JsonSchema)]
pub struct ErrorEvent {
    /// Always `false`.
    #[schemars(extend("const" = false))]
    pub ok: bool,
    pub code: Code,
    /// The cause and the fix, for people.
    pub message: String,
    /// Structured facts for programs, by code (e.g. `path` for `invalid_request`, `line` and
    /// `column` for `config_invalid`, `holder` for `volume_busy`).
    pub details: Map<String, Value>,
}
