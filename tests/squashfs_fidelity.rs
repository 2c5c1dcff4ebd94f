//! reimage's extraction of squashfs images made by mksquashfs must equal unsquashfs' own
//! extraction, for every compressor, entry for entry. Differences that come from squashfs
//! itself are listed here, not skipped silently:
//! - squashfs stores whole-second mtimes only (both extractors agree on that);
//! - mksquashfs drops POSIX ACL xattrs ("Unrecognised xattr prefix system.posix_acl_access").

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_same, unsquashfs_manifest, Env};
use reimage_fixtures::manifest::Ignore;

fn mksquashfs(src: &Path, out: &Path, comp: &str) {
    let status = Command::new("mksquashfs")
        .arg(src)
        .arg(out)
        .args(["-comp", comp, "-quiet", "-no-progress"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "mksquashfs -comp {comp}");
}

#[test]
fn every_compressor_equals_unsquashfs() {
    let env = Env::new("squashfs");
    let src = env.dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    reimage_fixtures::tree::rich(&src, 5).unwrap();
    // Compressible content too, so that blocks and fragments are really compressed.
    std::fs::write(
        src.join("usr/lib/text"),
        "all work and no play\n".repeat(40_000),
    )
    .unwrap();
    std::fs::write(
        src.join("usr/lib/small-text"),
        "tail in a fragment\n".repeat(30),
    )
    .unwrap();
    let mut first = true;
    for comp in ["gzip", "xz", "zstd", "lz4", "lzo", "lzma"] {
        let image = env.image(&format!("rich-{comp}.sqfs"));
        mksquashfs(&src, &image, comp);
        let r = if first {
            env.create_from("sq", &image)
        } else {
            env.rebuild_from("sq", &image)
        };
        first = false;
        let result = r.ok();
        assert_eq!(result["image"]["format"], "squashfs");
        assert_eq!(result["image"]["compression"], comp);
        assert_same(
            &unsquashfs_manifest(&env, &image),
            &env.manifest_of("sq"),
            &Ignore::default(),
        );
    }
}

#[test]
fn sockets_are_skipped_with_a_warning() {
    let env = Env::new("squashfs-socket");
    let src = env.dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("file"), b"kept").unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(src.join("control.sock")).unwrap();
    let image = env.image("socket.sqfs");
    mksquashfs(&src, &image, "zstd");
    let r = env.create_from("sq", &image);
    r.ok();
    assert!(r.warnings().contains(&"socket_skipped"), "{:?}", r.events);
    assert!(env.volume("sq").join("file").exists());
    assert!(!env.volume("sq").join("control.sock").exists());
}
