//! The driver conformance suite: one set of cases, written once, that every driver must pass
//! against its real backend (dir: a directory; btrfs: a filesystem on a loop device made for
//! the test, with and without quotas). A case a driver cannot support is reported as not
//! applicable, by the capability it lacks, on stderr, never skipped silently.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_same, gnu_manifest, rich_image, sh, Backend, Env};
use reimage_fixtures::manifest::Ignore;
use reimage_fixtures::rawtar::Header;
use serde_json::{json, Value};

/// What the driver declares it can do (from `inspect`): cases it cannot support are reported
/// as not applicable by this declaration.
struct Caps {
    snapshots: bool,
    /// Snapshots survive a rebuild with `keep`.
    keep: bool,
    /// A size limit: a quota or a device of that size.
    sized: bool,
    shrink: bool,
    /// `keep` refills the volume in place under a guard snapshot.
    refill: bool,
    /// The pool fills volumes by cloning image volumes.
    image_volumes: bool,
    /// A volume can be filled from another volume's snapshot.
    templates: bool,
    /// The size limit counts the image content (not only what the volume changes).
    size_counts_image: bool,
}

fn caps(env: &Env) -> Caps {
    let r = env.run(&req("inspect", "c1", json!({})));
    let c = &r.ok()["volume"]["capabilities"];
    Caps {
        snapshots: c["snapshots"] == true,
        keep: c["keep_snapshots"] == true,
        sized: c["size_limit"] != "none",
        shrink: c["shrink"] == true,
        refill: c["keep_snapshots_by"] == "refill",
        image_volumes: c["image_volumes"] == true,
        templates: c["templates"] == true,
        size_counts_image: c["size_counts_image"] == true,
    }
}

fn not_applicable(case: &str, backend: Backend, why: &str) {
    eprintln!("NOT APPLICABLE: {case} on {backend:?}: {why}");
}

fn req(op: &str, volume: &str, extra: Value) -> Value {
    let mut v = json!({"api": 1, "op": op, "pool": "default", "volume": volume});
    if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        v.extend(extra.clone());
    }
    v
}

/// An env with volume `c1` from image A and a sentinel outside the pool; returns the images
/// A and B.
fn populated(case: &str, backend: Backend) -> (Env, PathBuf, PathBuf) {
    let env = Env::with_backend(&format!("conf-{case}"), backend);
    let (a, b) = populate(&env, false);
    (env, a, b)
}

/// As [`populated`], with a neighbour volume `n1` (from image B) for [`untouched`]; `small`
/// puts a dir pool on a tmpfs of that size (the other backends' pools are on a device of
/// their own, 1 or 2 GiB).
fn populated_beside(case: &str, backend: Backend, small: Option<&str>) -> (Env, PathBuf, PathBuf) {
    let mut env = Env::with_backend(&format!("conf-{case}"), backend);
    if let Some(size) = small {
        env.small_pool(size);
    }
    let (a, b) = populate(&env, true);
    (env, a, b)
}

/// Fills an empty env as [`populated`] (and with `neighbour`, [`populated_beside`])
/// describes; returns the images A and B.
fn populate(env: &Env, neighbour: bool) -> (PathBuf, PathBuf) {
    let [a, b] = common::guest::RICH
        .map(|(name, seed, format, compression)| rich_image(env, name, seed, format, compression));
    env.create_from("c1", &a).ok();
    if neighbour {
        env.create_from("n1", &b).ok();
    }
    std::fs::create_dir_all(env.dir.join("sentinel")).unwrap();
    std::fs::write(env.dir.join("sentinel/file"), b"outside").unwrap();
    (a, b)
}

/// The neighbour (see [`populated_beside`]), the sentinel and the absence of temporary
/// volumes: what no operation on `c1` may change.
fn untouched(env: &Env) -> (reimage_fixtures::Manifest, reimage_fixtures::Manifest) {
    assert!(
        env.leftovers().is_empty(),
        "temporary volumes left: {:?}",
        env.leftovers()
    );
    (
        env.manifest_of("n1"),
        reimage_fixtures::manifest(&env.dir.join("sentinel")).unwrap(),
    )
}

fn lifecycle(backend: Backend) {
    let (env, a, b) = populated_beside("lifecycle", backend, None);
    let before = untouched(&env);
    assert_same(
        &gnu_manifest(&env, &a),
        &env.manifest_of("c1"),
        &Ignore::default(),
    );
    env.rebuild_from("c1", &b).ok();
    assert_same(
        &gnu_manifest(&env, &b),
        &env.manifest_of("c1"),
        &Ignore::default(),
    );
    env.rebuild_from("c1", &a).ok();
    assert_same(
        &gnu_manifest(&env, &a),
        &env.manifest_of("c1"),
        &Ignore::default(),
    );
    env.run(&req("rebuild", "c1", json!({"source": {"empty": true}})))
        .ok();
    assert!(
        env.manifest_of("c1").keys().all(|k| k == "."),
        "the volume is empty"
    );
    env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": b}, "mode": "in-place"}),
    ))
    .ok();
    assert_same(
        &gnu_manifest(&env, &b),
        &env.manifest_of("c1"),
        &Ignore::default(),
    );
    // Without `walk`, usage comes from the pool's counters alone: a number where it keeps
    // them (quotas, zfs, LVM), `null` where only a walk of the tree could tell.
    let inspect = env.run(&req("inspect", "c1", json!({})));
    let cheap = &inspect.ok()["volume"];
    assert!(cheap["used"].is_u64() || cheap["used"].is_null(), "{cheap}");
    let inspect = env.run(&req("inspect", "c1", json!({"walk": true})));
    let volume = &inspect.ok()["volume"];
    assert_eq!(volume["exists"], true);
    // The rich tree's mostly-zero file is stored with holes, so less than its 4.2 MB.
    assert!(volume["used"].as_u64().unwrap() > 3_000_000, "{volume}");
    assert_eq!(before, untouched(&env));
    env.run(&req("delete", "c1", json!({}))).ok();
    assert!(!env.exists("c1"));
    assert_eq!(
        env.run(&req("inspect", "c1", json!({}))).ok()["volume"]["exists"],
        false
    );
    assert_eq!(before, untouched(&env));
}

fn resize(backend: Backend) {
    let (env, _a, _b) = populated("resize", backend);
    let r = env.run(&req("resize", "c1", json!({"size": "300MiB"})));
    let caps = caps(&env);
    if !caps.sized {
        r.ok();
        assert_eq!(r.warnings(), vec!["size_ignored"]);
        return not_applicable("resize", backend, "no size limits (warned)");
    }
    assert_eq!(r.ok()["volume"]["size"], 300 << 20);
    let r = env.run(&req("resize", "c1", json!({"size": "100MiB"})));
    if !caps.shrink {
        r.failed("unsupported", 1);
        assert_eq!(
            env.run(&req("inspect", "c1", json!({}))).ok()["volume"]["size"],
            300 << 20
        );
        return not_applicable("resize (shrinking)", backend, "cannot shrink (refused)");
    }
    assert_eq!(
        r.ok()["volume"]["size"],
        100 << 20,
        "shrinks where the driver can"
    );
    if !caps.size_counts_image {
        // Only what the volume changes counts: make it use more than 1 MiB.
        let view = env.view("c1");
        std::fs::write(view.path.join("two-mib"), vec![7u8; 2 << 20]).unwrap();
    }
    env.run(&req("resize", "c1", json!({"size": "1MiB"})))
        .failed("insufficient_space", 1);
    assert_eq!(
        env.run(&req("inspect", "c1", json!({}))).ok()["volume"]["size"],
        100 << 20
    );
}

