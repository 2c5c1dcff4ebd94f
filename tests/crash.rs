//! Crashes and contention: `kill -9` in the middle of an unpack, recovered by `recover` or by
//! the next request; SIGTERM rolled back cleanly; two requests on one volume; a busy volume.

mod common;

use common::{rich_image, Env};
use reimage_fixtures::manifest::Manifest;
use reimage_fixtures::{Compression, TarFormat};
use serde_json::{json, Value};
use std::path::PathBuf;

/// An env with volume `c1` holding image A, and a bulky image B that takes a while to unpack.
fn setup(name: &str) -> (Env, Manifest, PathBuf) {
    let env = Env::new(name);
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    env.create_from("c1", &a).ok();
    let old = env.manifest_of("c1");
    let b = common::bulky_image(&env, "b.tar", 96);
    (env, old, b)
}

fn rebuild(image: &PathBuf) -> Value {
    json!({"api":1,"op":"rebuild","pool":"default","volume":"c1","source":{"image": image}})
}

fn is_unpacking(e: &Value) -> bool {
    e["event"] == "progress" && e["phase"] == "unpack"
}

/// Starts a rebuild from `image` and kills it with SIGKILL once it is unpacking.
fn kill_during_unpack(env: &Env, image: &PathBuf) {
    let mut child = env.spawn(&rebuild(image));
    child
        .wait_for(is_unpacking)
        .expect("the rebuild reached the unpack");
    child.signal(libc::SIGKILL);
    let (code, _) = child.finish();
    assert_eq!(code, None, "killed by the signal");
}

#[test]
fn kill_during_unpack_then_recover_restores_the_old_volume() {
    let (env, old, b) = setup("kill-recover");
    kill_during_unpack(&env, &b);
    assert!(
        !env.leftovers().is_empty(),
        "the half-built volume is there before recovery"
    );
    let inspect = env.run(&json!({"api":1,"op":"inspect","pool":"default","volume":"c1"}));
    assert_eq!(inspect.ok()["volume"]["pending_recovery"], true);

    let r = env.run(&json!({"api":1,"op":"recover","pool":"default"}));
    let recovered = r.ok()["recovered"].as_array().unwrap().clone();
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0]["volume"], "c1");
    assert_eq!(recovered[0]["action"], "rolled_back");
    assert_eq!(old, env.manifest_of("c1"));
    assert!(env.leftovers().is_empty());
    assert_eq!(
        env.snapshot().1,
        Vec::<String>::new(),
        "no journal record left"
    );

    // A second recover has nothing to do.
    let again = env.run(&json!({"api":1,"op":"recover","pool":"default"}));
    assert_eq!(again.ok()["recovered"], json!([]));
    assert_eq!(old, env.manifest_of("c1"));
}

#[test]
fn kill_during_unpack_then_the_next_request_recovers_first() {
    let (env, old, b) = setup("kill-next");
    kill_during_unpack(&env, &b);
    // The next request on the volume finishes the interrupted one first, then does its job.
    let r = env.run(&json!({"api":1,"op":"recover","pool":"default","volume":"c1"}));
    assert_eq!(r.ok()["recovered"][0]["action"], "rolled_back");
    kill_during_unpack(&env, &b);
    let r = env.rebuild_from("c1", &b);
    r.ok();
    assert!(r.warnings().contains(&"recovered"), "{:?}", r.events);
    assert_ne!(old, env.manifest_of("c1"));
    assert!(env.leftovers().is_empty());
    // And a kill during a create leaves no volume at all.
    kill_create(&env, &b);
    let r = env.run(&json!({"api":1,"op":"inspect","pool":"default","volume":"c2"}));
    assert_eq!(r.ok()["volume"]["exists"], false);
    assert_eq!(r.ok()["volume"]["pending_recovery"], true);
    env.run(&json!({"api":1,"op":"recover","pool":"default"}))
        .ok();
    assert!(env.leftovers().is_empty());
    assert!(!env.volume("c2").exists());
}

fn kill_create(env: &Env, image: &PathBuf) {
    let mut child = env.spawn(
        &json!({"api":1,"op":"create","pool":"default","volume":"c2","source":{"image": image}}),
    );
    child
        .wait_for(is_unpacking)
        .expect("the create reached the unpack");
    child.signal(libc::SIGKILL);
    child.finish();
}

