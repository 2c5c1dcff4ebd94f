//! Every op of the contract through the built binary on the dir driver: create, rebuild from
//! an image, from another image, empty, in place; delete, inspect, measure, dry_run, preserve,
//! resize; unified LXD images; idmap; a full pool.

mod common;

use common::{assert_same, gnu_manifest, rich_image, Env};
use reimage_fixtures::manifest::Ignore;
use reimage_fixtures::{Compression, TarFormat};
use serde_json::json;
use std::os::unix::fs::MetadataExt;

#[test]
fn create_rebuild_twice_rebuild_empty_delete() {
    let env = Env::new("lifecycle");
    let a = rich_image(&env, "a.tar.gz", 1, TarFormat::Gnu, Compression::Gzip);
    let b = rich_image(&env, "b.tar.xz", 2, TarFormat::Posix, Compression::Xz);

    let created = env.create_from("c1", &a);
    let result = created.ok();
    assert_eq!(result["op"], "create");
    assert_eq!(result["volume"]["name"], "c1");
    assert_eq!(result["image"]["compression"], "gzip");
    assert!(result["timings_ms"]["unpack"].is_u64());
    assert_eq!(created.events[0]["event"], "start");
    assert_same(
        &gnu_manifest(&env, &a),
        &env.manifest_of("c1"),
        &Ignore::default(),
    );

    // A first rebuild from an image measures it while it unpacks it: its unpack progress
    // counts the image file read.
    let rebuilt = env.rebuild_from("c1", &b);
    rebuilt.ok();
    assert_same(
        &gnu_manifest(&env, &b),
        &env.manifest_of("c1"),
        &Ignore::default(),
    );
    let phases = |run: &common::Run| -> Vec<String> {
        run.events
            .iter()
            .filter(|e| e["event"] == "progress")
            .filter_map(|e| e["phase"].as_str().map(str::to_owned))
            .collect()
    };
    let unpack_progress = |run: &common::Run| {
        run.events
            .iter()
            .find(|e| e["event"] == "progress" && e["phase"] == "unpack")
            .cloned()
            .unwrap()
    };
    for phase in ["prepare", "unpack", "sync", "swap", "cleanup"] {
        assert!(
            phases(&rebuilt).iter().any(|p| p == phase),
            "no {phase} progress"
        );
    }
    assert!(!phases(&rebuilt).iter().any(|p| p == "measure"));
    let unpack = unpack_progress(&rebuilt);
    assert_eq!(unpack["unit"], "image_bytes");
    assert_eq!(unpack["total"], std::fs::metadata(&b).unwrap().len());
    assert!(rebuilt.last()["timings_ms"].get("measure").is_none());

    // A second rebuild from the first image (measured by the create): back to exactly that
    // content, the measurement from the cache and the unpack's total known.
    let again = env.rebuild_from("c1", &a);
    again.ok();
    assert!(phases(&again).iter().any(|p| p == "measure"));
    assert_eq!(
        unpack_progress(&again)["total"],
        again.last()["image"]["unpacked_bytes"]
    );
    assert_same(
        &gnu_manifest(&env, &a),
        &env.manifest_of("c1"),
        &Ignore::default(),
    );

    env.run(
        &json!({"api":1,"op":"rebuild","pool":"default","volume":"c1","source":{"empty":true}}),
    )
    .ok();
    assert_eq!(std::fs::read_dir(env.volume("c1")).unwrap().count(), 0);

    let inspect = env.run(&json!({"api":1,"op":"inspect","pool":"default","volume":"c1"}));
    assert_eq!(inspect.ok()["volume"]["exists"], true);
    assert_eq!(inspect.ok()["volume"]["pending_recovery"], false);

    env.run(&json!({"api":1,"op":"delete","pool":"default","volume":"c1"}))
        .ok();
    assert!(!env.volume("c1").exists());
    let inspect = env.run(&json!({"api":1,"op":"inspect","pool":"default","volume":"c1"}));
    assert_eq!(inspect.ok()["volume"]["exists"], false);
    assert!(env.leftovers().is_empty());
}

#[test]
fn create_refuses_an_existing_volume_and_rebuild_a_missing_one() {
    let env = Env::new("exists");
    env.run(&json!({"api":1,"op":"create","pool":"default","volume":"c1","source":{"empty":true}}))
        .ok();
    let before = env.snapshot();
    env.run(&json!({"api":1,"op":"create","pool":"default","volume":"c1","source":{"empty":true}}))
        .failed("already_exists", 1);
    env.run(
        &json!({"api":1,"op":"rebuild","pool":"default","volume":"nope","source":{"empty":true}}),
    )
    .failed("not_found", 1);
    env.run(&json!({"api":1,"op":"delete","pool":"default","volume":"nope"}))
        .failed("not_found", 1);
    assert_eq!(before, env.snapshot());
}

