//! A real Debian root filesystem (debootstrap minbase with systemd, openssh-server, python3,
//! sudo and ping: 10,000+ entries, setuid binaries, file capabilities), packed by GNU tar in
//! several compressions and by mksquashfs, rebuilt by reimage and compared file by file with
//! GNU tar's and unsquashfs' own extractions. `scripts/test` provides the tree (built once and
//! cached) in REIMAGE_ROOTFS.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{assert_same, gnu_manifest, Env};
use reimage_fixtures::manifest::Ignore;
use serde_json::json;

fn rootfs() -> Option<PathBuf> {
    match std::env::var_os("REIMAGE_ROOTFS") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("SKIPPED: set REIMAGE_ROOTFS to a debootstrapped tree (scripts/test does)");
            None
        }
    }
}

fn sh(cmd: &str) {
    let status = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(status.success(), "{cmd}");
}

#[test]
fn debian_rootfs_equals_gnu_tar_and_unsquashfs() {
    let Some(tree) = rootfs() else { return };
    let env = Env::new("debian");
    let tar = env.image("rootfs.tar");
    sh(&format!(
        "tar --numeric-owner --format=posix --xattrs --xattrs-include='*' --acls -C {} -cf {} .",
        tree.display(),
        tar.display()
    ));
    let t = tar.display();
    sh(&format!(
        "gzip -1 -c {t} > {t}.gz && zstd -q -T2 -3 {t} -o {t}.zst && xz -T2 -1 -c {t} > {t}.xz"
    ));
    let expected = gnu_manifest(&env, &tar);
    let mut first = true;
    for suffix in ["", ".zst", ".gz", ".xz"] {
        let image = env.image(&format!("rootfs.tar{suffix}"));
        let r = if first {
            env.create_from("debian", &image)
        } else {
            env.rebuild_from("debian", &image)
        };
        first = false;
        let img = r.ok()["image"].clone();
        assert!(img["entries"].as_u64().unwrap() > 10_000, "{img}");
        assert_same(&expected, &env.manifest_of("debian"), &Ignore::default());
        eprintln!("{suffix:>4}: {}", r.ok()["timings_ms"]);
    }
    // The same tree as squashfs, compared with unsquashfs' extraction. (mksquashfs drops
    // POSIX ACL xattrs; both extractions lack them alike.)
    for comp in ["zstd", "xz"] {
        let image = env.image(&format!("rootfs-{comp}.sqfs"));
        sh(&format!(
            "mksquashfs {} {} -comp {comp} -quiet -no-progress >/dev/null 2>&1",
            tree.display(),
            image.display()
        ));
        env.rebuild_from("debian", &image).ok();
        let dest = env.dir.join(format!("unsquashfs-{comp}"));
        sh(&format!(
            "unsquashfs -q -n -d {} {} >/dev/null",
            dest.display(),
            image.display()
        ));
        let expected = reimage_fixtures::manifest(&dest).unwrap();
        assert_same(&expected, &env.manifest_of("debian"), &Ignore::default());
        std::fs::remove_dir_all(&dest).unwrap();
        std::fs::remove_file(&image).unwrap();
    }
    env.run(&json!({"api":1,"op":"delete","pool":"default","volume":"debian"}))
        .ok();
}