#[test]
fn kill_during_an_in_place_preserve_restores_the_old_volume() {
    let (env, old, b) = setup("kill-inplace");
    // In place, a kill before the old content is destroyed rolls back: here the kill comes
    // while the (large) preserved tree is copied.
    let vol = env.volume("c1");
    reimage_fixtures::tree::bulky(&vol.join("home/big"), 64, 4 << 20).unwrap();
    let old = {
        let _ = old;
        env.manifest_of("c1")
    };
    let mut child = env.spawn(
        &json!({"api":1,"op":"rebuild","pool":"default","volume":"c1","mode":"in-place",
                                      "source":{"image": b},"preserve":["/home"]}),
    );
    child
        .wait_for(|e| e["event"] == "progress" && e["phase"] == "preserve")
        .expect("reached preserve");
    child.signal(libc::SIGKILL);
    child.finish();
    assert!(
        !vol.exists(),
        "the old volume is moved aside while the new one is built"
    );
    let r = env.run(&json!({"api":1,"op":"recover","pool":"default"}));
    assert_eq!(r.ok()["recovered"][0]["action"], "rolled_back");
    assert_eq!(old, env.manifest_of("c1"));
    assert!(env.leftovers().is_empty());
}

#[test]
fn sigterm_rolls_back_and_reports_interrupted() {
    let (env, old, b) = setup("sigterm");
    let mut child = env.spawn(&rebuild(&b));
    child.wait_for(is_unpacking).unwrap();
    child.signal(libc::SIGTERM);
    let (code, events) = child.finish();
    assert_eq!(code, Some(1));
    let last = events.last().unwrap();
    assert_eq!(last["event"], "error");
    assert_eq!(last["code"], "interrupted");
    assert_eq!(old, env.manifest_of("c1"));
    assert!(env.leftovers().is_empty());
    assert_eq!(env.snapshot().1, Vec::<String>::new());
}

#[test]
fn a_second_request_on_a_busy_volume_gets_locked_at_once() {
    let (env, _old, b) = setup("locked");
    let mut first = env.spawn(&rebuild(&b));
    first.wait_for(is_unpacking).unwrap();
    let started = std::time::Instant::now();
    let second = env.rebuild_from("c1", &b);
    second.failed("locked", 1);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "locked is immediate"
    );
    env.run(&json!({"api":1,"op":"delete","pool":"default","volume":"c1"}))
        .failed("locked", 1);
    // Another volume is not blocked.
    env.run(&json!({"api":1,"op":"create","pool":"default","volume":"c2","source":{"empty":true}}))
        .ok();
    let (code, events) = first.finish();
    assert_eq!(code, Some(0), "{events:?}");
    assert!(env.leftovers().is_empty());
}

#[test]
fn a_volume_in_use_is_busy_and_names_its_holder() {
    let (env, old, b) = setup("busy");
    let mut holder = std::process::Command::new("sleep")
        .arg("60")
        .current_dir(env.volume("c1").join("etc"))
        .spawn()
        .unwrap();
    let r = env.rebuild_from("c1", &b);
    let e = r.failed("volume_busy", 1).clone();
    let delete = env.run(&json!({"api":1,"op":"delete","pool":"default","volume":"c1"}));
    holder.kill().unwrap();
    holder.wait().unwrap();
    delete.failed("volume_busy", 1);
    let named = e["details"]["holder"].as_str().unwrap();
    assert!(
        named.contains(&format!("pid {}", holder.id())) && named.contains("sleep"),
        "{named}"
    );
    assert_eq!(old, env.manifest_of("c1"));
    env.rebuild_from("c1", &b).ok();
}

/// A storage program that hangs is killed, with what it started, once the config's
/// `command_timeout` has passed: the request fails with `driver_error` naming the command,
/// instead of holding the volume's lock forever. Here `zfs` is a stand-in that never returns,
/// bound over the real one in a mount namespace of the test's own.
#[test]
fn a_storage_program_that_hangs_is_killed_and_named() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("hung");
    let real = std::path::Path::new("/usr/sbin/zfs");
    assert!(
        real.exists(),
        "scripts/setup installs zfsutils-linux (for the guest tier)"
    );
    // A sleep of its own that the stand-in waits for: both must go.
    let stub = env.dir.join("zfs-that-hangs");
    std::fs::write(&stub, "#!/bin/sh\nsleep 3607 &\nwait\n").unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.write_config(&format!(
        "command_timeout = 2\n{}\n[pools.tank]\ndriver = \"zfs\"\ndataset = \"tank/reimage\"\n",
        env.default_config()
    ));
    let started = std::time::Instant::now();
    let r = env.run_under(
        &[
            "unshare",
            "-m",
            "sh",
            "-c",
            "mount --bind \"$0\" /usr/sbin/zfs && exec \"$@\"",
            stub.to_str().unwrap(),
        ],
        "zfs",
        &json!({"api":1,"op":"inspect","pool":"tank","volume":"c1"}),
    );
    let e = r.failed("driver_error", 1);
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("`zfs get") && message.contains("still running after 2 s"),
        "{e}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.trim() == "sleep 3607")
        .collect();
    assert!(left.is_empty(), "still running: {left:?}");
}