fn size_grows_to_fit_the_image(backend: Backend) {
    let (env, a, _b) = populated("grow", backend);
    let r = env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": a}, "size": "1MiB"}),
    ));
    if !caps(&env).sized {
        r.ok();
        assert!(r.warnings().contains(&"size_ignored"));
        return not_applicable(
            "size_grows_to_fit_the_image",
            backend,
            "no size limits (warned)",
        );
    }
    let size = r.ok()["volume"]["size"].as_u64().unwrap();
    let need = r.ok()["image"]["allocated_bytes"].as_u64().unwrap();
    assert!(
        size >= need + need / 5,
        "size {size} fits {need} plus headroom"
    );
    let exact = env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": a}, "size": "1MiB", "size_policy": "exact"}),
    ));
    exact.failed("insufficient_space", 1);
}

fn snapshots(backend: Backend) {
    let (env, a, b) = populated("snapshots", backend);
    if !caps(&env).snapshots {
        let r = env.rebuild_from("c1", &b);
        r.ok();
        let keep = env.run(&req(
            "rebuild",
            "c1",
            json!({"source": {"image": a}, "snapshots": "keep"}),
        ));
        keep.ok();
        return not_applicable("snapshots", backend, "the driver has no snapshots");
    }
    let snap = env.take_snapshot("c1", "snap1");
    let snap_manifest = env.snapshot_manifest(&snap);
    let before = env.manifest_of("c1");
    let refused = env.rebuild_from("c1", &b);
    let e = refused.failed("volume_has_snapshots", 1);
    assert_eq!(e["details"]["snapshots"], json!(["snap1"]));
    assert_eq!(before, env.manifest_of("c1"));
    env.run(&req("delete", "c1", json!({})))
        .failed("volume_has_snapshots", 1);
    if !caps(&env).keep {
        env.run(&req(
            "rebuild",
            "c1",
            json!({"source": {"image": b}, "snapshots": "keep"}),
        ))
        .failed("unsupported", 1);
        assert_eq!(before, env.manifest_of("c1"));
        assert_eq!(snap_manifest, env.snapshot_manifest(&snap));
        not_applicable(
            "snapshots (keep)",
            backend,
            "snapshots die with the volume (refused)",
        );
    } else {
        // keep: the snapshot stays usable, and the volume still lists it after the rebuild.
        env.run(&req(
            "rebuild",
            "c1",
            json!({"source": {"image": b}, "snapshots": "keep"}),
        ))
        .ok();
        assert_eq!(snap_manifest, env.snapshot_manifest(&snap));
        assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
        assert_same(
            &gnu_manifest(&env, &b),
            &env.manifest_of("c1"),
            &Ignore::default(),
        );
        assert_eq!(
            env.run(&req("inspect", "c1", json!({}))).ok()["volume"]["snapshots"],
            json!(["snap1"])
        );
    }
    // delete: the snapshots go with the old content.
    env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": a}, "snapshots": "delete"}),
    ))
    .ok();
    assert!(env.snapshot_manifest(&snap).is_none());
    assert_eq!(
        env.run(&req("inspect", "c1", json!({}))).ok()["volume"]["snapshots"],
        json!([])
    );
    // And a delete with snapshots "delete" removes them too.
    let snap2 = env.take_snapshot("c1", "snap2");
    env.run(&req("delete", "c1", json!({"snapshots": "delete"})))
        .ok();
    assert!(env.snapshot_manifest(&snap2).is_none() && !env.exists("c1"));
    assert!(env.leftovers().is_empty());
}

/// Volumes a container made inside its volume (datasets, subvolumes; one protected by a
/// snapshot or a read-only flag) go with it, on a rebuild and on a delete.
fn nested_volumes_are_deleted(backend: Backend) {
    let (env, _a, b) = populated("nested", backend);
    if !env.storage().nest("c1", true) {
        return not_applicable(
            "nested_volumes_are_deleted",
            backend,
            "no nested volumes (a directory, a filesystem on an LV)",
        );
    }
    env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": b}, "snapshots": "delete"}),
    ))
    .ok();
    assert_eq!(env.storage().nested("c1"), Vec::<String>::new());
    env.storage().nest("c1", false);
    env.run(&req("delete", "c1", json!({}))).ok();
    assert!(!env.exists("c1"));
    assert_eq!(env.storage().nested("c1"), Vec::<String>::new());
}

/// An image that claims far more content than the pool holds: 2 GiB of zeros, compressed
/// as one zstd frame per MiB (the same frame 2048 times: quick to make even in the guest).
fn oversized_image(env: &Env) -> PathBuf {
    use std::io::Write;
    let out = env.image("big.tar.zst");
    let mut f = std::fs::File::create(&out).unwrap();
    let frame = |data: &[u8]| zstd::encode_all(data, 1).unwrap();
    let mut h = Header::new(b'0', b"zeros");
    h.size = 2 << 30;
    f.write_all(&frame(&h.to_block())).unwrap();
    let mib = frame(&vec![0u8; 1 << 20]);
    for _ in 0..2048 {
        f.write_all(&mib).unwrap();
    }
    f.write_all(&frame(&[0u8; 1024])).unwrap();
    out
}

fn a_pool_too_small_is_refused_before_anything_changes(backend: Backend) {
    let (env, _a, _b) = populated_beside("full", backend, Some("512m"));
    let big = oversized_image(&env);
    let before = (env.manifest_of("c1"), untouched(&env));
    let r = env.rebuild_from("c1", &big);
    let e = r.failed("insufficient_space", 1);
    assert!(
        e["details"]["needed"].as_u64().unwrap() > e["details"]["available"].as_u64().unwrap(),
        "{e}"
    );
    assert!(!r.events.iter().any(|e| e["phase"] == "unpack"));
    assert_eq!(before, (env.manifest_of("c1"), untouched(&env)));
}

/// A nearly full filesystem: filled with real extents (fallocate) until about 64 MiB are
/// left, so an image of 256 MiB cannot fit; statfs alone is approximate on btrfs. Where the
/// pool keeps image volumes, the refusal names the image volume's bytes, and a rebuild that
/// clones an image volume the pool holds needs no room and goes through.
fn a_nearly_full_pool_is_refused_before_anything_changes(backend: Backend) {
    let (env, a, _b) = populated_beside("nearly-full", backend, Some("512m"));
    let image_volumes = caps(&env).image_volumes;
    let bulky = bulky_image(&env);
    env.fill_pool_leaving(64 << 20);
    let before = (env.manifest_of("c1"), untouched(&env));
    let r = env.rebuild_from("c1", &bulky);
    let e = r.failed("insufficient_space", 1);
    let available = e["details"]["available"].as_u64().unwrap();
    assert!(
        available < 128 << 20,
        "available {available} reflects the fill"
    );
    assert_eq!(
        e["details"]["image_bytes"].is_u64(),
        image_volumes,
        "image_bytes where an image volume was to be built: {e}"
    );
    assert_eq!(before, (env.manifest_of("c1"), untouched(&env)));
    if image_volumes {
        let r = env.rebuild_from("c1", &a);
        assert_eq!(r.ok()["image"]["cache"], "hit", "{:?}", r.events);
        assert_eq!(env.manifest_of("c1"), before.0);
    }
    env.unfill();
}

fn bulky_image(env: &Env) -> PathBuf {
    common::bulky_image(env, "bulky.tar", 64)
}

fn kill_and_recover(env: &Env, request: Value) {
    let mut child = env.spawn(&request);
    child
        .wait_for(|e| e["event"] == "progress" && e["phase"] == "unpack")
        .expect("reached the unpack");
    child.signal(libc::SIGKILL);
    child.finish();
}

