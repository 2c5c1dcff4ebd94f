//! Every tar dialect reimage claims, made by the tools that write them, extracted by reimage
//! and compared path by path with GNU tar's extraction of the same archive: GNU tar's sparse
//! formats (old GNU, PAX 0.0, 0.1, 1.0), ustar and v7, bsdtar's PAX with its LIBARCHIVE xattr
//! records, Python's tarfile in all its formats, and ACLs stored only as text; and the
//! constructions other projects' test archives hold: star's sparse members (written here
//! block by block, as star is not packaged), legacy lz4 (`lz4 -l`), sparse files larger than
//! ext4 holds followed by more members, global headers of keys neither tool applies, and
//! metadata Linux cannot hold (NFSv4 ACLs, xattrs over 64 KiB).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::{assert_same, gnu_manifest, Env};
use reimage_fixtures::manifest::Ignore;
use reimage_fixtures::rawtar::RawTar;
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

/// The root's mtime is not compared: these archives have no entry for it.
fn root_mtime() -> Ignore {
    Ignore {
        mtime_of: vec![".".into()],
        ..Ignore::default()
    }
}

/// Appends a star sparse member as star writes it (POSIX magic, star's time fields, the map
/// in the header where the prefix would be, or only in extension blocks): `segments` of data
/// at their offsets, `real` bytes in all.
fn star_sparse(
    tar: &mut RawTar,
    name: &[u8],
    segments: &[(u64, &[u8])],
    real: u64,
    in_header: bool,
) {
    let stored: Vec<u8> = segments.iter().flat_map(|(_, d)| d.to_vec()).collect();
    let mut h = reimage_fixtures::rawtar::Header::new(b'S', name);
    h.size = stored.len() as u64;
    let mut block = h.to_block();
    let octal = |field: &mut [u8], v: u64| {
        let text = format!("{v:0width$o}\0", width = field.len() - 1);
        field.copy_from_slice(text.as_bytes());
    };
    let mut pairs = Vec::new();
    for (offset, data) in segments {
        let mut pair = [0u8; 24];
        octal(&mut pair[..12], *offset);
        octal(&mut pair[12..], data.len() as u64);
        pairs.push(pair);
    }
    octal(&mut block[452..464], real);
    block[476..488].copy_from_slice(b"15000000000 ");
    block[488..500].copy_from_slice(b"15000000000 ");
    block[508..512].copy_from_slice(b"tar\0");
    let rest: &[[u8; 24]] = if in_header {
        let here = pairs.len().min(4);
        for (i, pair) in pairs[..here].iter().enumerate() {
            block[356 + i * 24..380 + i * 24].copy_from_slice(pair);
        }
        block[355] = u8::from(pairs.len() > 4);
        &pairs[here..]
    } else {
        &pairs
    };
    reimage_fixtures::rawtar::seal(&mut block, None);
    tar.raw(&block);
    let chunks: Vec<&[[u8; 24]]> = rest.chunks(21).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut ext = [0u8; 512];
        for (j, pair) in chunk.iter().enumerate() {
            ext[j * 24..j * 24 + 24].copy_from_slice(pair);
        }
        ext[504] = u8::from(i + 1 < chunks.len());
        tar.raw(&ext);
    }
    tar.data(&stored);
}

#[test]
fn star_sparse_members_read_as_gnu_tar_reads_them() {
    let env = Env::new("star-sparse");
    // Segments of whole blocks but the last, as star writes them (GNU tar reads each from a
    // block boundary).
    let a = noise(3072, 1);
    let b = noise(700, 2);
    let many: Vec<Vec<u8>> = (0..30)
        .map(|i| noise(if i == 29 { 100 } else { 1024 }, 10 + i))
        .collect();
    let many_segments: Vec<(u64, &[u8])> = many
        .iter()
        .enumerate()
        .map(|(i, d)| (i as u64 * 65536, d.as_slice()))
        .collect();
    for (name, in_header) in [("in-header", true), ("extension-only", false)] {
        let mut tar = RawTar::new();
        star_sparse(
            &mut tar,
            b"small",
            &[(4096, &a), (1 << 20, &b)],
            3 << 20,
            in_header,
        );
        star_sparse(&mut tar, b"many", &many_segments, 30 * 65536, in_header);
        tar.file(b"after", b"the member after them\n");
        let image = env.image(&format!("star-{name}.tar"));
        std::fs::write(&image, tar.finish()).unwrap();
        check_ignoring(&env, &image, &root_mtime());
        let small = std::fs::read(env.volume("v").join("small")).unwrap();
        // As long as the map reaches, as GNU tar makes it (not the header's 3 MiB).
        assert_eq!(small.len(), (1 << 20) + b.len());
        assert_eq!(&small[4096..4096 + a.len()], a.as_slice());
        assert_eq!(&small[1 << 20..(1 << 20) + b.len()], b.as_slice());
    }
    // A segment that is not whole blocks before the last: GNU tar reads the next one from a
    // block boundary, bsdtar right after it. Read two ways, so refused.
    let (c, d) = (noise(100, 5), noise(100, 6));
    let mut tar = RawTar::new();
    star_sparse(&mut tar, b"odd", &[(0, &c), (4096, &d)], 8192, true);
    tar.file(b"after", b"x");
    let odd = env.image("star-odd.tar");
    std::fs::write(&odd, tar.finish()).unwrap();
    env.rebuild_from("v", &odd).failed("unsafe_image", 1);
}

