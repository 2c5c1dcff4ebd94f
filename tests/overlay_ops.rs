//! The overlay driver through the built binary, beyond the conformance suite: the mount spec
//! a result reports, mounted by the test as a manager would, shows exactly GNU tar's
//! extraction plus what was preserved; a rebuild resets or re-bases the upper layer; the
//! merged view is what `preserve` copies (whiteouts and opaque directories count); a mounted
//! volume is busy; an upper layer tampered with never makes reimage act outside the volume;
//! pool paths that overlay options cannot carry are refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_same, gnu_manifest, rich_image, sh, Backend, Env, View};
use reimage_fixtures::manifest::{self, Ignore, Manifest};
use reimage_fixtures::{Compression, TarFormat};
use serde_json::{json, Value};

fn env(name: &str) -> (Env, PathBuf, PathBuf) {
    let env = Env::with_backend(name, Backend::Overlay { quota: false });
    let a = rich_image(&env, "a.tar.zst", 1, TarFormat::Posix, Compression::Zstd);
    let b = rich_image(&env, "b.tar.gz", 2, TarFormat::Gnu, Compression::Gzip);
    (env, a, b)
}

fn req(op: &str, volume: &str, extra: Value) -> Value {
    let mut v = json!({"api": 1, "op": op, "pool": "default", "volume": volume});
    if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        v.extend(extra.clone());
    }
    v
}

/// The `mount` a result reports, as `mount -o` options, with its layers checked to be where
/// the pool keeps them.
fn options_of(env: &Env, result: &Value) -> String {
    let spec = &result["volume"]["mount"];
    assert_eq!(spec["type"], "overlay", "{result}");
    let layer = |key: &str| {
        let path = PathBuf::from(spec[key].as_str().unwrap());
        assert!(path.starts_with(&env.pool), "{key} {}", path.display());
        path
    };
    format!(
        "lowerdir={},upperdir={},workdir={}",
        layer("lowerdir").display(),
        layer("upperdir").display(),
        layer("workdir").display()
    )
}

/// The volume mounted from the spec in `result`, as a manager would, until dropped.
fn mounted(env: &Env, result: &Value, name: &str) -> View {
    View::mount(
        &["-t", "overlay", "-o", &options_of(env, result)],
        "overlay",
        env.dir.join(format!("mnt-{name}")),
    )
}

fn manifest_at(view: &View) -> Manifest {
    manifest::manifest(&view.path).unwrap()
}

/// GNU tar's extraction of `image` with `extra` files written into it.
fn expected_with(env: &Env, image: &Path, extra: &[(&str, &[u8])]) -> Manifest {
    let dest = env.dir.join("expected-with");
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest).unwrap();
    reimage_fixtures::gnu_extract(image, &dest).unwrap();
    for (path, bytes) in extra {
        std::fs::write(dest.join(path), bytes).unwrap();
    }
    manifest::manifest(&dest).unwrap()
}