#[test]
fn measure_counts_exactly() {
    let env = Env::new("measure");
    let src = env.dir.join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/a"), vec![1u8; 5000]).unwrap();
    std::fs::write(src.join("b"), vec![2u8; 4096]).unwrap();
    std::fs::hard_link(src.join("b"), src.join("b2")).unwrap();
    std::os::unix::fs::symlink("d/a", src.join("s")).unwrap();
    let image = env.image("m.tar.zst");
    reimage_fixtures::gnu_tar(&src, &image, TarFormat::Gnu, Compression::Zstd).unwrap();
    let r = env.run(&json!({"api":1,"op":"measure","source":{"image": image}}));
    let img = &r.ok()["image"];
    assert_eq!(img["format"], "tar");
    assert_eq!(img["compression"], "zstd");
    assert_eq!(img["unpacked_bytes"], 9096);
    // ./, d/, d/a, b, b2 (hardlink), s
    assert_eq!(img["entries"], 6);
    assert_eq!(img["inodes"], 5);
    // 2 directories + a (2 blocks) + b (1 block)
    assert_eq!(img["allocated_bytes"], 5 * 4096);
    assert!(r.ok()["timings_ms"]["measure"].is_u64());
}

#[test]
fn dry_run_plans_and_changes_nothing() {
    let env = Env::new("dryrun");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    env.create_from("c1", &a).ok();
    let before = env.snapshot();
    let r = env.run(
        &json!({"api":1,"op":"rebuild","pool":"default","volume":"c1",
                            "source":{"empty":true},"dry_run":true}),
    );
    let plan = &r.ok()["plan"];
    assert!(plan["steps"].as_array().unwrap().len() >= 3);
    assert!(plan["available_space"].as_u64().unwrap() > 0);
    let r = env.run(
        &json!({"api":1,"op":"create","pool":"default","volume":"c2",
                            "source":{"image": a},"dry_run":true}),
    );
    assert_eq!(r.ok()["image"]["format"], "tar");
    assert_eq!(before, env.snapshot());
}

#[test]
fn preserve_copies_paths_from_the_old_volume() {
    let env = Env::new("preserve");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Posix, Compression::None);
    let b = rich_image(&env, "b.tar", 2, TarFormat::Posix, Compression::None);
    env.create_from("c1", &a).ok();
    let vol = env.volume("c1");
    std::fs::write(vol.join("etc/ssh/ssh_host_key"), b"the machine's own key").unwrap();
    std::fs::write(vol.join("home/user/notes"), b"keep me").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", vol.join("home/user/escape")).unwrap();
    let before = reimage_fixtures::manifest(&vol).unwrap();
    for mode in ["atomic", "in-place"] {
        let r = env.run(
            &json!({"api":1,"op":"rebuild","pool":"default","volume":"c1","mode": mode,
                                "source":{"image": b},
                                "preserve":["/etc/ssh/ssh_host_key", "/home/user", "/not/there"]}),
        );
        r.ok();
        assert!(r.warnings().contains(&"preserve_missing"), "{mode}");
        let after = reimage_fixtures::manifest(&vol).unwrap();
        for path in [
            "etc/ssh/ssh_host_key",
            "home/user",
            "home/user/notes",
            "home/user/escape",
            "home/user/.profile",
        ] {
            assert_eq!(before.get(path), after.get(path), "{mode}: {path}");
        }
        // The rest comes from image b.
        assert_eq!(
            std::fs::read_to_string(vol.join("etc/hostname")).unwrap(),
            "host-2\n"
        );
    }
    assert!(env.leftovers().is_empty());
}

#[test]
fn in_place_rebuild_gives_the_same_tree() {
    let env = Env::new("inplace");
    let a = rich_image(&env, "a.tar.bz2", 1, TarFormat::Gnu, Compression::Bzip2);
    let b = rich_image(&env, "b.tar.lz4", 2, TarFormat::Posix, Compression::Lz4);
    env.create_from("c1", &a).ok();
    env.run(
        &json!({"api":1,"op":"rebuild","pool":"default","volume":"c1","mode":"in-place",
                    "source":{"image": b}}),
    )
    .ok();
    assert_same(
        &gnu_manifest(&env, &b),
        &env.manifest_of("c1"),
        &Ignore::default(),
    );
    assert!(env.leftovers().is_empty());
}

