//! reimage at a terminal: run in a real pseudo-terminal (`script`), with stdout and stderr
//! both on it, the screen it leaves holds every event line whole, no progress line mixed into
//! one, and the summary last; with `--progress always` into a file, plain lines without an
//! escape sequence.

mod common;

use std::process::Command;

use common::{rich_image, Env};
use reimage_fixtures::{Compression, TarFormat};
use serde_json::{json, Value};

/// The screen a terminal shows after `bytes`: carriage returns, erase-line (`ESC [2K`) and
/// newlines applied, other escape sequences dropped.
fn screen(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = Vec::new();
    let mut line: Vec<char> = Vec::new();
    let mut col = 0;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => col = 0,
            '\n' => {
                lines.push(line.iter().collect::<String>());
                line.clear();
                col = 0;
            }
            '\x1b' => {
                // CSI: ESC [ parameters final-byte.
                let mut sequence = String::new();
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        sequence.push(c);
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
                if sequence == "2K" {
                    line.clear();
                }
            }
            c => {
                if col < line.len() {
                    line[col] = c;
                } else {
                    line.push(c);
                }
                col += 1;
            }
        }
    }
    lines.push(line.iter().collect());
    lines
}

#[test]
fn at_a_terminal_events_and_progress_never_garble_each_other() {
    let env = Env::new("terminal");
    let a = rich_image(&env, "a.tar.zst", 1, TarFormat::Posix, Compression::Zstd);
    let b = rich_image(&env, "b.tar.gz", 2, TarFormat::Gnu, Compression::Gzip);
    env.create_from("c1", &a).ok();
    let request = env.dir.join("request.json");
    std::fs::write(
        &request,
        json!({"api": 1, "op": "rebuild", "pool": "default", "volume": "c1",
               "source": {"image": b}, "preserve": ["/etc/hostname"]})
        .to_string(),
    )
    .unwrap();
    let command = format!(
        "{} --config {} dir < {}",
        common::BIN,
        env.config.display(),
        request.display()
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown = screen(&out.stdout);
    let events: Vec<Value> = shown
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("garbled {l:?}: {e}")))
        .collect();
    assert_eq!(
        events.first().map(|e| e["event"].clone()),
        Some(json!("start"))
    );
    assert_eq!(
        events.last().map(|e| e["event"].clone()),
        Some(json!("result"))
    );
    for line in &shown {
        assert!(
            line.starts_with('{') || line.starts_with("reimage: ") || line.is_empty(),
            "a line that is neither an event nor a log line: {line:?}\n{shown:#?}"
        );
    }
    // The summary is the last line, and no progress line is left under it.
    let text: Vec<&String> = shown.iter().filter(|l| !l.is_empty()).collect();
    let last = text.last().map(|l| l.as_str()).unwrap_or("");
    assert!(
        last.starts_with("reimage: rebuild c1: done in "),
        "{shown:#?}"
    );
    // The progress line was drawn (and cleared) along the way.
    assert!(String::from_utf8_lossy(&out.stdout).contains("\r\x1b[2K"));
}

#[test]
fn progress_always_into_a_file_is_plain_lines() {
    let env = Env::new("progress-file");
    let a = rich_image(&env, "a.tar.zst", 1, TarFormat::Posix, Compression::Zstd);
    let r = env.run_with(
        &["--progress", "always", "dir"],
        json!({"api": 1, "op": "create", "pool": "default", "volume": "c1",
               "source": {"image": a}})
        .to_string()
        .as_bytes(),
    );
    r.ok();
    assert!(
        !r.stderr.contains('\x1b') && !r.stderr.contains('\r'),
        "{:?}",
        r.stderr
    );
    assert!(r.stderr.contains("reimage: unpack "), "{}", r.stderr);
    assert!(
        r.stderr
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("reimage: create c1: done in ")),
        "{}",
        r.stderr
    );
    // Without --progress, stderr stays quiet when it is not a terminal.
    let quiet = env.run(&json!({"api": 1, "op": "inspect", "pool": "default", "volume": "c1"}));
    quiet.ok();
    assert!(quiet.stderr.is_empty(), "{}", quiet.stderr);
}
