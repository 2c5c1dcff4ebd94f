//! The client examples (`examples/python`, `examples/go`) against the dir driver: each runs
//! reimage, writes the request, reads the events, and maps the outcome to its exit status
//! (0 done, 1 failed, 2 refused with nothing changed).

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{rich_image, Env};
use reimage_fixtures::{Compression, TarFormat};
use serde_json::{json, Value};

/// Runs a client command with `request` on stdin; returns its status and the last line of
/// its stdout (the final event, as JSON).
fn client(mut cmd: Command, request: &Value) -> (i32, Value) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("null");
    let event = serde_json::from_str(last).unwrap_or(Value::Null);
    let status = out.status.code().unwrap_or(-1);
    eprintln!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    (status, event)
}

fn check(env: &Env, make: impl Fn() -> Command) {
    let image = rich_image(env, "a.tar.gz", 1, TarFormat::Gnu, Compression::Gzip);
    let req = |op: &str, volume: &str, extra: Value| {
        let mut v = json!({"api": 1, "op": op, "pool": "default", "volume": volume});
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            v.extend(extra.clone());
        }
        v
    };
    let (status, event) = client(
        make(),
        &req("create", "c1", json!({"source": {"image": image}})),
    );
    assert_eq!((status, &event["event"]), (0, &json!("result")), "{event}");
    assert_eq!(event["volume"]["name"], "c1");
    // Failed: the volume does not exist.
    let (status, event) = client(make(), &req("delete", "nope", json!({})));
    assert_eq!(
        (status, &event["code"]),
        (1, &json!("not_found")),
        "{event}"
    );
    // Refused before anything was looked at.
    let mut unknown = req("inspect", "c1", json!({}));
    unknown["pool"] = json!("no-such-pool");
    let (status, event) = client(make(), &unknown);
    assert_eq!(
        (status, &event["code"]),
        (2, &json!("unknown_pool")),
        "{event}"
    );
    assert!(env.exists("c1"));
}

fn examples() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
}

#[test]
fn the_python_client_maps_outcomes_to_its_exit_status() {
    let env = Env::new("client-python");
    check(&env, || {
        let mut cmd = Command::new("python3");
        cmd.arg(examples().join("python/reimage_client.py"))
            .args(["--reimage", common::BIN, "--config"])
            .arg(&env.config)
            .arg("dir");
        cmd
    });
}

#[test]
fn the_go_client_maps_outcomes_to_its_exit_status() {
    let env = Env::new("client-go");
    // Built once into the env (`go run` would rebuild on every request).
    let bin = env.dir.join("reimage-client");
    let built = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(examples().join("go"))
        .env("GOCACHE", env.dir.join("go-cache"))
        .env("GOPATH", env.dir.join("go-path"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local")
        .status()
        .expect("go is installed by scripts/setup (Debian's golang-go)");
    assert!(built.success());
    check(&env, || {
        let mut cmd = Command::new(&bin);
        cmd.args(["-reimage", common::BIN, "-config"])
            .arg(&env.config)
            .arg("dir");
        cmd
    });
}