#[test]
fn unified_lxd_image_unpacks_its_rootfs() {
    let env = Env::new("unified");
    let src = env.dir.join("unified");
    std::fs::create_dir_all(src.join("rootfs/etc")).unwrap();
    std::fs::create_dir_all(src.join("templates")).unwrap();
    std::fs::write(src.join("metadata.yaml"), b"architecture: x86_64\n").unwrap();
    std::fs::write(src.join("templates/hosts.tpl"), b"tpl").unwrap();
    std::fs::write(src.join("rootfs/etc/os-release"), b"ID=debian\n").unwrap();
    std::fs::write(src.join("rootfs/etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    std::fs::hard_link(src.join("rootfs/etc/hosts"), src.join("rootfs/etc/hosts2")).unwrap();
    let image = env.image("unified.tar.xz");
    reimage_fixtures::gnu_tar(&src, &image, TarFormat::Gnu, Compression::Xz).unwrap();

    let m = env.run(&json!({"api":1,"op":"measure","source":{"image": image}}));
    assert_eq!(m.ok()["image"]["rootfs_prefix"], "rootfs");
    assert_eq!(m.ok()["image"]["unpacked_bytes"], 10 + 20);
    env.create_from("c1", &image).ok();
    let vol = env.volume("c1");
    let mut names: Vec<String> = std::fs::read_dir(&vol)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["etc"]);
    assert_eq!(
        std::fs::metadata(vol.join("etc/hosts2")).unwrap().nlink(),
        2
    );

    // An explicit prefix overrides the detection: the whole image.
    env.run(
        &json!({"api":1,"op":"rebuild","pool":"default","volume":"c1",
                    "source":{"image": image, "rootfs_prefix": ""}}),
    )
    .ok();
    assert!(vol.join("metadata.yaml").exists());
    env.run(
        &json!({"api":1,"op":"rebuild","pool":"default","volume":"c1",
                    "source":{"image": image, "rootfs_prefix": "templates"}}),
    )
    .ok();
    assert!(vol.join("hosts.tpl").exists());
}

#[test]
fn idmap_shifts_owners_and_capabilities() {
    let env = Env::new("idmap");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Posix, Compression::None);
    let r = env.run(
        &json!({"api":1,"op":"create","pool":"default","volume":"c1","source":{"image": a},
                            "idmap":[{"host":1000000,"container":0,"count":65536}]}),
    );
    r.ok();
    let m = env.manifest_of("c1");
    assert_eq!((m["."].uid, m["."].gid), (1000000, 1000000));
    assert_eq!((m["home/user"].uid, m["home/user"].gid), (1001000, 1001000));
    assert_eq!(
        (m["home/user/odd-owner"].uid, m["home/user/odd-owner"].gid),
        (1012345, 1054321)
    );
    assert_eq!(m["usr/bin/su"].mode, 0o4755);
    let cap = &m["usr/bin/ping"].xattrs["security.capability"];
    assert_eq!(cap.len(), 24, "a v3 capability");
    assert_eq!(&cap[20..24], &1000000u32.to_le_bytes());

    // An id outside every range is an error, and nothing is left behind.
    let r = env.run(
        &json!({"api":1,"op":"rebuild","pool":"default","volume":"c1","source":{"image": a},
                            "idmap":[{"host":1000000,"container":0,"count":1000}]}),
    );
    r.failed("image_invalid", 1);
    assert_eq!(env.manifest_of("c1"), m);
    assert!(env.leftovers().is_empty());
}

#[test]
fn resize_without_sizes_warns() {
    let env = Env::new("resize");
    env.run(&json!({"api":1,"op":"create","pool":"default","volume":"c1","source":{"empty":true},"size":"1GiB"}))
        .ok();
    let r = env.run(&json!({"api":1,"op":"resize","pool":"default","volume":"c1","size":"2GiB"}));
    r.ok();
    assert_eq!(r.warnings(), vec!["size_ignored"]);
}