fn recovery_after_a_crash(backend: Backend) {
    let (env, a, b) = populated_beside("crash", backend, None);
    // With image volumes the unpack that is killed builds the image volume, before the
    // volume is touched: what is left is an unsealed image volume, not a journaled build.
    let image_volumes = caps(&env).image_volumes;
    let bulky = bulky_image(&env);
    let before = (env.manifest_of("c1"), untouched(&env));
    kill_and_recover(
        &env,
        req("rebuild", "c1", json!({"source": {"image": bulky}})),
    );
    let r = env.run(&json!({"api": 1, "op": "recover", "pool": "default"}));
    if image_volumes {
        // Measured first, the image volume is built under the volume's journal, which is
        // rolled back (nothing of the volume changed yet).
        let recovered = if env.storage().image_volume_sized_first() {
            json!([{"volume": "c1", "op": "rebuild", "action": "rolled_back"}])
        } else {
            json!([])
        };
        assert_eq!(r.ok()["recovered"], recovered);
        assert_eq!(
            r.ok()["unsealed_images_removed"].as_array().map(Vec::len),
            Some(1),
            "{}",
            r.last()
        );
    } else {
        assert_eq!(r.ok()["recovered"][0]["action"], "rolled_back");
    }
    assert_eq!(before, (env.manifest_of("c1"), untouched(&env)));
    assert_eq!(
        env.run(&json!({"api": 1, "op": "recover", "pool": "default"}))
            .ok()["recovered"],
        json!([])
    );
    // In place, the old content is destroyed before the unpack starts (the documented
    // risk): a kill there loses the volume, and recovery leaves nothing half-built behind.
    kill_and_recover(
        &env,
        req(
            "rebuild",
            "c1",
            json!({"source": {"image": bulky}, "mode": "in-place"}),
        ),
    );
    let r = env.run(&json!({"api": 1, "op": "recover", "pool": "default"}));
    assert_eq!(r.ok()["recovered"][0]["action"], "lost");
    assert!(!env.exists("c1"));
    assert_eq!(before.1, untouched(&env));
    env.create_from("c1", &a).ok();
    // The next request recovers first by itself.
    kill_and_recover(
        &env,
        req("rebuild", "c1", json!({"source": {"image": bulky}})),
    );
    let r = env.rebuild_from("c1", &b);
    r.ok();
    if !image_volumes {
        assert!(r.warnings().contains(&"recovered"));
    }
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// The operation and the request that pass fault point `point`, filling `c1` (or `c2`, for
/// create) from `image`.
fn request_at(point: &str, image: &Path) -> (&'static str, Value) {
    let rebuild = |extra: Value| {
        let mut fill = json!({"source": {"image": image}});
        if let (Some(f), Some(extra)) = (fill.as_object_mut(), extra.as_object()) {
            f.extend(extra.clone());
        }
        ("rebuild", req("rebuild", "c1", fill))
    };
    match point.split(':').next() {
        Some("create") => (
            "create",
            req("create", "c2", json!({"source": {"image": image}})),
        ),
        Some("delete") => ("delete", req("delete", "c1", json!({}))),
        Some("inplace") => rebuild(json!({"mode": "in-place"})),
        Some("refill") => rebuild(json!({"snapshots": "keep"})),
        _ => rebuild(json!({})),
    }
}

/// Runs `request` with `point` armed to `kill` the process there or fail with an `error`;
/// returns the fault spec, for messages.
fn interrupt(env: &Env, point: &str, action: &str, request: &Value) -> String {
    let spec = if action == "kill" {
        point.to_string()
    } else {
        format!("{point}@error")
    };
    let run = env.run_env(request, &[("REIMAGE_FAULT", &spec)]);
    if action == "kill" {
        assert_eq!(
            run.status,
            -1,
            "{spec}: killed by SIGKILL; {:?}",
            run.events.last()
        );
    }
    spec
}

/// Every fault point an operation passes: kill the process there, then `recover`. The
/// volume holds the complete old or the complete new content (never neither, never a mix),
/// no temporary volume or journal record is left, and a second `recover` does nothing. Then
/// the same with an error injected instead of a kill.
///
/// Whatever content a point leaves in `c1` is where the next point starts: a rebuild that
/// completed made its image the old content, and the next rebuild goes back to the other.
fn crash_at_every_step(backend: Backend) {
    let (env, a, b) = populated("steps", backend);
    let version = std::process::Command::new(common::BIN)
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).contains("fault injection"),
        "the crash tests need a build with --features fault-injection"
    );
    // `c1` holds `current` (as reimage unpacked it: `old`); rebuilds go to `other`.
    let (mut current, mut other) = (a, b);
    let mut old = env.manifest_of("c1");
    let mut expected_new = gnu_manifest(&env, &other);
    let mut expected_old = gnu_manifest(&env, &current);
    let journal_is_empty = |env: &Env| env.snapshot().1.is_empty();
    let refill = caps(&env).refill;
    let mut checked = 0;
    // Under emulation every run costs seconds: in the guest each point is interrupted one way,
    // kill and injected error alternating from point to point; on the host, both ways.
    let in_guest = std::env::var_os(common::guest::FIXTURES_VAR).is_some();
    for (index, point) in reimage::fault::POINTS.iter().enumerate() {
        let building_image = point.starts_with("image:");
        if building_image && !caps(&env).image_volumes {
            not_applicable(point, backend, "the pool keeps no image volumes");
            continue;
        }
        let refilling = point.starts_with("refill:");
        if refilling && !refill {
            not_applicable(
                point,
                backend,
                "keep does not refill in place on this driver",
            );
            continue;
        }
        // A refill happens only when there are snapshots to keep.
        let snap = refilling.then(|| env.take_snapshot("c1", "kept"));
        let snapshot_content = old.clone();
        let actions: &[&str] = match (in_guest, index % 2) {
            (false, _) => &["kill", "error"],
            (true, 0) => &["kill"],
            (true, _) => &["error"],
        };
        for &action in actions {
            if building_image {
                // The rebuild below must build the image volume, not find it.
                env.run(&json!({"api": 1, "op": "prune", "pool": "default"}))
                    .ok();
            }
            let (op, request) = request_at(point, &other);
            let spec = interrupt(&env, point, action, &request);
            let r = env.run(&json!({"api": 1, "op": "recover", "pool": "default"}));
            assert_eq!(
                r.last()["event"],
                "result",
                "{spec}: recover (exit {}): {}\nstderr: {}",
                r.status,
                r.last(),
                r.stderr
            );
            assert_eq!(
                env.run(&json!({"api": 1, "op": "recover", "pool": "default"}))
                    .ok()["recovered"],
                json!([]),
                "{spec}"
            );
            assert!(env.leftovers().is_empty(), "{spec}: {:?}", env.leftovers());
            assert!(journal_is_empty(&env), "{spec}: journal records left");
            match op {
                "create" => {
                    if env.exists("c2") {
                        assert_same(&expected_new, &env.manifest_of("c2"), &Ignore::default());
                        env.run(&req("delete", "c2", json!({}))).ok();
                    }
                }
                "delete" => {
                    if env.exists("c1") {
                        assert_eq!(old, env.manifest_of("c1"), "{spec}");
                    } else {
                        env.create_from("c1", &current).ok();
                        old = env.manifest_of("c1");
                    }
                }
                _ => {
                    if !env.exists("c1") {
                        // Only an in-place rebuild, after the old content was destroyed.
                        assert!(
                            point.starts_with("inplace") || point.starts_with("commit"),
                            "{spec}: the volume is gone"
                        );
                        env.create_from("c1", &current).ok();
                        old = env.manifest_of("c1");
                    } else {
                        let now = env.manifest_of("c1");
                        let is_new = reimage_fixtures::manifest::diff(
                            &expected_new,
                            &now,
                            &Ignore::default(),
                        )
                        .is_empty();
                        assert!(
                            now == old || is_new,
                            "{spec}: the volume holds neither the old nor the new content"
                        );
                        if now != old {
                            // The rebuild completed: its image is the old content now.
                            std::mem::swap(&mut current, &mut other);
                            std::mem::swap(&mut expected_old, &mut expected_new);
                            old = now;
                        }
                    }
                }
            }
            checked += 1;
        }
        if let Some(snap) = snap {
            assert_eq!(
                env.snapshot_manifest(&snap).as_ref(),
                Some(&snapshot_content),
                "{point}: the kept snapshot is intact"
            );
            env.drop_snapshot(snap);
        }
    }
    eprintln!("crash_at_every_step on {backend:?}: {checked} crashes and errors recovered");
}

