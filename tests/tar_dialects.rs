//! Every tar dialect reimage claims, made by the tools that write them, extracted by reimage
//! and compared path by path with GNU tar's extraction of the same archive: GNU tar's sparse
//! formats (old GNU, PAX 0.0, 0.1, 1.0), ustar and v7, bsdtar's PAX with its LIBARCHIVE xattr
//! records, Python's tarfile in all its formats, and ACLs stored only as text.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::{assert_same, gnu_manifest, Env};
use reimage_fixtures::manifest::Ignore;
use reimage_fixtures::tree::{noise, set_mtime};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Extracts `image` with reimage (create, or rebuild once the volume exists) and compares.
fn check(env: &Env, image: &Path) {
    check_ignoring(env, image, &Ignore::default());
}

fn check_ignoring(env: &Env, image: &Path, ignore: &Ignore) {
    let exists = env.volume("v").exists();
    let r = if exists {
        env.rebuild_from("v", image)
    } else {
        env.create_from("v", image)
    };
    r.ok();
    assert_same(&gnu_manifest(env, image), &env.manifest_of("v"), ignore);
}

/// bsdtar's own extraction of `image`.
fn bsdtar_manifest(env: &Env, image: &Path) -> reimage_fixtures::Manifest {
    let dest = env.dir.join(format!(
        "bsdtar-x-{}",
        image.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&dest).unwrap();
    run(Command::new("bsdtar")
        .args(["--numeric-owner", "--xattrs", "--acls", "-p", "-x", "-f"])
        .arg(image)
        .arg("-C")
        .arg(&dest));
    reimage_fixtures::manifest(&dest).unwrap()
}

#[test]
fn gnu_sparse_in_every_format() {
    let env = Env::new("sparse");
    let src = env.dir.join("src");
    reimage_fixtures::tree::sparse(&src).unwrap();
    let mut stored = None;
    for (name, args) in [
        ("old-gnu", vec!["--format=gnu", "--sparse"]),
        (
            "pax-0.0",
            vec!["--format=posix", "--sparse", "--sparse-version=0.0"],
        ),
        (
            "pax-0.1",
            vec!["--format=posix", "--sparse", "--sparse-version=0.1"],
        ),
        (
            "pax-1.0",
            vec!["--format=posix", "--sparse", "--sparse-version=1.0"],
        ),
    ] {
        let image = env.image(&format!("{name}.tar"));
        run(Command::new("tar")
            .args(&args)
            .args(["--numeric-owner", "-C"])
            .arg(&src)
            .arg("-cf")
            .arg(&image)
            .arg("."));
        check(&env, &image);
        // The holes stay holes: ten megabytes of "middle" take a few blocks.
        let m = std::fs::metadata(env.volume("v").join("middle")).unwrap();
        assert!(
            m.blocks() * 512 < 1 << 20,
            "{name}: middle takes {} bytes",
            m.blocks() * 512
        );
        // Measure counts the data the archive stores (GNU tar finds data in 512-byte blocks),
        // the same in every format, and far less than the files' 29 MiB of real size.
        let r = env.run(&serde_json::json!({"api":1,"op":"measure","source":{"image": image}}));
        let bytes = r.ok()["image"]["unpacked_bytes"].as_u64().unwrap();
        assert!(bytes < 1 << 20, "{name}: {bytes}");
        assert_eq!(*stored.get_or_insert(bytes), bytes, "{name}");
    }
}

fn plain_tree(root: &Path) {
    std::fs::create_dir_all(root.join("etc/sub")).unwrap();
    std::fs::write(root.join("etc/hostname"), b"plain\n").unwrap();
    std::fs::write(root.join("etc/sub/data"), noise(70_000, 9)).unwrap();
    std::fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname2")).unwrap();
    std::os::unix::fs::symlink("../hostname", root.join("etc/sub/link")).unwrap();
    std::os::unix::fs::chown(root.join("etc/sub/data"), Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(
        root.join("etc/sub/data"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4751),
    )
    .unwrap();
    for p in ["etc/hostname", "etc/sub/data", "etc/sub", "etc"] {
        set_mtime(&root.join(p), 1_650_000_000, 0).unwrap();
    }
    set_mtime(root, 1_650_000_000, 0).unwrap();
}

#[test]
fn ustar_and_v7() {
    let env = Env::new("ustar-v7");
    let src = env.dir.join("src");
    plain_tree(&src);
    for format in ["ustar", "v7"] {
        let image = env.image(&format!("{format}.tar"));
        run(Command::new("tar")
            .arg(format!("--format={format}"))
            .args(["--numeric-owner", "-C"])
            .arg(&src)
            .arg("-cf")
            .arg(&image)
            .arg("."));
        check(&env, &image);
    }
}

#[test]
fn bsdtar_archives() {
    let env = Env::new("bsdtar");
    let src = env.dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    reimage_fixtures::tree::rich(&src, 11).unwrap();
    for format in ["pax", "ustar", "gnutar"] {
        let image = env.image(&format!("bsdtar-{format}.tar"));
        let mut cmd = Command::new("bsdtar");
        cmd.args(["--numeric-owner", "--format", format, "-C"])
            .arg(&src)
            .arg("-cf")
            .arg(&image);
        if format == "pax" {
            cmd.args(["--xattrs", "--acls"]);
        }
        // ustar cannot hold the tree's longest names: give it only what it can hold.
        let what: &[&str] = if format == "pax" {
            &["."]
        } else {
            &["./etc", "./usr", "./dev", "./home"]
        };
        cmd.args(what);
        run(&mut cmd);
        // Documented difference: directory mtimes (see Ignore::dir_mtimes); bsdtar's own
        // extraction agrees with reimage on them too.
        check_ignoring(
            &env,
            &image,
            &Ignore {
                dir_mtimes: true,
                ..Ignore::default()
            },
        );
        assert_same(
            &bsdtar_manifest(&env, &image),
            &env.manifest_of("v"),
            &Ignore {
                mtime_of: vec![".".into()],
                ..Ignore::default()
            },
        );
    }
}

#[test]
fn python_tarfile_archives() {
    let env = Env::new("python");
    let src = env.dir.join("src");
    plain_tree(&src);
    std::fs::write(
        src.join("etc/long-".to_string() + &"n".repeat(150)),
        b"long name",
    )
    .unwrap();
    for format in ["GNU_FORMAT", "PAX_FORMAT", "USTAR_FORMAT"] {
        let image = env.image(&format!("python-{format}.tar"));
        let script = format!(
            "import tarfile, sys\n\
             with tarfile.open(sys.argv[1], 'w', format=tarfile.{format}) as t:\n\
             \x20   t.add(sys.argv[2], arcname='.')\n"
        );
        if format == "USTAR_FORMAT" {
            std::fs::remove_file(src.join("etc/long-".to_string() + &"n".repeat(150)))
                .unwrap_or(());
        }
        run(Command::new("python3")
            .arg("-c")
            .arg(&script)
            .arg(&image)
            .arg(&src));
        check(&env, &image);
    }
}

#[test]
fn acls_stored_only_as_text() {
    let env = Env::new("acl-text");
    let src = env.dir.join("src");
    std::fs::create_dir_all(src.join("shared")).unwrap();
    std::fs::write(src.join("shared/file"), b"acl").unwrap();
    // Ids without names on this machine, so GNU tar writes them as numbers.
    run(Command::new("setfacl")
        .args(["-m", "u:4242:r-x,g:4343:rw-"])
        .arg(src.join("shared/file")));
    run(Command::new("setfacl")
        .args(["-d", "-m", "u:4242:rwx"])
        .arg(src.join("shared")));
    let image = env.image("acl.tar");
    run(Command::new("tar")
        .args(["--format=posix", "--acls", "--numeric-owner", "-C"])
        .arg(&src)
        .arg("-cf")
        .arg(&image)
        .arg("."));
    let text = String::from_utf8_lossy(&std::fs::read(&image).unwrap()).into_owned();
    assert!(
        text.contains("SCHILY.acl.access") && !text.contains("SCHILY.xattr.system.posix_acl"),
        "text ACLs only"
    );
    check(&env, &image);
    let m = env.manifest_of("v");
    assert!(m["shared/file"]
        .xattrs
        .contains_key("system.posix_acl_access"));
    assert!(m["shared"].xattrs.contains_key("system.posix_acl_default"));
}
