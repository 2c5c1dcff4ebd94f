//! The command line: `reimage [--config PATH] [--progress auto|always|never] DRIVER`, one
//! JSON request on stdin, events on stdout, the exit status of the contract.

use std::ffi::OsString;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use reimage_driver::records::RecordDir;

use crate::audit;
use crate::config::{Config, DriverKind, DEFAULT_CONFIG};
use crate::error::{Code, Error, Result};
use crate::ops::{self, Ctx};
use crate::protocol::event::Confinement;
use crate::protocol::events::{BarMode, Events};
use crate::protocol::request::{self, MAX_REQUEST_BYTES};
use crate::protocol::results::{ImageInfo, OpResult};
use crate::protocol::screen::Display;
use crate::{drivers, signals};

pub const USAGE: &str =
    "usage: reimage [--config PATH] [--progress auto|always|never] DRIVER < request.json
       reimage [--config PATH] --list-pools
  DRIVER is one of dir, btrfs, zfs, lvm, overlay; the request and events are described in
  docs/protocol.md. --list-pools prints each configured pool as `NAME DRIVER`.";

#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub config: PathBuf,
    pub bar: BarMode,
    pub driver: DriverKind,
}

pub enum Parsed {
    Run(Args),
    /// Print the configured pools (for scripts such as the boot-time recovery).
    ListPools(PathBuf),
    Help,
    Version,
}

fn usage_error(message: impl Into<String>) -> Error {
    Error::new(Code::InvalidRequest, format!("{}\n{USAGE}", message.into())).with("path", "argv")
}

pub fn parse_args(args: &[OsString]) -> Result<Parsed> {
    let mut config = PathBuf::from(DEFAULT_CONFIG);
    let mut bar = BarMode::Auto;
    let mut driver = None;
    let mut list_pools = false;
    let mut it = args.iter().skip(1);
    let mut options_ended = false;
    while let Some(arg) = it.next() {
        let text = arg
            .to_str()
            .ok_or_else(|| usage_error("arguments must be UTF-8"))?;
        if text == "--" && !options_ended {
            options_ended = true;
            continue;
        }
        // After `--` every argument is an operand, even one that starts with `-`.
        if options_ended || !text.starts_with('-') {
            if driver.is_some() {
                return Err(usage_error(format!("unexpected argument {text:?}")));
            }
            driver = Some(DriverKind::parse(text).ok_or_else(|| {
                usage_error(format!(
                    "unknown driver {text:?}; one of dir, btrfs, zfs, lvm, overlay"
                ))
            })?);
            continue;
        }
        let (flag, inline) = match text.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (text, None),
        };
        let mut value = |name: &str| -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .and_then(|v| v.to_str().map(str::to_owned))
                    .ok_or_else(|| usage_error(format!("{name} needs a value"))),
            }
        };
        match flag {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            "--config" => config = PathBuf::from(value("--config")?),
            "--list-pools" => list_pools = true,
            "--progress" => {
                bar = match value("--progress")?.as_str() {
                    "auto" => BarMode::Auto,
                    "always" => BarMode::Always,
                    "never" => BarMode::Never,
                    other => {
                        return Err(usage_error(format!(
                            "--progress {other:?} is not auto, always or never"
                        )))
                    }
                }
            }
            f => return Err(usage_error(format!("unknown option {f}"))),
        }
    }
    if list_pools {
        if driver.is_some() {
            return Err(usage_error("--list-pools takes no DRIVER"));
        }
        return Ok(Parsed::ListPools(config));
    }
    let driver = driver.ok_or_else(|| usage_error("missing DRIVER"))?;
    Ok(Parsed::Run(Args {
        config,
        bar,
        driver,
    }))
}

fn read_request(stdin: &mut dyn Read) -> Result<String> {
    let mut buf = Vec::new();
    stdin
        .take(MAX_REQUEST_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            Error::new(
                Code::InvalidRequest,
                format!("cannot read the request from stdin: {e}"),
            )
            .with("path", ".")
        })?;
    String::from_utf8(buf)
        .map_err(|_| Error::new(Code::InvalidRequest, "the request is not UTF-8").with("path", "."))
}

fn execute(
    args: &Args,
    stdin: &mut dyn Read,
    events: &mut Events,
    audit: &mut Audit,
) -> Result<OpResult> {
    let config = Config::load(&args.config)?;
    audit.socket = config.audit_socket.clone();
    reimage_driver::command::set_timeout(config.command_timeout);
    let op = request::parse(&read_request(stdin)?)?;
    audit.record.op = Some(op.name().to_owned());
    audit.record.pool = op.pool().map(str::to_owned);
    audit.record.volume = op.volume().map(|v| v.as_str().to_owned());
    if let Some(request::Source::Image { path, .. }) = op.source() {
        audit.record.image = Some(path.clone());
    }
    let pool = match op.pool() {
        Some(name) => Some(config.pool_for(name, args.driver)?),
        None => None,
    };
    // Policy before any storage is looked at: an image outside images.allow is refused
    // here, whatever the op; the file opened here is the one the operation reads.
    let image = match op.source() {
        Some(request::Source::Image { path, .. }) => Some(config.open_image(path)?),
        _ => None,
    };
    let offered = crate::confine::available();
    events.start(
        op.name(),
        args.driver.as_str(),
        (op.pool(), op.volume().map(|v| v.as_str())),
        Confinement {
            seccomp: offered.seccomp,
            landlock_abi: offered.landlock,
        },
    );
    // The state directory, opened once: every record below it is reached from here.
    let state = RecordDir::open(&config.state_dir).map_err(|e| {
        Error::internal(format!(
            "cannot open the state directory {}: {e}",
            config.state_dir.display()
        ))
    })?;
    let driver = pool.map(|p| drivers::open(p, &state)).transpose()?;
    let ctx = Ctx {
        config: &config,
        state: &state,
        pool,
        driver: driver.as_deref(),
        events,
        image: image.as_ref(),
    };
    let result = ops::run(ctx, &op)?;
    audit.record.sha256 = match result.image() {
        Some(ImageInfo::Image(image)) => Some(image.sha256.clone()),
        _ => None,
    };
    Ok(result)
}