#[test]
fn legacy_lz4_frames_read_as_lz4_decodes_them() {
    let env = Env::new("lz4-legacy");
    let src = env.dir.join("src");
    plain_tree(&src);
    // Big enough for several 8 MiB legacy blocks.
    std::fs::write(src.join("etc/big"), noise(20 << 20, 3)).unwrap();
    let plain = env.image("plain.tar");
    run(Command::new("tar")
        .args(["--format=posix", "--numeric-owner", "-C"])
        .arg(&src)
        .arg("-cf")
        .arg(&plain)
        .arg("."));
    let legacy = env.image("legacy.tar.lz4");
    run(Command::new("lz4")
        .args(["-l", "-q", "-f"])
        .arg(&plain)
        .arg(&legacy));
    assert_eq!(
        &std::fs::read(&legacy).unwrap()[..4],
        &[0x02, 0x21, 0x4c, 0x18]
    );
    env.create_from("v", &legacy).ok();
    assert_same(
        &gnu_manifest(&env, &plain),
        &env.manifest_of("v"),
        &Ignore::default(),
    );
}

#[test]
fn global_headers_of_keys_neither_tool_applies_are_ignored() {
    let env = Env::new("pax-global-ignored");
    let image = env.image("global.tar");
    run(Command::new("python3")
        .arg("-c")
        .arg(
            "import io, sys, tarfile
with tarfile.open(sys.argv[1], 'w', format=tarfile.PAX_FORMAT,
                  pax_headers={'SCHILY.fflags': 'nodump', 'SCHILY.dev': '5', 'SCHILY.ino': '7',
                               'SCHILY.nlink': '1', 'SUN.holesdata': ' 0 1'}) as t:
    for name, data in (('a', b'first'), ('b', b'second')):
        info = tarfile.TarInfo(name); info.size = len(data); info.mtime = 1650000000
        t.addfile(info, io.BytesIO(data))",
        )
        .arg(&image));
    check_ignoring(&env, &image, &root_mtime());
    // One that sets what a member is made of stays refused: the tools differ on it.
    let mtime = env.image("global-mtime.tar");
    run(Command::new("python3")
        .arg("-c")
        .arg(
            "import io, sys, tarfile
with tarfile.open(sys.argv[1], 'w', format=tarfile.PAX_FORMAT, pax_headers={'mtime': '5'}) as t:
    info = tarfile.TarInfo('a'); info.size = 1; t.addfile(info, io.BytesIO(b'x'))",
        )
        .arg(&mtime));
    env.rebuild_from("v", &mtime).failed("unsafe_image", 1);
}

/// An archive of two files, `f` carrying the PAX records `records` (key, value of `len`
/// repetitions of `fill`).
fn pax_records_image(env: &Env, name: &str, key: &str, value: &str) -> std::path::PathBuf {
    let image = env.image(name);
    run(Command::new("python3")
        .arg("-c")
        .arg(
            "import io, sys, tarfile
with tarfile.open(sys.argv[1], 'w', format=tarfile.PAX_FORMAT) as t:
    info = tarfile.TarInfo('f'); info.size = 5; info.mtime = 1650000000
    info.pax_headers = {sys.argv[2]: sys.argv[3]}
    t.addfile(info, io.BytesIO(b'hello'))
    info = tarfile.TarInfo('g'); info.size = 2; info.mtime = 1650000000
    t.addfile(info, io.BytesIO(b'hi'))",
        )
        .arg(&image)
        .arg(key)
        .arg(value));
    image
}

