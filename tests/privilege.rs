//! What a running reimage holds: no new privileges, only the capabilities it needs (none of
//! the network's, not CAP_SYS_RESOURCE; the same in the bounding set), its own network
//! namespace, and no file descriptor it inherited beyond 0-2. And concurrency: eight rebuilds
//! of one volume at once (exactly one runs), of eight volumes at once (all succeed). And the
//! audit record every request leaves in syslog.

mod common;

use std::os::fd::AsRawFd;

use common::{rich_image, Env};
use reimage_fixtures::{Compression, TarFormat};
use serde_json::json;

fn status_field(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

fn caps(pid: u32, field: &str) -> u64 {
    u64::from_str_radix(&status_field(pid, field), 16).unwrap()
}

const CAP_CHOWN: u64 = 1 << 0;
const CAP_NET_BIND_SERVICE: u64 = 1 << 10;
const CAP_NET_ADMIN: u64 = 1 << 12;
const CAP_NET_RAW: u64 = 1 << 13;
const CAP_SYS_MODULE: u64 = 1 << 16;
const CAP_SYS_RESOURCE: u64 = 1 << 24;

fn bulky(env: &Env) -> std::path::PathBuf {
    common::bulky_image(env, "bulky.tar", 64)
}

#[test]
fn a_running_reimage_holds_only_what_it_needs() {
    let env = Env::new("privilege");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    env.create_from("c1", &a).ok();
    let image = bulky(&env);
    // A descriptor the caller leaks (not close-on-exec) must not reach reimage.
    let marker = env.dir.join("leaked-fd-marker");
    std::fs::write(&marker, b"x").unwrap();
    let leaked = std::fs::File::open(&marker).unwrap();
    let fd = leaked.as_raw_fd();
    // SAFETY: clearing FD_CLOEXEC on our own open fd.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };

    let mut child = env.spawn(
        &json!({"api":1,"op":"rebuild","pool":"default","volume":"c1","source":{"image": image}}),
    );
    child
        .wait_for(|e| e["event"] == "progress" && e["phase"] == "unpack")
        .unwrap();
    let pid = child.child.id();
    let no_new_privs = status_field(pid, "NoNewPrivs");
    let (eff, prm, bnd, inh) = (
        caps(pid, "CapEff"),
        caps(pid, "CapPrm"),
        caps(pid, "CapBnd"),
        caps(pid, "CapInh"),
    );
    let net = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let own_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    let mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    let own_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let propagation = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let leaked_target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok();
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    let (code, _) = child.finish();
    assert_eq!(code, Some(0));

    eprintln!("CapEff {eff:016x} CapPrm {prm:016x} CapBnd {bnd:016x} CapInh {inh:016x} NoNewPrivs {no_new_privs} net {net:?}");
    assert_eq!(no_new_privs, "1");
    assert_ne!(eff & CAP_CHOWN, 0, "keeps what unpacking needs");
    for (name, cap) in [
        ("NET_ADMIN", CAP_NET_ADMIN),
        ("NET_RAW", CAP_NET_RAW),
        ("NET_BIND_SERVICE", CAP_NET_BIND_SERVICE),
        ("SYS_MODULE", CAP_SYS_MODULE),
        ("SYS_RESOURCE", CAP_SYS_RESOURCE),
    ] {
        assert_eq!(eff & cap, 0, "CapEff has {name}");
        assert_eq!(prm & cap, 0, "CapPrm has {name}");
        assert_eq!(bnd & cap, 0, "CapBnd has {name}");
    }
    assert_eq!(inh, 0);
    assert_eq!(
        eff & !reimage::privilege::needed().bits(),
        0,
        "nothing beyond the needed set"
    );
    assert_ne!(net, own_net, "a network namespace of its own");
    assert_ne!(mnt, own_mnt, "a mount namespace of its own");
    for line in propagation.lines() {
        let optional = line.split(" - ").next().unwrap_or("");
        assert!(
            !optional.contains("shared:"),
            "no mount of reimage's namespace propagates back to the host: {line}"
        );
    }
    assert!(
        leaked_target.as_deref() != Some(marker.as_path()),
        "the leaked fd was closed"
    );
    assert!(
        !fds.iter().any(|p| p.contains("leaked-fd-marker")),
        "{fds:?}"
    );
    drop(leaked);
}

#[test]
fn eight_rebuilds_of_one_volume_run_one_at_a_time() {
    let env = Env::new("concurrent-one");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    env.create_from("c1", &a).ok();
    let image = bulky(&env);
    let request =
        json!({"api":1,"op":"rebuild","pool":"default","volume":"c1","source":{"image": image}});
    let children: Vec<_> = (0..8).map(|_| env.spawn(&request)).collect();
    let results: Vec<_> = children.into_iter().map(|c| c.finish()).collect();
    let ok = results.iter().filter(|(code, _)| *code == Some(0)).count();
    let locked = results
        .iter()
        .filter(|(code, events)| {
            *code == Some(1) && events.last().is_some_and(|e| e["code"] == "locked")
        })
        .count();
    assert!(ok >= 1, "{results:?}");
    assert_eq!(ok + locked, 8, "each either ran or got locked: {results:?}");
    assert!(env.leftovers().is_empty());
}

#[test]
fn eight_rebuilds_of_eight_volumes_all_succeed() {
    let env = Env::new("concurrent-many");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    let b = rich_image(&env, "b.tar.zst", 2, TarFormat::Posix, Compression::Zstd);
    for i in 0..8 {
        env.create_from(&format!("v{i}"), &a).ok();
    }
    let children: Vec<_> = (0..8)
        .map(|i| env.spawn(&json!({"api":1,"op":"rebuild","pool":"default","volume": format!("v{i}"),"source":{"image": b}})))
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let (code, events) = c.finish();
        assert_eq!(code, Some(0), "v{i}: {:?}", events.last());
    }
    let expected = common::gnu_manifest(&env, &b);
    for i in 0..8 {
        common::assert_same(
            &expected,
            &env.manifest_of(&format!("v{i}")),
            &reimage_fixtures::manifest::Ignore::default(),
        );
    }
    assert!(env.leftovers().is_empty());
}