#[test]
fn the_reported_mount_shows_the_image_and_a_rebuild_resets_or_rebases_the_upper_layer() {
    let (env, a, b) = env("overlay-mount");
    let created = env.create_from("c1", &a);
    let result = created.ok().clone();
    assert_eq!(result["image"]["cache"], "miss");
    // The merged view is exactly GNU tar's extraction.
    let ignore = Ignore::default();
    {
        let view = mounted(&env, &result, "c1");
        assert_same(&gnu_manifest(&env, &a), &manifest_at(&view), &ignore);
        // The container changes its root: a file deleted, one written.
        std::fs::remove_file(view.path.join("etc/hostname")).unwrap();
        std::fs::write(view.path.join("etc/mine"), b"kept").unwrap();
    }
    // Deleted until the rebuild: mounted again, the whiteout still hides it.
    let inspected = env.run(&req("inspect", "c1", json!({})));
    assert_eq!(inspected.ok()["volume"]["mount"], result["volume"]["mount"]);
    {
        let view = mounted(&env, inspected.ok(), "c1-again");
        assert!(!view.path.join("etc/hostname").exists());
        // While mounted, the volume is busy: no rebuild and no delete.
        env.rebuild_from("c1", &a).failed("volume_busy", 1);
        let e = env.run(&req("delete", "c1", json!({})));
        let holder = e.failed("volume_busy", 1)["details"]["holder"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(holder.contains("overlay mounted at"), "{holder}");
    }
    // The files the test wrote itself have times of their own.
    let written = Ignore {
        mtime_of: vec!["etc".into(), "etc/mine".into()],
        ..Ignore::default()
    };
    // Reset: the same image, a hit; the deleted file is back, `/etc/mine` kept by preserve.
    let reset = env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": a}, "preserve": ["/etc/mine"]}),
    ));
    assert_eq!(reset.ok()["image"]["cache"], "hit");
    assert_eq!(reset.ok()["volume"]["mount"], result["volume"]["mount"]);
    {
        let view = mounted(&env, reset.ok(), "reset");
        assert_same(
            &expected_with(&env, &a, &[("etc/mine", b"kept")]),
            &manifest_at(&view),
            &written,
        );
    }
    // Re-base: another image under the same upper and work paths, the lower layer changed.
    let rebased = env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": b}, "preserve": ["/etc/mine"]}),
    ));
    assert_eq!(rebased.ok()["image"]["cache"], "miss");
    let (before, after) = (&result["volume"]["mount"], &rebased.ok()["volume"]["mount"]);
    assert_ne!(before["lowerdir"], after["lowerdir"]);
    assert_eq!(before["upperdir"], after["upperdir"]);
    {
        let view = mounted(&env, rebased.ok(), "rebased");
        assert_same(
            &expected_with(&env, &b, &[("etc/mine", b"kept")]),
            &manifest_at(&view),
            &written,
        );
    }
    // The image volume of A has no volume left, but an overlay mounted by hand still has it
    // as its lower layer: prune keeps it while mounted, then removes it; never B's.
    let empty = env.dir.join("empty-layer");
    std::fs::create_dir_all(&empty).unwrap();
    let by_hand = View::mount(
        &[
            "-t",
            "overlay",
            "-o",
            &format!(
                "lowerdir={}:{}",
                before["lowerdir"].as_str().unwrap(),
                empty.display()
            ),
        ],
        "overlay",
        env.dir.join("mnt-by-hand"),
    );
    let pruned = env.run(&json!({"api": 1, "op": "prune", "pool": "default"}));
    assert_eq!(pruned.ok()["removed"], json!([]), "{}", pruned.last());
    assert!(pruned.ok()["kept"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["why"] == "mounted"));
    drop(by_hand);
    let pruned = env.run(&json!({"api": 1, "op": "prune", "pool": "default"}));
    assert_eq!(pruned.ok()["removed"].as_array().unwrap().len(), 1);
    assert!(Path::new(after["lowerdir"].as_str().unwrap()).is_dir());
    env.run(&req("delete", "c1", json!({}))).ok();
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// An in-place rebuild unpacks into the volume even though the pool keeps image volumes; the
/// result says `cache: "off"` and a warning says why, which an atomic rebuild never does.
#[test]
fn an_in_place_rebuild_says_it_did_not_use_the_image_volume() {
    let (env, a, _b) = env("overlay-in-place");
    env.create_from("c1", &a).ok();
    let atomic = env.rebuild_from("c1", &a);
    assert_eq!(atomic.ok()["image"]["cache"], "hit");
    assert!(atomic.warnings().is_empty(), "{:?}", atomic.warnings());
    let in_place = env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": a}, "mode": "in-place"}),
    ));
    assert_eq!(in_place.ok()["image"]["cache"], "off");
    assert_eq!(in_place.warnings(), ["image_volume_unused"]);
    {
        let view = mounted(&env, in_place.ok(), "in-place");
        assert_same(
            &gnu_manifest(&env, &a),
            &manifest_at(&view),
            &Ignore::default(),
        );
    }
    env.run(&req("delete", "c1", json!({}))).ok();
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