#[test]
fn metadata_linux_cannot_hold_is_unsupported_before_anything_changes() {
    let env = Env::new("unholdable");
    let first = pax_records_image(&env, "first.tar", "comment", "nothing");
    env.create_from("v", &first).ok();
    let big = "x".repeat(70_000);
    for (name, key, value, attribute) in [
        (
            "nfs4.tar",
            "SCHILY.acl.ace",
            "owner@:rwxpDdaARWcCos::allow,everyone@:raRc::allow",
            "SCHILY.acl.ace",
        ),
        (
            "big-xattr.tar",
            "SCHILY.xattr.user.big",
            big.as_str(),
            "user.big",
        ),
    ] {
        let image = pax_records_image(&env, name, key, value);
        let request = |policy: &str| {
            serde_json::json!({"api": 1, "op": "rebuild", "pool": "default", "volume": "v",
                "unsupported_metadata": policy, "source": {"image": image.to_string_lossy()}})
        };
        let before = env.manifest_of("v");
        let r = env.run(&request("fail"));
        let e = r.failed("unsupported", 1);
        assert_eq!(e["details"]["attribute"], attribute, "{e}");
        assert_eq!(e["details"]["path"], "/f", "{e}");
        assert_eq!(env.manifest_of("v"), before, "{name}");
        assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
        let r = env.run(&request("warn"));
        r.ok();
        assert!(r.warnings().contains(&"xattr_failed"), "{:?}", r.events);
        assert_eq!(std::fs::read(env.volume("v").join("f")).unwrap(), b"hello");
        env.rebuild_from("v", &first).ok();
    }
}

/// A sparse file's data segments (by SEEK_DATA and SEEK_HOLE) and their bytes.
fn segments(path: &Path) -> Vec<(u64, Vec<u8>)> {
    use rustix::fs::SeekFrom;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < len {
        let Ok(start) = rustix::fs::seek(&file, SeekFrom::Data(at)) else {
            break;
        };
        let end = rustix::fs::seek(&file, SeekFrom::Hole(start)).unwrap();
        let mut bytes = vec![0u8; (end - start) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, start).unwrap();
        out.push((start, bytes));
        at = end;
    }
    out
}

#[test]
fn sparse_members_of_any_real_size_then_more_members() {
    // 20 TiB: beyond what ext4 holds in one file, so the source, GNU tar's extraction and
    // the pool are all on btrfs.
    let env = Env::with_backend("sparse-huge", common::Backend::Btrfs { quota: false });
    let mnt = env.dir.join("mnt");
    let src = mnt.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let real: u64 = 20 << 40;
    let huge = std::fs::File::create(src.join("huge")).unwrap();
    huge.set_len(real).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&huge, b"the end of 20 TiB", real - 17).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&huge, &noise(5000, 4), 3 << 40).unwrap();
    drop(huge);
    std::fs::write(src.join("next"), b"a member after it\n").unwrap();
    for (name, format) in [("gnu", "--format=gnu"), ("pax", "--format=posix")] {
        let image = env.image(&format!("huge-{name}.tar"));
        run(Command::new("tar")
            .args([format, "--sparse", "--numeric-owner", "-C"])
            .arg(&src)
            .arg("-cf")
            .arg(&image)
            .args(["huge", "next"]));
        let gnu = mnt.join(format!("gnu-{name}"));
        std::fs::create_dir_all(&gnu).unwrap();
        run(Command::new("tar")
            .arg("-xf")
            .arg(&image)
            .arg("-C")
            .arg(&gnu));
        let r = if env.volume("v").exists() {
            env.rebuild_from("v", &image)
        } else {
            env.create_from("v", &image)
        };
        r.ok();
        // Not by manifest: hashing 20 TiB of holes would take hours. The data segments, the
        // bytes in them, the size, and the member after it, each as GNU tar made them.
        let ours = env.volume("v");
        assert_eq!(segments(&ours.join("huge")), segments(&gnu.join("huge")));
        assert_eq!(
            std::fs::read(ours.join("next")).unwrap(),
            std::fs::read(gnu.join("next")).unwrap()
        );
        let made = std::fs::metadata(ours.join("huge")).unwrap();
        assert_eq!(made.len(), real);
        assert!(
            made.blocks() < 1024,
            "holes stay holes: {} blocks",
            made.blocks()
        );
        std::fs::remove_dir_all(&gnu).unwrap();
    }
    std::fs::remove_dir_all(&src).unwrap();
}