/// A syslog socket of the test's own, removed when dropped.
struct Syslog {
    path: std::path::PathBuf,
    socket: std::os::unix::net::UnixDatagram,
}

impl Syslog {
    fn bind() -> Syslog {
        // Short: a socket path has at most 107 bytes.
        let path =
            std::path::PathBuf::from(format!("/run/reimage-audit-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        Syslog { path, socket }
    }

    fn next(&self) -> Option<String> {
        let mut buf = vec![0u8; 64 << 10];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

impl Drop for Syslog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Every request leaves one audit record in syslog (facility authpriv): the caller's uid and
/// the user sudo ran it for, the driver, op, pool, volume and image, the outcome and the
/// duration; a failure at warning priority. `[audit] syslog = false` turns it off.
#[test]
fn every_request_leaves_an_audit_record() {
    let env = Env::new("audit");
    let syslog = Syslog::bind();
    let config = format!(
        "{}\n[audit]\nsocket = {:?}\n",
        env.default_config(),
        syslog.path
    );
    env.write_config(&config);
    let image = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    let create =
        json!({"api":1,"op":"create","pool":"default","volume":"c1","source":{"image": image}});
    let sudo = [("SUDO_USER", "alice"), ("SUDO_UID", "1000")];
    let created = env.run_env(&create, &sudo);
    let sha256 = created.ok()["image"]["sha256"].as_str().unwrap().to_owned();
    let line = syslog.next().expect("an audit record");
    assert!(line.starts_with("<86>reimage["), "{line}");
    let image_field = format!(" image={} ", image.display());
    let sha256_field = format!(" sha256={sha256} ");
    for field in [
        " uid=0 ",
        " sudo_user=alice ",
        " sudo_uid=1000 ",
        " driver=dir ",
        " op=create ",
        " pool=default ",
        " volume=c1 ",
        image_field.as_str(),
        sha256_field.as_str(),
        " outcome=ok ",
        " duration_ms=",
    ] {
        assert!(line.contains(field), "{field:?} in {line}");
    }
    env.run_env(&create, &sudo).failed("already_exists", 1);
    let line = syslog.next().expect("an audit record");
    assert!(line.starts_with("<84>reimage["), "{line}");
    assert!(line.contains(" outcome=already_exists "), "{line}");
    // A request refused before its config was read still leaves one, where syslog listens
    // by default (not here); one with auditing off leaves none.
    env.write_config(&format!("{config}syslog = false\n"));
    env.run(&json!({"api":1,"op":"inspect","pool":"default","volume":"c1"}))
        .ok();
    syslog
        .socket
        .set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .unwrap();
    assert_eq!(syslog.next(), None);
}