/// The kernel stops an unpack at the volume's limit: `quota_exceeded`, the old volume intact.
fn an_exhausted_quota_is_quota_exceeded(backend: Backend) {
    let (env, a, _b) = populated("edquot", backend);
    if !caps(&env).sized {
        return not_applicable(
            "an_exhausted_quota_is_quota_exceeded",
            backend,
            "no size limits",
        );
    }
    if !caps(&env).size_counts_image {
        return not_applicable(
            "an_exhausted_quota_is_quota_exceeded",
            backend,
            "the limit is the upper layer's: an image does not count against it",
        );
    }
    let (code, word, files) = env.storage().limit_reached();
    let bulky = common::bulky_image(&env, &format!("bulky-{files}.tar"), files);
    let before = env.manifest_of("c1");
    let r = env.run_env(
        &req("rebuild", "c1", json!({"source": {"image": bulky}})),
        &[("REIMAGE_FAULT_QUOTA", &(8u64 << 20).to_string())],
    );
    let e = r.failed(code, 1);
    assert!(e["message"].as_str().unwrap().contains(word), "{e}");
    // A clone of an image volume fails before anything is written: no free space to report.
    let numbers: &[&str] = if caps(&env).image_volumes {
        &["volume_size", "measured"]
    } else {
        &["volume_size", "measured", "free_bytes", "free_inodes"]
    };
    for &number in numbers {
        assert!(e["details"][number].is_u64(), "{number} in {e}");
    }
    assert_eq!(before, env.manifest_of("c1"));
    assert!(env.leftovers().is_empty());
    env.rebuild_from("c1", &a).ok();
    if caps(&env).refill {
        // A refill that hits the limit rolls back to its guard, and the size back with it.
        let before = env.manifest_of("c1");
        let size = env.run(&req("inspect", "c1", json!({}))).ok()["volume"]["size"].clone();
        let snap = env.take_snapshot("c1", "kept");
        let r = env.run_env(
            &req(
                "rebuild",
                "c1",
                json!({"source": {"image": bulky}, "snapshots": "keep"}),
            ),
            &[("REIMAGE_FAULT_QUOTA", &(8u64 << 20).to_string())],
        );
        r.failed("quota_exceeded", 1);
        assert_eq!(before, env.manifest_of("c1"));
        assert_eq!(env.snapshot_manifest(&snap).as_ref(), Some(&before));
        assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
        let inspect = env.run(&req("inspect", "c1", json!({})));
        assert_eq!(inspect.ok()["volume"]["size"], size);
        assert_eq!(inspect.ok()["volume"]["snapshots"], json!(["kept"]));
    }
}

fn busy_volumes_name_their_holder(backend: Backend) {
    let (env, _a, b) = populated("busy", backend);
    let view = env.view("c1");
    let mut holder = Command::new("sleep")
        .arg("60")
        .current_dir(view.path.join("etc"))
        .spawn()
        .unwrap();
    let r = env.rebuild_from("c1", &b);
    holder.kill().unwrap();
    holder.wait().unwrap();
    drop(view);
    let e = r.failed("volume_busy", 1);
    assert!(
        e["details"]["holder"].as_str().unwrap().contains("sleep"),
        "{e}"
    );
    if env.storage().volume_dir().is_none() {
        // A volume mounted only by whoever uses it (a dataset, an LV) is busy when mounted
        // anywhere; its mount point is named.
        let view = env.view("c1");
        let r = env.rebuild_from("c1", &b);
        let deleted = env.run(&req("delete", "c1", json!({})));
        drop(view);
        let e = r.failed("volume_busy", 1);
        assert!(
            e["details"]["holder"]
                .as_str()
                .unwrap()
                .contains("mounted at"),
            "{e}"
        );
        deleted.failed("volume_busy", 1);
        env.rebuild_from("c1", &b).ok();
        return;
    }
    // A filesystem mounted inside the volume keeps it busy too, named by its mount point.
    let inside = env.volume("c1").join("srv");
    sh(Command::new("mount")
        .args(["-t", "tmpfs", "inside"])
        .arg(&inside));
    let r = env.rebuild_from("c1", &b);
    let deleted = env.run(&req("delete", "c1", json!({})));
    sh(Command::new("umount").arg(&inside));
    let e = r.failed("volume_busy", 1);
    assert!(
        e["details"]["holder"]
            .as_str()
            .unwrap()
            .contains("mounted at"),
        "{e}"
    );
    deleted.failed("volume_busy", 1);
    env.rebuild_from("c1", &b).ok();
}

fn hostile_names_are_refused(backend: Backend) {
    let (env, _a, _b) = populated_beside("names", backend, None);
    let before = (env.manifest_of("c1"), untouched(&env));
    for name in [
        "-o",
        "../x",
        "a@b",
        "",
        ".reimage-new.c1",
        "c1/..",
        &"x".repeat(300),
    ] {
        env.run(&req("delete", name, json!({})))
            .failed("invalid_request", 2);
        env.run(&req("create", name, json!({"source": {"empty": true}})))
            .failed("invalid_request", 2);
    }
    assert_eq!(before, (env.manifest_of("c1"), untouched(&env)));
}

/// Levels of the deep tree: more than PATH_MAX allows to name, far more than the open-file
/// limit the case runs under.
const DEEP: usize = 4200;

/// Makes `DEEP` nested directories `d` below `root/name`, with a file at the bottom, by
/// descriptors (a path that deep cannot be named). Every descriptor is owned, so a failed
/// step closes them all and the test's pool can still be unmounted.
fn make_deep_tree(root: &Path, name: &str) {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let c = |s: &str| CString::new(s).unwrap();
    let owned = |fd: i32| {
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    // SAFETY (each call below): plain syscalls on descriptors owned here.
    let mut dir = owned(unsafe {
        libc::open(
            c(root.to_str().unwrap()).as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    });
    for level in 0..=DEEP {
        let child = if level == 0 { c(name) } else { c("d") };
        let made = unsafe { libc::mkdirat(dir.as_raw_fd(), child.as_ptr(), 0o755) };
        assert_eq!(
            made,
            0,
            "level {level}: {}",
            std::io::Error::last_os_error()
        );
        dir = owned(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                child.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        });
    }
    let file = owned(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c("bottom").as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o644,
        )
    });
    assert_eq!(
        unsafe { libc::write(file.as_raw_fd(), b"deep".as_ptr().cast(), 4) },
        4
    );
}