#[test]
fn preserve_copies_the_merged_view_lower_only_files_and_opaque_directories() {
    let (env, a, b) = env("overlay-preserve");
    let created = env.create_from("c1", &a);
    let created = created.ok().clone();
    let expected_a = gnu_manifest(&env, &a);
    {
        let view = mounted(&env, &created, "c1");
        // `/etc` replaced whole: removed and made again, it is opaque in the upper layer.
        std::fs::remove_dir_all(view.path.join("etc")).unwrap();
        std::fs::create_dir(view.path.join("etc")).unwrap();
        std::fs::write(view.path.join("etc/only"), b"the one file").unwrap();
    }
    let upper = env.pool.join("c1/upper");
    assert_eq!(
        xattr(&upper.join("etc"), "trusted.overlay.opaque").as_deref(),
        Some(b"y".as_slice())
    );
    // Preserve a file only the lower layer has (never copied up) and the opaque `/etc`.
    let lower_only = expected_a
        .keys()
        .find(|p| {
            let r = &expected_a[*p];
            p.starts_with("usr/") && r.kind == 'f' && r.link_group.is_none()
        })
        .expect("the rich image has a file under usr/ with one link")
        .clone();
    let rebuilt = env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": b}, "preserve": ["/etc", format!("/{lower_only}")]}),
    ));
    let view = mounted(&env, rebuilt.ok(), "rebuilt");
    let names: Vec<_> = std::fs::read_dir(view.path.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["only"], "the preserved /etc is the merged one");
    assert_eq!(
        manifest_at(&view)[&lower_only],
        expected_a[&lower_only],
        "a file only the old lower layer had is preserved with its metadata"
    );
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let out = Command::new("python3")
        .arg("-c")
        .arg("import os,sys; sys.stdout.buffer.write(os.getxattr(sys.argv[1], sys.argv[2], follow_symlinks=False))")
        .arg(path)
        .arg(name)
        .output()
        .unwrap();
    out.status.success().then_some(out.stdout)
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let status = Command::new("python3")
        .arg("-c")
        .arg("import os,sys; os.setxattr(sys.argv[1], sys.argv[2], sys.argv[3].encode(), follow_symlinks=False)")
        .arg(path)
        .arg(name)
        .arg(std::str::from_utf8(value).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "setxattr {name} on {}", path.display());
}