#[test]
fn a_pool_too_small_is_refused_before_the_old_volume_is_touched() {
    let mut env = Env::new("full");
    env.small_pool("6m");
    let small = env.dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    std::fs::write(small.join("f"), vec![7u8; 1 << 20]).unwrap();
    let small_image = env.image("small.tar");
    reimage_fixtures::gnu_tar(&small, &small_image, TarFormat::Gnu, Compression::None).unwrap();
    let big = env.dir.join("big");
    reimage_fixtures::tree::bulky(&big, 8, 1 << 20).unwrap();
    let big_image = env.image("big.tar.zst");
    reimage_fixtures::gnu_tar(&big, &big_image, TarFormat::Gnu, Compression::Zstd).unwrap();

    env.create_from("c1", &small_image).ok();
    let before = env.snapshot();
    let r = env.rebuild_from("c1", &big_image);
    let e = r.failed("insufficient_space", 1);
    assert!(e["details"]["needed"].as_u64().unwrap() > e["details"]["available"].as_u64().unwrap());
    // Part of the image may have been unpacked beside the old volume (the first fill from an
    // image measures while it unpacks, never past the pool's free space) and was removed.
    assert_eq!(before, env.snapshot());
    assert!(env.leftovers().is_empty());
}

#[test]
fn a_pool_without_enough_inodes_is_refused_before_the_old_volume_is_touched() {
    let mut env = Env::new("inodes");
    env.small_pool("64m,nr_inodes=40");
    env.run(&json!({"api":1,"op":"create","pool":"default","volume":"c1","source":{"empty":true}}))
        .ok();
    let src = env.dir.join("many");
    reimage_fixtures::tree::bulky(&src, 60, 10).unwrap();
    let image = env.image("many.tar");
    reimage_fixtures::gnu_tar(&src, &image, TarFormat::Gnu, Compression::None).unwrap();
    let before = env.snapshot();
    let e = env
        .rebuild_from("c1", &image)
        .failed("insufficient_space", 1)
        .clone();
    assert!(e["details"]["needed_inodes"].as_u64().unwrap() > 60);
    assert_eq!(before, env.snapshot());
}

