//! Bad input of every kind gets its error code and exit status, and changes nothing: the
//! pool and the journal are the same before and after, and a sentinel outside the pool is
//! untouched.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{rich_image, Env, Run};
use reimage_fixtures::rawtar::{Header, RawTar};
use reimage_fixtures::{Compression, TarFormat};
use serde_json::{json, Value};

/// An env with one volume `c1` holding a real image, to show that nothing touches it.
fn populated(name: &str) -> Env {
    let env = Env::new(name);
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    env.create_from("c1", &a).ok();
    env
}

fn rejected(env: &Env, run: &Run, code: &str, status: i32) -> Value {
    let e = run.failed(code, status).clone();
    assert!(!e["message"].as_str().unwrap().is_empty());
    assert!(env.leftovers().is_empty(), "{code}: temporary volumes left");
    e
}

#[test]
fn malformed_requests_are_rejected_with_the_json_path() {
    let env = populated("malformed");
    let before = env.snapshot();
    let cases: &[(&str, &str)] = &[
        ("", "."),
        ("{", "."),
        ("[]", "."),
        ("null", "."),
        (
            "{\"api\":1,\"op\":\"inspect\",\"pool\":\"default\",\"volume\":\"c1\"} {}",
            ".",
        ),
        (r#"{"op":"inspect","pool":"default","volume":"c1"}"#, "api"),
        (
            r#"{"api":"1","op":"inspect","pool":"default","volume":"c1"}"#,
            "api",
        ),
        (r#"{"api":1,"op":7,"pool":"default","volume":"c1"}"#, "op"),
        (
            r#"{"api":1,"op":"inspect","pool":"default","volume":"c1","extra":true}"#,
            "extra",
        ),
        (
            r#"{"api":1,"op":"rebuild","pool":"default","volume":"c1","source":{"image":"/x","bogus":1}}"#,
            "source.bogus",
        ),
        (
            r#"{"api":1,"op":"rebuild","pool":"default","volume":"c1","source":{"empty":true},"size":[1]}"#,
            "size",
        ),
        (
            r#"{"api":1,"op":"rebuild","pool":"default","volume":"c1","source":{"empty":true},"snapshots":"maybe"}"#,
            "snapshots",
        ),
        (
            r#"{"api":1,"op":"rebuild","pool":"default","volume":"c1","source":{"empty":true},"idmap":[{"host":-1,"container":0,"count":1}]}"#,
            "idmap[0].host",
        ),
        (
            r#"{"api":1,"op":"rebuild","pool":"default","volume":"c1","source":{"empty":true},"dry_run":"yes"}"#,
            "dry_run",
        ),
        (
            r#"{"api":1,"op":"resize","pool":"default","volume":"c1"}"#,
            ".",
        ),
        (
            r#"{"api":1,"op":"prune","pool":"default","older_than":-1}"#,
            "older_than",
        ),
        (
            r#"{"api":1,"op":"prune","pool":"default","volume":"c1"}"#,
            "volume",
        ),
        (
            r#"{"api":1,"op":"images","pool":"default","dry_run":true}"#,
            "dry_run",
        ),
        (
            r#"{"api":1,"op":"inspect","pool":"default","volume":"c1","volume":"c2"}"#,
            "volume",
        ),
    ];
    for (text, path) in cases {
        let run = env.run_with(&["dir"], text.as_bytes());
        let e = rejected(&env, &run, "invalid_request", 2);
        assert_eq!(e["details"]["path"], *path, "{text}: {e}");
        // A rejected request prints its error and nothing before it.
        assert_eq!(run.events.len(), 1, "{text}");
    }
    assert_eq!(before, env.snapshot());
}

#[test]
fn hostile_volume_names_are_rejected() {
    let env = populated("names");
    let before = env.snapshot();
    let long = "a".repeat(300);
    for name in [
        "-o",
        "../x",
        "a/b",
        "a@b",
        "",
        &long,
        ".reimage-new.c1",
        "c1\n",
        "c 1",
        "..",
        ".",
    ] {
        for op in ["create", "rebuild", "delete", "inspect"] {
            let run = env.run(
                &json!({"api":1,"op":op,"pool":"default","volume":name,"source":{"empty":true}}),
            );
            let run = if op == "delete" || op == "inspect" {
                env.run(&json!({"api":1,"op":op,"pool":"default","volume":name}))
            } else {
                run
            };
            let e = rejected(&env, &run, "invalid_request", 2);
            assert_eq!(e["details"]["path"], "volume", "{op} {name:?}");
        }
    }
    assert_eq!(before, env.snapshot());
}

#[test]
fn images_outside_the_allow_list_are_refused() {
    let env = populated("policy");
    let before = env.snapshot();
    let outside_dir = env.dir.join("outside");
    std::fs::create_dir_all(&outside_dir).unwrap();
    let outside = outside_dir.join("o.tar");
    std::fs::rename(
        rich_image(&env, "o.tar", 3, TarFormat::Gnu, Compression::None),
        &outside,
    )
    .unwrap();
    let link = env.image("link.tar");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let dir_link = env.images.join("sub");
    std::os::unix::fs::symlink(&outside_dir, &dir_link).unwrap();
    let dotdot = env.images.join("../outside/o.tar");
    for image in [
        outside.clone(),
        link,
        dir_link.join("o.tar"),
        dotdot,
        "/etc/passwd".into(),
    ] {
        for op in ["measure", "rebuild", "create"] {
            let run = env.run(
                &json!({"api":1,"op":op,"pool":"default","volume":"c9","source":{"image": image}}),
            );
            let run = if op == "measure" {
                env.run(&json!({"api":1,"op":op,"source":{"image": image}}))
            } else {
                run
            };
            rejected(&env, &run, "policy_denied", 2);
        }
    }
    assert_eq!(before, env.snapshot());
}

#[test]
fn insecure_configs_are_refused() {
    let env = populated("insecure");
    let before = env.snapshot();
    let inspect = json!({"api":1,"op":"inspect","pool":"default","volume":"c1"});
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o666)).unwrap();
    rejected(&env, &env.run(&inspect), "config_insecure", 2);
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&env.config, Some(1000), None).unwrap();
    rejected(&env, &env.run(&inspect), "config_insecure", 2);
    std::os::unix::fs::chown(&env.config, Some(0), None).unwrap();
    std::fs::set_permissions(&env.conf_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = rejected(&env, &env.run(&inspect), "config_insecure", 2);
    assert_eq!(e["details"]["path"], env.conf_dir.display().to_string());
    std::fs::set_permissions(&env.conf_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.run(&inspect).ok();
    assert_eq!(before, env.snapshot());
}

#[test]
fn bad_configs_pools_and_drivers_are_refused() {
    let env = populated("config");
    let before = env.snapshot();
    let inspect = json!({"api":1,"op":"inspect","pool":"default","volume":"c1"}).to_string();
    // The pool is a dir pool; another driver in argv is a policy violation.
    for driver in ["btrfs", "zfs", "lvm"] {
        rejected(
            &env,
            &env.run_with(&[driver], inspect.as_bytes()),
            "policy_denied",
            2,
        );
    }
    let other_pool = json!({"api":1,"op":"inspect","pool":"nope","volume":"c1"}).to_string();
    rejected(
        &env,
        &env.run_with(&["dir"], other_pool.as_bytes()),
        "unknown_pool",
        2,
    );
    for args in [
        &[][..],
        &["ext4"][..],
        &["dir", "extra"][..],
        &["--bogus", "dir"][..],
        &["--progress", "loud", "dir"][..],
    ] {
        rejected(
            &env,
            &env.run_with(args, inspect.as_bytes()),
            "invalid_request",
            2,
        );
    }
    env.write_config("state_dir = 5\n");
    rejected(
        &env,
        &env.run_with(&["dir"], inspect.as_bytes()),
        "config_invalid",
        2,
    );
    let config = format!("{}unknown_key = 1\n", env.default_config());
    env.write_config(&config);
    let e = rejected(
        &env,
        &env.run_with(&["dir"], inspect.as_bytes()),
        "config_invalid",
        2,
    );
    // Where the mistake is, for programs and people.
    assert_eq!(e["details"]["line"], config.lines().count(), "{e}");
    assert_eq!(e["details"]["column"], 1, "{e}");
    assert!(e["details"]["path"].is_string(), "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("unknown_key"),
        "{e}"
    );
    std::fs::remove_file(&env.config).unwrap();
    rejected(
        &env,
        &env.run_with(&["dir"], inspect.as_bytes()),
        "config_invalid",
        2,
    );
    env.write_config(&env.default_config());
    // `--` ends the options: what follows is the driver, as for any command.
    env.run_with(&["--", "dir"], inspect.as_bytes()).ok();
    rejected(
        &env,
        &env.run_with(&["--", "--bogus"], inspect.as_bytes()),
        "invalid_request",
        2,
    );
    assert_eq!(before, env.snapshot());
}

/// The schema the suite checks every run against does refuse what the contract rules out.
#[test]
fn the_event_schema_refuses_what_the_contract_rules_out() {
    let refused = |events: Vec<Value>| {
        std::panic::catch_unwind(|| common::schema::check_events(&events)).is_err()
    };
    let start = json!({"event": "start", "api": 1, "op": "inspect", "driver": "dir"});
    assert!(!refused(vec![start.clone()]));
    // A result without the op's fields; an error without `ok: false`; an unknown code.
    assert!(refused(vec![
        json!({"event": "result", "ok": true, "op": "inspect"})
    ]));
    assert!(refused(vec![
        json!({"event": "error", "ok": true, "code": "internal", "message": "", "details": {}})
    ]));
    assert!(refused(vec![
        json!({"event": "error", "ok": false, "code": "oops", "message": "", "details": {}})
    ]));
    // A phase that ends without having started; an event after the last.
    assert!(refused(vec![
        json!({"event": "progress", "phase": "sync", "done": 1, "total": 1, "unit": "steps"})
    ]));
    assert!(refused(vec![
        json!({"event": "error", "ok": false, "code": "internal", "message": "", "details": {}}),
        start,
    ]));
}

/// `--help` and `--version` answer on stdout with status 0, whoever runs them, and say nothing
/// else: no request is read, no privilege is given up, no warning is printed.
#[test]
fn help_and_version_answer_on_stdout() {
    for (flag, expected) in [
        ("--help", "usage: reimage"),
        ("--version", "reimage "),
        ("-V", "protocol api 1"),
    ] {
        let out = std::process::Command::new(common::BIN)
            .arg(flag)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert!(stdout.contains(expected), "{flag}: {stdout}");
        assert!(
            out.stderr.is_empty(),
            "{flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Hostile and broken images fail with a clear code, the old volume stays as it was, and
/// nothing outside the volume is created or changed.
#[test]
#[allow(clippy::vec_init_then_push)] // one case per line reads best
fn hostile_and_broken_images_leave_everything_as_it_was() {
    let env = populated("hostile");
    let sentinel_dir = env.dir.join("sentinel");
    std::fs::create_dir_all(&sentinel_dir).unwrap();
    std::fs::write(sentinel_dir.join("keep"), b"outside").unwrap();
    let sentinel_before = reimage_fixtures::manifest(&env.dir.join("sentinel")).unwrap();
    let before = env.snapshot();
    let escape = "../../../sentinel/keep".to_string();

    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    cases.push((
        "dotdot",
        RawTar::new().file(escape.as_bytes(), b"pwned").finish(),
        "unsafe_image",
    ));
    cases.push((
        "dotdot-dir",
        RawTar::new().dir(b"a/../../x").finish(),
        "unsafe_image",
    ));
    cases.push((
        "pax-dotdot",
        RawTar::new()
            .pax(b'x', &[("path", escape.as_bytes())])
            .file(b"innocent", b"pwned")
            .finish(),
        "unsafe_image",
    ));
    cases.push((
        "gnu-long-dotdot",
        RawTar::new()
            .gnu_long(b'L', escape.as_bytes())
            .file(b"innocent", b"pwned")
            .finish(),
        "unsafe_image",
    ));
    cases.push((
        "nul-in-pax-path",
        RawTar::new()
            .pax(b'x', &[("path", b"a\0b")])
            .file(b"x", b"y")
            .finish(),
        "unsafe_image",
    ));
    cases.push((
        "root-as-file",
        RawTar::new().file(b".", b"x").finish(),
        "unsafe_image",
    ));
    cases.push((
        "root-as-fifo",
        RawTar::new().fifo(b"/").finish(),
        "unsafe_image",
    ));
    cases.push((
        "root-as-symlink",
        RawTar::new().symlink(b".", b"/").finish(),
        "unsafe_image",
    ));
    cases.push((
        "hardlink-to-dir",
        RawTar::new().dir(b"d").hardlink(b"l", b"d").finish(),
        "unsafe_image",
    ));
    cases.push((
        "hardlink-dotdot",
        RawTar::new()
            .hardlink(b"l", b"../../sentinel/keep")
            .finish(),
        "unsafe_image",
    ));
    cases.push((
        "hardlink-missing",
        RawTar::new().hardlink(b"l", b"nothing").finish(),
        "image_invalid",
    ));
    let mut bad_sum = Header::new(b'0', b"f");
    bad_sum.checksum = Some(1);
    cases.push((
        "bad-checksum",
        RawTar::new().entry(&bad_sum, &[]).finish(),
        "image_invalid",
    ));
    cases.push((
        "truncated",
        RawTar::new().file(b"f", &[1u8; 3000]).unfinished()[..1500].to_vec(),
        "image_invalid",
    ));
    cases.push((
        "no-end-marker",
        RawTar::new().file(b"f", b"x").unfinished(),
        "image_invalid",
    ));
    cases.push((
        "garbage",
        reimage_fixtures::tree::noise(10_000, 5),
        "image_invalid",
    ));
    cases.push(("empty", Vec::new(), "image_invalid"));
    let mut negative = Header::new(b'0', b"f");
    negative.size = 0;
    let mut block = negative.to_block();
    block[124..136].copy_from_slice(&[0xff; 12]);
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    cases.push((
        "negative-size",
        RawTar::new().raw(&block).finish(),
        "image_invalid",
    ));
    cases.push((
        "huge-pax",
        RawTar::new()
            .pax(b'x', &[("comment", &vec![b'a'; 2 << 20])])
            .file(b"f", b"x")
            .finish(),
        "image_invalid",
    ));
    cases.push((
        "bad-pax-record",
        {
            let mut h = Header::new(b'x', b"pax");
            h.size = 12;
            RawTar::new()
                .entry(&h, b"99 path=abc\n")
                .file(b"f", b"x")
                .finish()
        },
        "image_invalid",
    ));
    cases.push((
        "qcow2",
        b"QFI\xfb\0\0\0\x03".repeat(100),
        "image_unsupported",
    ));
    // A truncated gzip stream.
    let good = rich_image(&env, "good.tar.gz", 4, TarFormat::Gnu, Compression::Gzip);
    let gz = std::fs::read(&good).unwrap();
    cases.push((
        "truncated-gzip",
        gz[..gz.len() / 2].to_vec(),
        "image_invalid",
    ));
    let mut flipped = gz.clone();
    let mid = flipped.len() / 3;
    flipped[mid] ^= 0x55;
    cases.push(("corrupt-gzip", flipped, "image_invalid"));
    std::fs::remove_file(&good).unwrap();

    for (name, bytes, code) in cases {
        let path = env.image(&format!("{name}.img"));
        std::fs::write(&path, &bytes).unwrap();
        for mode in ["atomic", "in-place"] {
            let run = env.run(
                &json!({"api":1,"op":"rebuild","pool":"default","volume":"c1","mode":mode,
                                      "source":{"image": path}}),
            );
            let e = rejected(&env, &run, code, 1);
            assert!(!e["message"].as_str().unwrap().is_empty(), "{name}");
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(before, env.snapshot(), "{name}: the pool changed");
        assert_eq!(
            sentinel_before,
            reimage_fixtures::manifest(&env.dir.join("sentinel")).unwrap(),
            "{name}"
        );
    }
    assert!(!env.dir.join("x").exists());
}

#[test]
fn an_image_that_is_not_a_regular_file_is_refused() {
    let env = populated("notfile");
    let before = env.snapshot();
    let fifo = env.image("fifo.tar");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    rejected(&env, &env.rebuild_from("c1", &fifo), "image_invalid", 1);
    std::fs::create_dir(env.image("dir.tar")).unwrap();
    rejected(
        &env,
        &env.rebuild_from("c1", &env.image("dir.tar")),
        "image_invalid",
        1,
    );
    rejected(
        &env,
        &env.rebuild_from("c1", &env.image("missing.tar")),
        "not_found",
        1,
    );
    assert_eq!(before, env.snapshot());
}