/// An upper layer tampered with (as by a container with access to it, or by hand): symlinks
/// out of the volume, whiteout devices, `trusted.overlay.*` xattrs planted on files and
/// directories. Preserve, rebuild and delete never follow or change anything outside it.
#[test]
fn a_tampered_upper_layer_never_reaches_outside_the_volume() {
    let (env, a, b) = env("overlay-tampered");
    env.create_from("c1", &a).ok();
    let outside = env.dir.join("sentinel");
    std::fs::create_dir_all(outside.join("dir")).unwrap();
    std::fs::write(outside.join("file"), b"outside").unwrap();
    std::fs::write(outside.join("dir/inner"), b"outside").unwrap();
    let sentinel = manifest::manifest(&outside).unwrap();
    let upper = env.pool.join("c1/upper");
    std::os::unix::fs::symlink(&outside, upper.join("escape")).unwrap();
    std::os::unix::fs::symlink("../../../../sentinel/file", upper.join("relative")).unwrap();
    std::fs::create_dir_all(upper.join("redirected")).unwrap();
    set_xattr(
        &upper.join("redirected"),
        "trusted.overlay.redirect",
        outside.to_str().unwrap().as_bytes(),
    );
    std::fs::create_dir_all(upper.join("opaque")).unwrap();
    set_xattr(&upper.join("opaque"), "trusted.overlay.opaque", b"y");
    std::fs::write(upper.join("metacopy"), b"").unwrap();
    set_xattr(&upper.join("metacopy"), "trusted.overlay.metacopy", b"x");
    set_xattr(
        &upper.join("metacopy"),
        "trusted.overlay.origin",
        b"garbage",
    );
    sh(Command::new("mknod")
        .arg(upper.join("whiteout"))
        .args(["c", "0", "0"]));
    let preserved = [
        "/escape",
        "/escape/file",
        "/relative",
        "/redirected",
        "/opaque",
        "/whiteout",
    ];
    // A metacopy file reads as an I/O error with metacopy off: refused, nothing changed.
    let before = env.snapshot();
    let r = env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": b}, "preserve": ["/metacopy"]}),
    ));
    let e = r.failed("driver_error", 1);
    assert!(e["message"].as_str().unwrap().contains("/metacopy"), "{e}");
    assert_eq!(env.snapshot().1, before.1);
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
    // The rest is copied as what it is: the symlinks as symlinks, nothing behind them.
    let r = env.run(&req(
        "rebuild",
        "c1",
        json!({"source": {"image": b}, "preserve": preserved}),
    ));
    r.ok();
    {
        let view = env.view("c1");
        for link in ["escape", "relative"] {
            let meta = std::fs::symlink_metadata(view.path.join(link)).unwrap();
            assert!(meta.file_type().is_symlink(), "{link}");
        }
        assert!(!view.path.join("whiteout").exists());
    }
    assert_eq!(manifest::manifest(&outside).unwrap(), sentinel);
    env.run(&req("delete", "c1", json!({}))).ok();
    assert!(!env.exists("c1"));
    assert_eq!(manifest::manifest(&outside).unwrap(), sentinel);
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// A `lower` record that is not reimage's is a clear error naming it wherever the volume's
/// content is needed (inspect, preserve), and nothing changes; a rebuild that keeps nothing
/// of the old content replaces it.
#[test]
fn a_damaged_lower_record_is_named() {
    let (env, a, b) = env("overlay-record");
    env.create_from("c1", &a).ok();
    std::fs::write(env.pool.join("c1/lower"), b"image ../../etc\n").unwrap();
    // The pool without its image volumes (a refused rebuild may have built one, to use later).
    let volumes = |env: &Env| -> Manifest {
        let mut pool = env.snapshot().0;
        pool.retain(|path, _| !path.starts_with(".reimage-image."));
        pool
    };
    let before = volumes(&env);
    let r = env.run(&req("inspect", "c1", json!({})));
    let e = r.failed("driver_error", 1);
    assert!(e["message"].as_str().unwrap().contains("c1/lower"), "{e}");
    let preserving = json!({"source": {"image": b}, "preserve": ["/etc"]});
    let e = env.run(&req("rebuild", "c1", preserving));
    assert!(e.failed("driver_error", 1)["message"]
        .as_str()
        .unwrap()
        .contains("c1/lower"));
    assert_same(&before, &volumes(&env), &Ignore::default());
    env.rebuild_from("c1", &b).ok();
    assert_same(
        &gnu_manifest(&env, &b),
        &env.manifest_of("c1"),
        &Ignore::default(),
    );
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

#[test]
fn pool_paths_overlay_options_cannot_carry_are_refused() {
    let env = Env::with_backend("overlay-config", Backend::Overlay { quota: false });
    for (pool, why) in [
        ("path = \"/srv/a:b\"\n", "`:`"),
        ("path = \"/srv/a,b\"\n", "`,`"),
        ("path = \"/srv/a b\"\n", "whitespace"),
        (
            &*format!("path = {:?}\nimage_volumes = false\n", env.pool),
            "always keeps image volumes",
        ),
    ] {
        env.write_config(&format!(
            "state_dir = {:?}\n[pools.default]\ndriver = \"overlay\"\n{pool}",
            env.state
        ));
        let r = env.run(&req("inspect", "c1", json!({})));
        let e = r.failed("config_invalid", 2);
        assert!(e["message"].as_str().unwrap().contains(why), "{e}");
    }
}