#[test]
fn a_second_measure_of_the_same_image_comes_from_the_cache() {
    let env = Env::new("measure-cache");
    let a = rich_image(&env, "a.tar.xz", 1, TarFormat::Gnu, Compression::Xz);
    let measure = json!({"api":1,"op":"measure","source":{"image": a}});
    let unit = |r: &common::Run| {
        r.events.iter().find(|e| e["phase"] == "measure").unwrap()["unit"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let first = env.run(&measure);
    assert_eq!(unit(&first), "bytes");
    let second = env.run(&measure);
    assert_eq!(unit(&second), "cached");
    assert_eq!(first.ok()["image"], second.ok()["image"]);
    // Another rootfs_prefix or idmap is another measurement.
    let other =
        env.run(&json!({"api":1,"op":"measure","source":{"image": a, "rootfs_prefix": "usr"}}));
    assert_eq!(unit(&other), "bytes");
    // A changed image misses the cache.
    let b = rich_image(&env, "b.tar.xz", 2, TarFormat::Gnu, Compression::Xz);
    std::fs::rename(&b, &a).unwrap();
    let third = env.run(&measure);
    assert_eq!(unit(&third), "bytes");
}

/// `quota = true` on a filesystem without project quotas (this host's kernel has none): every
/// request says so with a warning, sizes are not enforced (and say so too), nothing fails.
#[test]
fn quota_without_project_quotas_is_a_warning() {
    let env = Env::new("no-prjquota");
    env.write_config(&format!("{}quota = true\n", env.default_config()));
    let r = env.run(
        &json!({"api": 1, "op": "create", "pool": "default", "volume": "q1",
                            "source": {"empty": true}, "size": "64MiB"}),
    );
    r.ok();
    let warnings = r.warnings();
    assert!(warnings.contains(&"quota_unavailable"), "{warnings:?}");
    assert!(warnings.contains(&"size_ignored"), "{warnings:?}");
    let message = r
        .events
        .iter()
        .find(|e| e["code"] == "quota_unavailable")
        .unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("prjquota"), "the fix is named: {message}");
    let inspect = env.run(&json!({"api": 1, "op": "inspect", "pool": "default", "volume": "q1"}));
    assert_eq!(inspect.ok()["volume"]["capabilities"]["size_limit"], "none");
}

/// A metadata item the volume's file system refuses (here an xattr in a namespace Linux file
/// systems do not hold, as an ACL is refused on zfs with `acltype=off`) is never dropped
/// silently: the request fails with `unsupported`, naming the path and the attribute, and
/// nothing is left; with `"unsupported_metadata": "warn"` the volume is built without it and
/// the refusal is a warning.
#[test]
fn metadata_the_filesystem_refuses_fails_unless_warned() {
    let env = Env::new("refused-xattr");
    let image = env.image("os2.tar");
    let archive = reimage_fixtures::rawtar::RawTar::new()
        .file(b"plain", b"x")
        .pax(b'x', &[("SCHILY.xattr.os2.comment", b"from OS/2")])
        .file(b"f", b"y")
        .finish();
    std::fs::write(&image, archive).unwrap();
    let create = |extra: serde_json::Value| {
        let mut request = json!({"api": 1, "op": "create", "pool": "default", "volume": "c1",
                                 "source": {"image": image}});
        if let (Some(r), Some(e)) = (request.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        env.run(&request)
    };
    let r = create(json!({}));
    let e = r.failed("unsupported", 1);
    assert!(
        e["message"].as_str().unwrap().contains("os2.comment"),
        "{e}"
    );
    assert_eq!(e["details"]["path"], "/f", "{e}");
    assert_eq!(e["details"]["attribute"], "os2.comment", "{e}");
    assert!(!env.exists("c1"));
    assert!(env.leftovers().is_empty());
    let r = create(json!({"unsupported_metadata": "warn"}));
    r.ok();
    assert_eq!(r.warnings(), vec!["xattr_failed"]);
    let r = env.run(
        &json!({"api": 1, "op": "rebuild", "pool": "default", "volume": "c1",
                            "source": {"image": image}}),
    );
    r.failed("unsupported", 1);
    assert!(env.exists("c1"));
    assert!(env.leftovers().is_empty());
}

/// A pool that keeps no image volumes says so, lists none, prunes nothing, and fills
/// volumes by unpacking (`image.cache: "off"`).
#[test]
fn a_pool_without_image_volumes_lists_and_prunes_nothing() {
    let env = Env::new("no-image-volumes");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    let r = env.create_from("c1", &a);
    assert_eq!(r.ok()["image"]["cache"], "off");
    let listed = env.run(&json!({"api": 1, "op": "images", "pool": "default"}));
    assert_eq!(listed.ok()["image_volumes"], false);
    assert_eq!(listed.ok()["images"], json!([]));
    let pruned = env.run(&json!({"api": 1, "op": "prune", "pool": "default"}));
    assert_eq!(pruned.ok()["removed"], json!([]));
    let inspected = env.run(&json!({"api": 1, "op": "inspect", "pool": "default", "volume": "c1"}));
    assert_eq!(
        inspected.ok()["volume"]["capabilities"]["image_volumes"],
        false
    );
}

/// Image volumes on a dir pool need reflinks: asked for on a filesystem without them (the
/// test machine's ext4), every request is `config_invalid`, naming the cause and the fix, and
/// nothing changes.
#[test]
fn image_volumes_without_reflinks_are_config_invalid() {
    let env = Env::new("no-reflinks");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    env.create_from("c1", &a).ok();
    let before = env.snapshot();
    env.write_config(&format!("{}image_volumes = true\n", env.default_config()));
    for request in [
        json!({"api": 1, "op": "rebuild", "pool": "default", "volume": "c1", "source": {"image": a}}),
        json!({"api": 1, "op": "images", "pool": "default"}),
    ] {
        let r = env.run(&request);
        let e = r.failed("config_invalid", 2);
        let message = e["message"].as_str().unwrap();
        assert!(message.contains("reflinks"), "{e}");
        assert!(message.contains("image_volumes"), "{e}");
    }
    assert_eq!(before, env.snapshot());
}

/// `--list-pools` prints each configured pool and its driver for scripts (the boot-time
/// recovery), reads no request, and refuses a config it cannot use as a request would.
#[test]
fn list_pools_names_each_pool_and_its_driver() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("list-pools");
    let list = || {
        std::process::Command::new(common::BIN)
            .arg("--config")
            .arg(&env.config)
            .arg("--list-pools")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let second = env.dir.join("second");
    std::fs::create_dir_all(&second).unwrap();
    env.write_config(&format!(
        "{}\n[pools.a-second]\ndriver = \"btrfs\"\npath = {second:?}\n",
        env.default_config()
    ));
    let out = list();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "a-second btrfs\ndefault dir\n"
    );
    // Writable by others: refused, with the code on stderr and nothing on stdout.
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = list();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config_insecure"));
}

/// The dir driver has no snapshots to clone: a template source is `unsupported`, and nothing
/// changes.
#[test]
fn a_template_source_is_unsupported_on_dir() {
    let env = Env::new("template-dir");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    env.create_from("c1", &a).ok();
    let before = env.snapshot();
    let source = json!({"volume": "c1", "snapshot": "s1"});
    env.run(
        &json!({"api": 1, "op": "create", "pool": "default", "volume": "c2",
                    "source": source}),
    )
    .failed("unsupported", 1);
    assert_eq!(before, env.snapshot());
}