/// `--list-pools`: one `NAME DRIVER` line per configured pool, sorted by name; a config that
/// cannot be used is the usual error, on stderr, with its exit status.
fn list_pools(config: &std::path::Path) -> u8 {
    match Config::load(config) {
        Ok(config) => {
            for (name, pool) in &config.pools {
                println!("{name} {}", pool.driver().as_str());
            }
            0
        }
        Err(e) => {
            eprintln!("reimage: error: {}: {}", e.code.as_str(), e.message);
            e.code.exit_status()
        }
    }
}

/// What `--version` prints.
fn version() -> String {
    format!(
        "reimage {} (protocol api {}){}",
        env!("CARGO_PKG_VERSION"),
        request::API_VERSION,
        if crate::fault::ENABLED {
            " with fault injection"
        } else {
            ""
        }
    )
}

/// What `main` does first, before privileges are given up: `--help`, `--version` and
/// `--list-pools` are answered here (no privilege is given up for them, no warning), and a
/// request's driver has its kernel modules loaded while reimage may still load them.
pub enum Start {
    /// Answered; the process exits with this status.
    Done(u8),
    /// A request to run once privileges are given up, with what loading modules logged.
    Request(Result<Parsed>, Vec<String>),
}

/// Parses the command line and does what must happen before [`crate::privilege::reduce`].
pub fn start(args: &[OsString]) -> Start {
    let parsed = parse_args(args);
    match parsed {
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            Start::Done(0)
        }
        Ok(Parsed::Version) => {
            println!("{}", version());
            Start::Done(0)
        }
        Ok(Parsed::ListPools(config)) => Start::Done(list_pools(&config)),
        Ok(Parsed::Run(a)) => {
            let notes = crate::privilege::load_modules(a.driver);
            Start::Request(Ok(Parsed::Run(a)), notes)
        }
        Err(e) => Start::Request(Err(e), Vec::new()),
    }
}

/// Runs one request, its privileges already given up (`reduced`); returns the process exit
/// status.
pub fn run(
    parsed: Result<Parsed>,
    mut hardening: Vec<String>,
    reduced: crate::privilege::Reduced,
    stdin: &mut dyn Read,
) -> u8 {
    hardening.extend(reduced.notes);
    signals::install();
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let stderr_tty = std::io::stderr().is_terminal();
    let display = match &parsed {
        Ok(Parsed::Run(a)) => match (a.bar, stderr_tty) {
            (BarMode::Never, _) | (BarMode::Auto, false) => Display::Off,
            (BarMode::Always | BarMode::Auto, true) => Display::Terminal,
            // Into a file: plain lines, never an escape sequence.
            (BarMode::Always, false) => Display::Lines,
        },
        _ => Display::Off,
    };
    let mut events = Events::new(
        Box::new(std::io::stdout()),
        Box::new(std::io::stderr()),
        display,
        std::io::stdout().is_terminal(),
    );
    for note in &hardening {
        events.log(&format!("warning: {note}"));
    }
    let mut audit = Audit {
        record: audit::Record::start(),
        socket: Some(PathBuf::from(audit::DEFAULT_SOCKET)),
    };
    let outcome = match parsed {
        Ok(Parsed::Run(args)) => {
            audit.record.driver = Some(args.driver.as_str().to_owned());
            execute(&args, stdin, &mut events, &mut audit)
        }
        Ok(Parsed::Help | Parsed::Version | Parsed::ListPools(_)) => return 0,
        Err(e) => Err(e),
    };
    let (status, code) = match outcome {
        Ok(result) => {
            events.result(result);
            (0, "ok")
        }
        Err(e) => {
            events.error(&e);
            (e.code.exit_status(), e.code.as_str())
        }
    };
    audit.send(code, &mut events);
    status
}

/// The audit record of this request and where it goes (`None`: nowhere, as configured).
struct Audit {
    record: audit::Record,
    socket: Option<PathBuf>,
}

impl Audit {
    fn send(&self, outcome: &str, events: &mut Events) {
        if let Some(socket) = &self.socket {
            if let Some(problem) = audit::deliver(socket, &self.record.line(outcome)) {
                events.log(&format!("warning: {problem}"));
            }
        }
    }
}
