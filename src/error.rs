//! The one error type of the core: a protocol error code, a message that names the cause and
//! the fix, and structured details for programs.

use std::fmt;

use serde_json::{Map, Value};

/// The error codes of protocol v1 (`error.code`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    InvalidRequest,
    ConfigInvalid,
    ConfigInsecure,
    PolicyDenied,
    UnknownPool,
    NotFound,
    AlreadyExists,
    VolumeHasSnapshots,
    VolumeBusy,
    Locked,
    InsufficientSpace,
    QuotaExceeded,
    ImageInvalid,
    ImageUnsupported,
    UnsafeImage,
    RecoveryRequired,
    DriverError,
    Interrupted,
    Internal,
    /// Added to v1: the driver cannot do this at all (e.g. keep snapshots, shrink).
    Unsupported,
    /// Added to v1: other volumes are clones of the volume's snapshots, so it cannot be
    /// destroyed (zfs); `details.clones` names them.
    VolumeHasClones,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidRequest => "invalid_request",
            Code::ConfigInvalid => "config_invalid",
            Code::ConfigInsecure => "config_insecure",
            Code::PolicyDenied => "policy_denied",
            Code::UnknownPool => "unknown_pool",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::VolumeHasSnapshots => "volume_has_snapshots",
            Code::VolumeBusy => "volume_busy",
            Code::Locked => "locked",
            Code::InsufficientSpace => "insufficient_space",
            Code::QuotaExceeded => "quota_exceeded",
            Code::ImageInvalid => "image_invalid",
            Code::ImageUnsupported => "image_unsupported",
            Code::UnsafeImage => "unsafe_image",
            Code::RecoveryRequired => "recovery_required",
            Code::DriverError => "driver_error",
            Code::Interrupted => "interrupted",
            Code::Internal => "internal",
            Code::Unsupported => "unsupported",
            Code::VolumeHasClones => "volume_has_clones",
        }
    }

    /// Exit status 2 means "rejected before anything was looked at on the storage side": the
    /// request, the config or the policy said no. Everything else that fails is 1.
    pub fn exit_status(self) -> u8 {
        match self {
            Code::InvalidRequest
            | Code::ConfigInvalid
            | Code::ConfigInsecure
            | Code::PolicyDenied
            | Code::UnknownPool => 2,
            _ => 1,
        }
    }
}

/// The warning codes (`warning.code`): something the caller should know, that did not stop
/// the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Warning {
    /// `size` cannot be enforced on this pool.
    SizeIgnored,
    /// What an interrupted request left was finished or rolled back first.
    Recovered,
    /// A `preserve` path does not exist in the old volume.
    PreserveMissing,
    /// An xattr the filesystem refused (with `"unsupported_metadata": "warn"`).
    XattrFailed,
    /// A text ACL entry that names a user or group (never resolved) was left out.
    AclSkipped,
    /// A squashfs socket, which belongs to a running program, was not unpacked.
    SocketSkipped,
    /// The request succeeded, but removing leftovers failed; the next request removes them.
    CleanupPending,
    /// `recover`: a volume is locked by a running request and was left alone.
    Locked,
    /// The thin pool's volumes are promised more than it holds.
    Overcommitted,
    /// The pool asks for quotas the filesystem cannot enforce.
    QuotaUnavailable,
    /// Added to v1: the pool keeps image volumes, but this fill unpacked into the volume
    /// (an in-place rebuild, or a refill that keeps snapshots).
    ImageVolumeUnused,
    /// The unpack ran without part of its confinement (a kernel without Landlock, or one
    /// that refused the seccomp filter).
    Unconfined,
}

impl Warning {
    pub fn as_str(self) -> &'static str {
        match self {
            Warning::SizeIgnored => "size_ignored",
            Warning::Recovered => "recovered",
            Warning::PreserveMissing => "preserve_missing",
            Warning::XattrFailed => "xattr_failed",
            Warning::AclSkipped => "acl_skipped",
            Warning::SocketSkipped => "socket_skipped",
            Warning::CleanupPending => "cleanup_pending",
            Warning::Locked => "locked",
            Warning::Overcommitted => "overcommitted",
            Warning::QuotaUnavailable => "quota_unavailable",
            Warning::ImageVolumeUnused => "image_volume_unused",
            Warning::Unconfined => "unconfined",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Error {
    pub code: Code,
    pub message: String,
    pub details: Map<String, Value>,
}

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// Prefixes the message with what was being done, keeping code and details.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(Code::Internal, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// Driver failures keep their meaning (not found, busy, no space, ...); the rest is
/// `driver_error` with the driver's message, which names the command or call that failed.
impl From<reimage_driver::Error> for Error {
    fn from(e: reimage_driver::Error) -> Self {
        use reimage_driver::ErrorKind as K;
        match e.kind {
            K::NotFound => Error::new(Code::NotFound, e.message),
            K::AlreadyExists => Error::new(Code::AlreadyExists, e.message),
            K::Busy { holder } => {
                let err = Error::new(Code::VolumeBusy, e.message);
                match holder {
                    Some(h) => err.with("holder", h),
                    None => err,
                }
            }
            K::HasSnapshots(names) => {
                Error::new(Code::VolumeHasSnapshots, e.message).with("snapshots", names)
            }
            K::HasClones(names) => {
                Error::new(Code::VolumeHasClones, e.message).with("clones", names)
            }
            K::NoSpace => Error::new(Code::InsufficientSpace, e.message),
            K::QuotaExceeded => Error::new(Code::QuotaExceeded, e.message),
            K::Unsupported => Error::new(Code::Unsupported, e.message),
            K::Failed => Error::new(Code::DriverError, e.message),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
