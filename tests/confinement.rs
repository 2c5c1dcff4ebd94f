//! The unpack threads' confinement (src/confine.rs) seen from outside: what the start event
//! says the kernel offers, a forbidden call made from a confined thread refused (`EPERM`) or
//! fatal (kill mode), and a volume left as it was either way. Every other suite runs in kill
//! mode, so any call the unpack makes outside the allow-list fails it.

mod common;

use common::{rich_image, Env};
use reimage_fixtures::{Compression, TarFormat};
use serde_json::json;

#[test]
fn the_start_event_says_how_the_unpack_is_confined() {
    let env = Env::new("confinement-start");
    let image = rich_image(&env, "a.tar.zst", 1, TarFormat::Posix, Compression::Zstd);
    let r = env.create_from("v", &image);
    r.ok();
    let start = &r.events[0];
    assert_eq!(start["event"], "start");
    assert_eq!(start["confinement"]["seccomp"], true, "{start}");
    let abi = std::fs::read_to_string("/sys/kernel/security/lsm")
        .map(|lsm| lsm.contains("landlock"))
        .unwrap_or(true);
    if abi {
        assert!(
            start["confinement"]["landlock_abi"].as_u64().unwrap_or(0) >= 1,
            "{start}"
        );
        assert!(!r.warnings().contains(&"unconfined"), "{:?}", r.events);
    }
}

#[test]
fn a_forbidden_call_from_the_unpack_thread_is_refused_and_changes_nothing() {
    let env = Env::new("confinement-forbidden");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    let b = rich_image(&env, "b.tar", 2, TarFormat::Gnu, Compression::None);
    env.create_from("v", &a).ok();
    let before = env.manifest_of("v");
    let rebuild = json!({"api": 1, "op": "rebuild", "pool": "default", "volume": "v",
        "source": {"image": b.to_string_lossy()}});
    // Refused: the call fails with EPERM, the request fails and says so.
    let r = env.run_env(
        &rebuild,
        &[
            ("REIMAGE_SECCOMP", "errno"),
            ("REIMAGE_TEST_FORBIDDEN_CALL", "1"),
        ],
    );
    let e = r.failed("internal", 1);
    let message = e["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("socket(2) was refused") && message.contains("Operation not permitted"),
        "{e}"
    );
    assert_eq!(env.manifest_of("v"), before);
    // Kill mode: the process dies of SIGSYS before it writes anything of the new image.
    let r = env.run_env(&rebuild, &[("REIMAGE_TEST_FORBIDDEN_CALL", "1")]);
    assert_eq!(r.status, -1, "killed by a signal: {:?}", r.events);
    env.run(&json!({"api": 1, "op": "recover", "pool": "default", "volume": "v"}))
        .ok();
    assert_eq!(env.manifest_of("v"), before);
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}
