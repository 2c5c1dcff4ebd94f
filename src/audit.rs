//! The audit record: one syslog line per request (facility authpriv), saying who asked for
//! what and how it ended. Under sudo the system log otherwise shows only `reimage dir`.
//!
//! The record is sent as one datagram to the syslog socket (`/dev/log`, where journald or
//! rsyslog listens) when the request ends, whatever the outcome. Sending never fails the
//! request: with no one listening the record is lost, and stderr says so.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where syslog listens unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/dev/log";

/// syslog facility `authpriv` (10), as the high bits of the priority.
const AUTHPRIV: u8 = 10 << 3;
const INFO: u8 = 6;
const WARNING: u8 = 4;

/// What one request was, filled in as it becomes known.
#[derive(Debug)]
pub struct Record {
    started: Instant,
    pub driver: Option<String>,
    pub op: Option<String>,
    pub pool: Option<String>,
    pub volume: Option<String>,
    pub image: Option<PathBuf>,
    /// The SHA-256 of the image file, once the request has read it.
    pub sha256: Option<String>,
}

impl Record {
    pub fn start() -> Record {
        Record {
            started: Instant::now(),
            driver: None,
            op: None,
            pool: None,
            volume: None,
            image: None,
            sha256: None,
        }
    }

    /// The syslog line for this request with `outcome` (`ok` or the error code): the caller
    /// (real uid, and the user sudo ran it for), what was asked, how it ended, how long it
    /// took.
    pub fn line(&self, outcome: &str) -> String {
        let priority = AUTHPRIV | if outcome == "ok" { INFO } else { WARNING };
        let uid = rustix::process::getuid().as_raw();
        let mut fields = vec![format!("uid={uid}")];
        for var in ["SUDO_USER", "SUDO_UID"] {
            if let Some(value) = std::env::var_os(var) {
                fields.push(format!(
                    "{}={}",
                    var.to_ascii_lowercase(),
                    quoted(&value.to_string_lossy())
                ));
            }
        }
        let known = [
            ("driver", self.driver.clone()),
            ("op", self.op.clone()),
            ("pool", self.pool.clone()),
            ("volume", self.volume.clone()),
            (
                "image",
                self.image.as_ref().map(|p| p.display().to_string()),
            ),
            ("sha256", self.sha256.clone()),
        ];
        for (key, value) in known {
            if let Some(value) = value {
                fields.push(format!("{key}={}", quoted(&value)));
            }
        }
        fields.push(format!("outcome={}", quoted(outcome)));
        fields.push(format!(
            "duration_ms={}",
            self.started.elapsed().as_millis()
        ));
        format!(
            "<{priority}>reimage[{}]: {}",
            std::process::id(),
            fields.join(" ")
        )
    }
}

/// A value as it goes into the line: bare if it is plain, else in double quotes with `"`
/// and `\` escaped; control characters (a hostile name cannot forge a second record or
/// field) as `\xHH`.
fn quoted(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:@,".contains(c));
    if plain {
        return value.to_owned();
    }
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Sends `line` to the syslog socket at `socket`. No syslog listening (no socket, nobody
/// at it) is not a problem; anything else is returned, for stderr.
pub fn deliver(socket: &Path, line: &str) -> Option<String> {
    let sent = UnixDatagram::unbound().and_then(|s| s.send_to(line.as_bytes(), socket));
    match sent {
        Ok(_) => None,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            None
        }
        Err(e) => Some(format!(
            "the audit record could not be sent to {}: {e}",
            socket.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_cannot_forge_fields_or_lines() {
        assert_eq!(quoted("c1"), "c1");
        assert_eq!(quoted("/var/lib/images/a.tar"), "/var/lib/images/a.tar");
        assert_eq!(quoted("a b"), "\"a b\"");
        assert_eq!(quoted("x\nuid=0"), "\"x\\x0auid=0\"");
        assert_eq!(quoted("q\"=\\"), "\"q\\\"=\\\\\"");
        assert_eq!(quoted(""), "\"\"");
    }

    #[test]
    fn the_line_has_priority_tag_and_fields() {
        let mut record = Record::start();
        record.op = Some("rebuild".into());
        record.volume = Some("c1".into());
        let line = record.line("quota_exceeded");
        assert!(line.starts_with("<84>reimage["), "{line}");
        assert!(line.contains(" op=rebuild volume=c1 outcome=quota_exceeded duration_ms="));
        assert!(Record::start().line("ok").starts_with("<86>"));
    }
}