/// The depth of the chain of `d` directories below `root/name`, and whether its bottom file
/// is there.
fn deep_tree_depth(root: &Path, name: &str) -> (usize, bool) {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let c = |s: &str| CString::new(s).unwrap();
    // SAFETY (each call below): plain syscalls on descriptors owned here.
    let fd = unsafe {
        libc::open(
            c(root.join(name).to_str().unwrap()).as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    assert!(fd >= 0, "{name} is missing");
    let mut dir = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut depth = 0;
    loop {
        let next = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c("d").as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if next < 0 {
            break;
        }
        dir = unsafe { OwnedFd::from_raw_fd(next) };
        depth += 1;
    }
    let bottom = unsafe { libc::faccessat(dir.as_raw_fd(), c("bottom").as_ptr(), libc::F_OK, 0) };
    (depth, bottom == 0)
}

/// A tree deeper than any path can name and than the open-file limit (64 here) is inspected,
/// preserved, rebuilt away and deleted: every walk holds a bounded number of directories open.
fn deep_trees_under_a_low_open_file_limit(backend: Backend) {
    let env = Env::with_backend("conf-deep", backend);
    if !env.storage().walked_by_reimage() {
        return not_applicable(
            "deep_trees_under_a_low_open_file_limit",
            backend,
            "the backend removes and measures its volumes itself, without walking them",
        );
    }
    let (a, b) = populate(&env, false);
    // Room for 8,400 directories' metadata where the volume has a size limit.
    env.run(&req("resize", "c1", json!({"size": "200MiB"})))
        .ok();
    let make = |names: &[&str]| {
        let view = env.view("c1");
        for name in names {
            make_deep_tree(&view.path, name);
        }
    };
    make(&["deep", "gone"]);
    const NOFILE: u64 = 64;
    let inspect = env.run_limited(&req("inspect", "c1", json!({})), NOFILE);
    assert!(inspect.ok()["volume"]["exists"] == true);
    env.run_limited(
        &req(
            "rebuild",
            "c1",
            json!({"source": {"image": b}, "preserve": ["/deep"]}),
        ),
        NOFILE,
    )
    .ok();
    {
        let view = env.view("c1");
        assert_eq!(deep_tree_depth(&view.path, "deep"), (DEEP, true));
        assert!(!view.path.join("gone").exists());
    }
    env.run_limited(
        &req("rebuild", "c1", json!({"source": {"image": a}})),
        NOFILE,
    )
    .ok();
    make(&["deep"]);
    env.run_limited(&req("delete", "c1", json!({})), NOFILE)
        .ok();
    assert!(!env.exists("c1"));
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// The `image.cache` a fill reported.
fn cache_of(r: &common::Run) -> String {
    r.ok()["image"]["cache"].as_str().unwrap_or("").to_owned()
}

/// Image volumes: the first fill from an image builds one (a miss), the next ones clone it
/// (hits); hit and miss both give exactly GNU tar's extraction, `preserve` works on a clone,
/// `images` names what depends on what, and `prune` removes only what no volume uses.
fn image_volumes_are_built_once_and_cloned(backend: Backend) {
    let (env, a, b) = populated("images", backend);
    if !caps(&env).image_volumes {
        return not_applicable("image volumes", backend, "the pool keeps no image volumes");
    }
    let (expected_a, expected_b) = (gnu_manifest(&env, &a), gnu_manifest(&env, &b));
    let ignore = Ignore::default();
    // `c1` was created from A by `populated`: A's image volume is there.
    let r = env.create_from("c2", &a);
    assert_eq!(cache_of(&r), "hit");
    assert_eq!(r.ok()["image"]["sha256"].as_str().map(str::len), Some(64));
    assert_same(&expected_a, &env.manifest_of("c2"), &ignore);
    // What the clone was made from is none of its snapshots (a zfs copy receives the seal).
    assert_eq!(r.ok()["volume"]["snapshots"], json!([]), "{}", r.last());
    {
        // Two clones of one image volume can be used at once (an xfs clone has a UUID of
        // its own: the kernel mounts one xfs UUID once).
        let view = env.view("c1");
        let _other = env.view("c2");
        std::fs::write(view.path.join("kept-by-preserve"), b"mine").unwrap();
    }
    let r = env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": b}, "preserve": ["/kept-by-preserve"]}),
    ));
    assert_eq!(cache_of(&r), "miss");
    {
        let view = env.view("c1");
        assert_eq!(
            std::fs::read(view.path.join("kept-by-preserve")).unwrap(),
            b"mine"
        );
    }
    // `c2`, a clone of the image volume the miss built, is checked whole below.
    let r = env.rebuild_from("c2", &b);
    assert_eq!(cache_of(&r), "hit");
    assert_same(&expected_b, &env.manifest_of("c2"), &ignore);
    // A's image volume has no clone left; B's has two.
    let listed = env.run(&json!({"api": 1, "op": "images", "pool": "default"}));
    let images = listed.ok()["images"].as_array().unwrap().clone();
    assert_eq!(images.len(), 2, "{images:?}");
    let in_use: Vec<&Value> = images
        .iter()
        .filter(|i| i["volumes"] != json!([]))
        .collect();
    assert_eq!(in_use.len(), 1, "{images:?}");
    assert_eq!(in_use[0]["volumes"], json!(["c1", "c2"]));
    assert_eq!(in_use[0]["sealed"], true);
    // Nobody can name an image volume as a volume.
    let key = in_use[0]["key"].as_str().unwrap();
    env.run(&req("delete", &format!(".reimage-image.{key}"), json!({})))
        .failed("invalid_request", 2);
    let pruned = env.run(&json!({"api": 1, "op": "prune", "pool": "default"}));
    assert_eq!(pruned.ok()["removed"].as_array().unwrap().len(), 1);
    assert_eq!(pruned.ok()["kept"][0]["key"], key);
    assert_same(&expected_b, &env.manifest_of("c2"), &ignore);
    // Deleting a clone leaves the image volume; the last one gone, prune removes it.
    env.run(&req("delete", "c2", json!({}))).ok();
    env.run(&req("delete", "c1", json!({}))).ok();
    let pruned = env.run(&json!({"api": 1, "op": "prune", "pool": "default"}));
    assert_eq!(pruned.ok()["removed"].as_array().unwrap().len(), 1);
    let listed = env.run(&json!({"api": 1, "op": "images", "pool": "default"}));
    assert_eq!(listed.ok()["images"], json!([]));
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// A miss decodes the image once, measuring while it unpacks into the image volume; the
/// rootfs prefix that needs is guessed at the image's first entry: a unified image written
/// metadata first is recognised, one written otherwise is measured first (a guess proven
/// wrong costs time, never the tree). An image the unpack refuses is refused as by measure,
/// and leaves no image volume.
fn a_miss_decodes_the_image_once(backend: Backend) {
    let env = Env::with_backend("one-pass", backend);
    if !caps(&env).image_volumes {
        return not_applicable("image volumes", backend, "the pool keeps no image volumes");
    }
    let src = env.dir.join("unified");
    std::fs::create_dir_all(src.join("rootfs/etc")).unwrap();
    std::fs::create_dir_all(src.join("templates")).unwrap();
    std::fs::write(src.join("metadata.yaml"), b"architecture: x86_64\n").unwrap();
    std::fs::write(src.join("templates/hosts.tpl"), b"tpl").unwrap();
    std::fs::write(src.join("rootfs/etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    let expected = {
        let plain = common::gnu_image(
            &env,
            &src.join("rootfs"),
            "rootfs-only.tar",
            reimage_fixtures::Compression::None,
        );
        gnu_manifest(&env, &plain)
    };
    // GNU tar --sort=name writes `./`, then `./metadata.yaml`: recognised.
    let unified = common::gnu_image(
        &env,
        &src,
        "unified.tar.zst",
        reimage_fixtures::Compression::Zstd,
    );
    let r = env.create_from("u1", &unified);
    assert_eq!(cache_of(&r), "miss");
    assert_eq!(r.ok()["image"]["rootfs_prefix"], "rootfs");
    // An image volume made at the image's size is built after the image is measured.
    let measures_first = env.storage().image_volume_sized_first();
    assert_eq!(
        r.ok()["timings_ms"].get("measure").is_some(),
        measures_first,
        "{}",
        r.last()
    );
    assert_same(&expected, &env.manifest_of("u1"), &Ignore::default());
    // The same bytes in another file: its hash finds the image volume (a hit), and no other
    // image volume is made.
    a_copy_is_a_hit(&env, &unified, "unified-copy.tar.zst", "u4", &expected);
    // `aaa/` sorts before `metadata.yaml`: taken for a root filesystem, then measured first.
    std::fs::create_dir_all(src.join("aaa")).unwrap();
    let misleading = common::gnu_image(
        &env,
        &src,
        "misleading.tar.zst",
        reimage_fixtures::Compression::Zstd,
    );
    let r = env.create_from("u2", &misleading);
    assert_eq!(cache_of(&r), "miss");
    assert_eq!(r.ok()["image"]["rootfs_prefix"], "rootfs");
    assert!(
        r.ok()["timings_ms"].get("measure").is_some(),
        "{}",
        r.last()
    );
    assert_same(&expected, &env.manifest_of("u2"), &Ignore::default());
    // Refused half-way through the unpack: the same error as where measure comes first.
    let hostile = env.image("hostile.tar");
    let mut tar = reimage_fixtures::rawtar::RawTar::new();
    tar.dir(b"etc/")
        .file(b"etc/ok", b"fine")
        .hardlink(b"etc/link", b"../../etc/passwd");
    std::fs::write(&hostile, tar.finish()).unwrap();
    let before = env.run(&json!({"api": 1, "op": "images", "pool": "default"}));
    let r = env.create_from("u3", &hostile);
    r.failed("unsafe_image", 1);
    assert!(!env.exists("u3"));
    let after = env.run(&json!({"api": 1, "op": "images", "pool": "default"}));
    assert_eq!(before.ok()["images"], after.ok()["images"]);
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// The same bytes in another file, first seen by a request that builds: the image's hash,
/// read beside the unpack, finds the image volume the pool has (for an image of thousands of
/// files the hash is read long before the unpack ends, which it stops); the fill is a hit
/// with exactly GNU tar's tree, and no image volume is added or left half-built.
fn a_copy_of_an_image_is_found_by_its_hash(backend: Backend) {
    let env = Env::with_backend("copy-found", backend);
    if !caps(&env).image_volumes {
        return not_applicable("image volumes", backend, "the pool keeps no image volumes");
    }
    let src = env.dir.join("many");
    for d in 0..40 {
        let dir = src.join(format!("d{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f:03}")), format!("{d}/{f}\n")).unwrap();
        }
    }
    let image = common::gnu_image(&env, &src, "many.tar", reimage_fixtures::Compression::None);
    let expected = gnu_manifest(&env, &image);
    assert_eq!(cache_of(&env.create_from("m1", &image)), "miss");
    let after = a_copy_is_a_hit(&env, &image, "many-copy.tar", "m2", &expected);
    assert!(after.iter().all(|i| i["sealed"] == true), "{after:?}");
}

/// Copies `image` to the image `copy` and creates `volume` from that: a hit holding
/// `expected`, with as many image volumes as before and nothing left over. Returns the
/// image volumes listed afterwards.
fn a_copy_is_a_hit(
    env: &Env,
    image: &Path,
    copy: &str,
    volume: &str,
    expected: &reimage_fixtures::Manifest,
) -> Vec<Value> {
    let images = || {
        env.run(&json!({"api": 1, "op": "images", "pool": "default"}))
            .ok()["images"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let copy = env.image(copy);
    std::fs::copy(image, &copy).unwrap();
    let before = images();
    let r = env.create_from(volume, &copy);
    assert_eq!(cache_of(&r), "hit", "{}", r.last());
    assert_same(expected, &env.manifest_of(volume), &Ignore::default());
    let after = images();
    assert_eq!(before.len(), after.len());
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
    after
}

/// A squashfs-zstd image's tree is unsquashfs' extraction, also where its blocks are stored
/// as they are (btrfs compressed extents): full, short, uncompressed, sparse and fragment
/// blocks. A block of two frames, or of a frame with a wider window than btrfs decodes with,
/// which the kernel would read otherwise, is written decoded instead.
fn squashfs_zstd_blocks_read_as_unsquashfs_reads_them(backend: Backend) {
    use reimage_fixtures::squashfs_frames;
    let env = Env::with_backend("sqfs-frames", backend);
    let src = env.dir.join("frames");
    squashfs_frames::make_tree(&src).unwrap();
    let plain = env.image("plain.sqfs");
    squashfs_frames::mksquashfs_zstd(&src, &plain).unwrap();
    let mut images = vec![("plain", plain.clone())];
    for (name, bytes) in squashfs_frames::variants(&std::fs::read(&plain).unwrap()).unwrap() {
        let image = env.image(&format!("{name}.sqfs"));
        std::fs::write(&image, bytes).unwrap();
        images.push((name, image));
    }
    for (name, image) in &images {
        let expected = common::unsquashfs_manifest(&env, image);
        env.create_from(name, image).ok();
        let view = env.view(name);
        assert_same(
            &expected,
            &reimage_fixtures::manifest(&view.path).unwrap(),
            &Ignore::default(),
        );
        if !on_btrfs(&view.path) {
            continue;
        }
        // a-big's three blocks; the replaced first one is written as bytes.
        let stored = stored_extents(&view.path.join("a-big"));
        let expected_stored = if *name == "plain" { 3 } else { 2 };
        assert_eq!(stored, expected_stored, "{name}: a-big's stored blocks");
    }
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

fn on_btrfs(path: &Path) -> bool {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "btrfs"
}

/// The file's extents that hold data as it was encoded (compressed), as filefrag lists them.
fn stored_extents(path: &Path) -> usize {
    let out = Command::new("filefrag")
        .arg("-v")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "filefrag {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("encoded"))
        .count()
}

/// Templates: a volume created or rebuilt as a writable clone of a snapshot of another volume
/// holds exactly the snapshot's content (GNU tar's extraction of the image the template was
/// filled from), not what the template holds since; `preserve` works as for an image; an
/// unknown template or snapshot is `not_found` and changes nothing; a driver without
/// templates says `unsupported`.
fn a_volume_is_filled_from_a_template(backend: Backend) {
    let (env, _a, b) = populated("template", backend);
    let template = json!({"source": {"volume": "t", "snapshot": "tpl-s1"}});
    if !caps(&env).templates {
        let r = env.run(&req("create", "n1", template));
        r.failed("unsupported", 1);
        return not_applicable("templates", backend, "no writable clones of snapshots");
    }
    let expected = gnu_manifest(&env, &b);
    let ignore = Ignore::default();
    env.create_from("t", &b).ok();
    let snap = {
        // Taken while the template is in use, as a running container's would be; what it
        // holds after the snapshot is not what its clones get.
        let view = env.view("t");
        // Written and removed again, root's mtime as before: the filesystem has changes in
        // flight (an xfs log to replay in the snapshot) and the content is the image's.
        let mtime = std::fs::metadata(&view.path).unwrap().modified().unwrap();
        std::fs::write(view.path.join("before-the-snapshot"), b"mine").unwrap();
        std::fs::remove_file(view.path.join("before-the-snapshot")).unwrap();
        std::fs::File::open(&view.path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let snap = env.take_snapshot("t", "tpl-s1");
        std::fs::write(view.path.join("after-the-snapshot"), b"later").unwrap();
        snap
    };
    let r = env.run(&req("create", "n1", template.clone()));
    assert_eq!(
        r.ok()["image"],
        json!({"volume": "t", "snapshot": "tpl-s1"}),
        "{}",
        r.last()
    );
    assert_same(&expected, &env.manifest_of("n1"), &ignore);
    {
        let view = env.view("c1");
        std::fs::write(view.path.join("kept-by-preserve"), b"mine").unwrap();
    }
    let mut rebuild = template.clone();
    rebuild["preserve"] = json!(["/kept-by-preserve"]);
    env.run(&req("rebuild", "c1", rebuild)).ok();
    {
        let view = env.view("c1");
        assert_eq!(
            std::fs::read(view.path.join("kept-by-preserve")).unwrap(),
            b"mine"
        );
        assert!(!view.path.join("after-the-snapshot").exists());
    }
    // Wrong names change nothing.
    let before = env.snapshot();
    for (source, code) in [
        (json!({"volume": "t", "snapshot": "no-such"}), "not_found"),
        (
            json!({"volume": "no-such", "snapshot": "tpl-s1"}),
            "not_found",
        ),
    ] {
        env.run(&req("rebuild", "c1", json!({"source": source})))
            .failed(code, 1);
        env.run(&req("create", "n2", json!({"source": source})))
            .failed(code, 1);
    }
    assert_eq!(before, env.snapshot());
    // The clones outlive the template: where they depend on its snapshot (zfs), the
    // template cannot be deleted with its snapshots before they are gone.
    let gone = env.run(&req("delete", "t", json!({"snapshots": "delete"})));
    if gone.status != 0 {
        gone.failed("volume_has_clones", 1);
        for clone in ["n1", "c1"] {
            env.run(&req("delete", clone, json!({}))).ok();
        }
        env.run(&req("delete", "t", json!({"snapshots": "delete"})))
            .ok();
    } else {
        // Deleted with the template's snapshots; its clones are whole.
        assert!(env.snapshot_manifest(&snap).is_none());
        assert_same(&expected, &env.manifest_of("n1"), &ignore);
    }
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// A volume refilled in place (zfs `snapshots: "keep"`) holds new content but stays a zfs
/// clone of the image volume it was filled from: `prune` parks that image volume (renamed
/// aside, no longer listed or cloned) instead of keeping it as in use, and deleting the last
/// volume that depends on it destroys it, leaving nothing of reimage's in the pool.
fn a_parked_image_volume_goes_with_its_last_holder(backend: Backend) {
    let (env, a, b) = populated("parked", backend);
    if !caps(&env).image_volumes || !caps(&env).refill {
        return not_applicable(
            "parked image volumes",
            backend,
            "no volume depends on an image volume whose content it no longer holds",
        );
    }
    let (expected_a, expected_b) = (gnu_manifest(&env, &a), gnu_manifest(&env, &b));
    let ignore = Ignore::default();
    // `c1`, a clone of A's image volume, refilled from B in place to keep its snapshot.
    let snap = env.take_snapshot("c1", "s1");
    env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": b}, "snapshots": "keep"}),
    ))
    .ok();
    let listed = env.run(&json!({"api": 1, "op": "images", "pool": "default"}));
    let images = listed.ok()["images"].as_array().unwrap().clone();
    let held: Vec<&Value> = images
        .iter()
        .filter(|i| i["holders"] == json!(["c1"]))
        .collect();
    assert_eq!(held.len(), 1, "{images:?}");
    assert_eq!(held[0]["volumes"], json!([]));
    let key = held[0]["key"].as_str().unwrap().to_owned();
    // A dry run says so and changes nothing.
    let dry = env.run(&json!({"api": 1, "op": "prune", "pool": "default", "dry_run": true}));
    assert_eq!(dry.ok()["parked"][0]["key"], key.as_str());
    assert_eq!(
        env.run(&json!({"api": 1, "op": "images", "pool": "default"}))
            .ok()["images"],
        json!(images)
    );
    let pruned = env.run(&json!({"api": 1, "op": "prune", "pool": "default"}));
    assert_eq!(
        pruned.ok()["parked"][0]["key"],
        key.as_str(),
        "{}",
        pruned.last()
    );
    assert_eq!(pruned.ok()["parked"][0]["holders"], json!(["c1"]));
    let listed = env.run(&json!({"api": 1, "op": "images", "pool": "default"}));
    assert!(
        listed.ok()["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["key"] != key.as_str()),
        "{}",
        listed.last()
    );
    // Nothing of the volume changed.
    assert_same(&expected_b, &env.manifest_of("c1"), &ignore);
    assert_same(&expected_a, &env.snapshot_manifest(&snap).unwrap(), &ignore);
    // A parked image volume is never cloned: A again builds a new one.
    let r = env.create_from("c2", &a);
    assert_eq!(cache_of(&r), "miss");
    assert_same(&expected_a, &env.manifest_of("c2"), &ignore);
    // Its last holder gone, the parked image volume goes too.
    env.run(&req("delete", "c1", json!({"snapshots": "delete"})))
        .ok();
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
    env.run(&req("delete", "c2", json!({}))).ok();
    let pruned = env.run(&json!({"api": 1, "op": "prune", "pool": "default"}));
    assert!(pruned.ok().get("parked").is_none(), "{}", pruned.last());
    let listed = env.run(&json!({"api": 1, "op": "images", "pool": "default"}));
    assert_eq!(listed.ok()["images"], json!([]));
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// Eight requests that need the same new image volume at once build it once and clone it.
fn concurrent_fills_build_an_image_volume_once(backend: Backend) {
    let (env, _a, b) = populated("images-at-once", backend);
    if !caps(&env).image_volumes {
        return not_applicable("image volumes", backend, "the pool keeps no image volumes");
    }
    let expected = gnu_manifest(&env, &b);
    let running: Vec<_> = (0..8)
        .map(|i| {
            env.spawn(&req(
                "create",
                &format!("v{i}"),
                json!({"source": {"image": b}}),
            ))
        })
        .collect();
    let mut caches = Vec::new();
    for spawned in running {
        let (status, events) = spawned.finish();
        let last = events.last().cloned().unwrap_or_default();
        assert_eq!(status, Some(0), "{last}");
        caches.push(last["image"]["cache"].as_str().unwrap_or("").to_owned());
    }
    caches.sort();
    assert_eq!(
        caches,
        ["hit"; 7]
            .iter()
            .chain(&["miss"])
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    );
    for i in 0..8 {
        assert_same(
            &expected,
            &env.manifest_of(&format!("v{i}")),
            &Ignore::default(),
        );
    }
    let listed = env.run(&json!({"api": 1, "op": "images", "pool": "default"}));
    assert_eq!(listed.ok()["images"].as_array().unwrap().len(), 2);
}

macro_rules! conformance {
    ($backend:ident = $value:expr; #[$attr:meta]; $($case:ident),* $(,)?) => {
        mod $backend {
            use super::*;
            $(
                #[test]
                #[$attr]
                fn $case() {
                    let started = std::time::Instant::now();
                    super::$case($value);
                    // The guest tiers show this for each case: where their time goes.
                    println!("{}: {} s", stringify!($case), started.elapsed().as_secs());
                }
            )*
        }
    };
}

macro_rules! all_cases {
    ($backend:ident = $value:expr; guest) => {
        all_cases!(@ $backend = $value; #[ignore = "runs inside the QEMU guest (see *_in_the_guest)"]);
    };
    // On the host: an attribute that never applies.
    ($backend:ident = $value:expr) => {
        all_cases!(@ $backend = $value; #[cfg_attr(any(), ignore)]);
    };
    (@ $backend:ident = $value:expr; #[$attr:meta]) => {
        conformance!($backend = $value; #[$attr];
            lifecycle,
            resize,
            size_grows_to_fit_the_image,
            snapshots,
            nested_volumes_are_deleted,
            a_pool_too_small_is_refused_before_anything_changes,
            a_nearly_full_pool_is_refused_before_anything_changes,
            recovery_after_a_crash,
            crash_at_every_step,
            an_exhausted_quota_is_quota_exceeded,
            busy_volumes_name_their_holder,
            hostile_names_are_refused,
            deep_trees_under_a_low_open_file_limit,
        );
    };
}

all_cases!(dir = Backend::Dir);
all_cases!(btrfs = Backend::Btrfs { quota: true });
all_cases!(btrfs_without_quota = Backend::Btrfs { quota: false });
// Image volumes: on the backends that keep them.
conformance!(btrfs_image_volumes = Backend::Btrfs { quota: true }; #[cfg_attr(any(), ignore)];
    a_copy_of_an_image_is_found_by_its_hash,
    image_volumes_are_built_once_and_cloned,
    a_parked_image_volume_goes_with_its_last_holder,
    a_miss_decodes_the_image_once,
    a_volume_is_filled_from_a_template,
    concurrent_fills_build_an_image_volume_once,
);
conformance!(zfs_image_volumes = Backend::Zfs { quota: false };
    #[ignore = "runs inside the QEMU guest (see *_in_the_guest)"];
    image_volumes_are_built_once_and_cloned,
    a_parked_image_volume_goes_with_its_last_holder,
    a_miss_decodes_the_image_once,
    a_volume_is_filled_from_a_template,
    concurrent_fills_build_an_image_volume_once,
);
conformance!(lvm_image_volumes = Backend::Lvm { thin: true, xfs: false };
    #[ignore = "runs inside the QEMU guest (see *_in_the_guest)"];
    image_volumes_are_built_once_and_cloned,
    a_miss_decodes_the_image_once,
    a_volume_is_filled_from_a_template,
    concurrent_fills_build_an_image_volume_once,
);
conformance!(lvm_image_volumes_xfs = Backend::Lvm { thin: true, xfs: true };
    #[ignore = "runs inside the QEMU guest (see *_in_the_guest)"];
    image_volumes_are_built_once_and_cloned,
    a_volume_is_filled_from_a_template,
);
// zfs with `zfs_clone = "copy"`: volumes are copies of image volumes, not clones.
conformance!(zfs_image_copies = Backend::ZfsCopies;
    #[ignore = "runs inside the QEMU guest (see *_in_the_guest)"];
    image_volumes_are_built_once_and_cloned,
    concurrent_fills_build_an_image_volume_once,
);
// Overlay: every volume's lower layer is an image volume.
all_cases!(overlay = Backend::Overlay { quota: false });
conformance!(overlay_image_volumes = Backend::Overlay { quota: false }; #[cfg_attr(any(), ignore)];
    a_copy_of_an_image_is_found_by_its_hash,
    image_volumes_are_built_once_and_cloned,
    a_miss_decodes_the_image_once,
    a_volume_is_filled_from_a_template,
    concurrent_fills_build_an_image_volume_once,
);
// A dir pool on btrfs keeps image volumes: its volumes are reflink copies of them.
all_cases!(dir_reflinks = Backend::DirReflinks);
conformance!(dir_reflinks_image_volumes = Backend::DirReflinks; #[cfg_attr(any(), ignore)];
    a_copy_of_an_image_is_found_by_its_hash,
    image_volumes_are_built_once_and_cloned,
    a_miss_decodes_the_image_once,
    a_volume_is_filled_from_a_template,
    concurrent_fills_build_an_image_volume_once,
);
// Squashfs-zstd blocks, stored as they are where the pool is on btrfs (an image volume, a
// reflink copy of one) and written decoded elsewhere (ext4 on the host).
conformance!(btrfs_squashfs = Backend::Btrfs { quota: true }; #[cfg_attr(any(), ignore)];
    squashfs_zstd_blocks_read_as_unsquashfs_reads_them);
conformance!(dir_reflinks_squashfs = Backend::DirReflinks; #[cfg_attr(any(), ignore)];
    squashfs_zstd_blocks_read_as_unsquashfs_reads_them);
conformance!(dir_squashfs = Backend::Dir; #[cfg_attr(any(), ignore)];
    squashfs_zstd_blocks_read_as_unsquashfs_reads_them);
conformance!(overlay_squashfs = Backend::Overlay { quota: false }; #[cfg_attr(any(), ignore)];
    squashfs_zstd_blocks_read_as_unsquashfs_reads_them);
all_cases!(zfs = Backend::Zfs { quota: false }; guest);
all_cases!(lvm_thin_ext4 = Backend::Lvm { thin: true, xfs: false }; guest);

// Variants that differ from a backend above only in how sizes are limited (zfs `quota`
// instead of `refquota`) or in the filesystem (xfs instead of ext4): the cases about sizes,
// snapshots, content and holders. The rest (crashes, names, pool space) do not depend on it
// and run above; emulation makes every case cost about a minute.
conformance!(zfs_quota = Backend::Zfs { quota: true };
    #[ignore = "runs inside the QEMU guest (see *_in_the_guest)"];
    lifecycle,
    resize,
    size_grows_to_fit_the_image,
    snapshots,
    an_exhausted_quota_is_quota_exceeded,
);
// A thick volume group differs from a thin pool in how space is allocated and in what
// snapshots are (thick snapshots die with their origin): the cases about sizes, space,
// snapshots and content, and a kill mid-unpack. The crash points, names, holders and nesting
// go through the same driver code and run on the thin pool above.
conformance!(lvm_thick_ext4 = Backend::Lvm { thin: false, xfs: false };
    #[ignore = "runs inside the QEMU guest (see *_in_the_guest)"];
    lifecycle,
    resize,
    size_grows_to_fit_the_image,
    snapshots,
    a_pool_too_small_is_refused_before_anything_changes,
    a_nearly_full_pool_is_refused_before_anything_changes,
    an_exhausted_quota_is_quota_exceeded,
    recovery_after_a_crash,
);
conformance!(lvm_thin_xfs = Backend::Lvm { thin: true, xfs: true };
    #[ignore = "runs inside the QEMU guest (see *_in_the_guest)"];
    lifecycle,
    resize,
    size_grows_to_fit_the_image,
    snapshots,
    an_exhausted_quota_is_quota_exceeded,
    busy_volumes_name_their_holder,
);
all_cases!(dir_prjquota_ext4 = Backend::DirQuota { xfs: false }; guest);
// Overlay with a project quota on each upper layer (ext4): the cases about sizes.
conformance!(overlay_prjquota = Backend::Overlay { quota: true };
    #[ignore = "runs inside the QEMU guest (see *_in_the_guest)"];
    lifecycle,
    resize,
    size_grows_to_fit_the_image,
    an_exhausted_quota_is_quota_exceeded,
);
// Project quotas on xfs rather than ext4: the cases about sizes, space and the walk that
// assigns a tree to its project.
conformance!(dir_prjquota_xfs = Backend::DirQuota { xfs: true };
    #[ignore = "runs inside the QEMU guest (see *_in_the_guest)"];
    lifecycle,
    resize,
    size_grows_to_fit_the_image,
    a_pool_too_small_is_refused_before_anything_changes,
    a_nearly_full_pool_is_refused_before_anything_changes,
    an_exhausted_quota_is_quota_exceeded,
    deep_trees_under_a_low_open_file_limit,
);
// A dir pool on xfs with project quotas and image volumes: reflink copies, each charged in
// full to its own project, so sizes read as for an unpacked volume.
conformance!(dir_prjquota_xfs_image_volumes = Backend::DirQuotaReflinks;
    #[ignore = "runs inside the QEMU guest (see *_in_the_guest)"];
    image_volumes_are_built_once_and_cloned,
    a_miss_decodes_the_image_once,
    concurrent_fills_build_an_image_volume_once,
    resize,
    size_grows_to_fit_the_image,
    a_nearly_full_pool_is_refused_before_anything_changes,
    an_exhausted_quota_is_quota_exceeded,
    crash_at_every_step,
);

/// The zfs cases, run inside the QEMU guest (the host kernel has no ZFS): this test boots it
/// and runs this very test binary there with `--ignored`; the guest's OpenZFS version and
/// each case's result are printed.
#[test]
fn zfs_in_the_guest() {
    common::guest::run_cases(
        &[
            "zfs::",
            "zfs_quota::",
            "zfs_image_volumes::",
            "zfs_image_copies::",
        ],
        "zfs version",
        &[64],
    );
}

/// What the guest tiers read from a guest's log: the cases that failed, and whether
/// reimage died of a memory fault (then those cases run once more; see `run_cases`).
#[test]
fn a_guest_log_names_its_failed_cases_and_crashes() {
    const LOG: &str = "failures:

---- zfs::a stdout ----
thread 'zfs::a' panicked at x
    indented::output of the case
failures:
    zfs::a
    zfs_quota::b

test result: FAILED. 1 passed; 2 failed
== /scratch/cores/core.reimage.875 (/x/reimage)
Program terminated with signal SIGSEGV, Segmentation fault.
";
    assert_eq!(common::guest::failed_cases(LOG), ["zfs::a", "zfs_quota::b"]);
    assert!(common::guest::emulator_crash(LOG));
    assert!(!common::guest::emulator_crash(
        &LOG.replace("core.reimage.", "core.zfs.")
    ));
    assert!(!common::guest::emulator_crash(
        &LOG.replace("SIGSEGV", "SIGABRT")
    ));
}

/// The lvm cases (thick ext4, thin ext4, thin xfs) inside the guest.
#[test]
fn lvm_in_the_guest() {
    // xfs fills up later than its 300 MiB minimum: 96 files of 4 MiB.
    common::guest::run_cases(&["lvm_"], "lvm version | head -n 3", &[64, 96]);
}

/// The dir driver with project quotas (ext4 and xfs) inside the guest: the host kernel has
/// no quota support.
#[test]
fn dir_prjquota_in_the_guest() {
    common::guest::run_cases(&["dir_prjquota_", "overlay_prjquota::"], "uname -r", &[64]);
}
