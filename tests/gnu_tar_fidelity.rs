//! reimage's extraction must equal GNU tar's, entry for entry, for archives GNU tar made:
//! every file type, owners, modes with setuid/setgid/sticky, nanosecond and zero mtimes,
//! xattrs (security.capability included), hardlink groups, long and non-UTF-8 names.

mod common;

use common::{assert_same, gnu_manifest, rich_image, Env};
use reimage_fixtures::manifest::Ignore;
use reimage_fixtures::{Compression, TarFormat};

fn check(format: TarFormat, compression: Compression) {
    let env = Env::new(&format!("fidelity-{format:?}-{}", compression.name()));
    let image = rich_image(
        &env,
        &format!("rich.{}", compression.name()),
        7,
        format,
        compression,
    );
    env.create_from("c1", &image).ok();
    let expected = gnu_manifest(&env, &image);
    assert_same(&expected, &env.manifest_of("c1"), &Ignore::default());
    assert!(env.leftovers().is_empty());
}

#[test]
fn gnu_format_every_compression() {
    for c in Compression::ALL {
        check(TarFormat::Gnu, c);
    }
}

#[test]
fn posix_format_every_compression() {
    for c in Compression::ALL {
        check(TarFormat::Posix, c);
    }
}

/// The compressors GNU tar reaches through external programs and bsdtar reads in-process,
/// each run as its own tool: `compress` (.Z), lzip, legacy lzma (`xz --format=lzma`), lzop,
/// `pzstd` (a skippable frame first), and lz4 behind a skippable frame. Each extraction equals
/// GNU tar's of the plain archive; a damaged lzip or lzop file (both carry checksums) is
/// refused with the volume unchanged.
#[test]
fn every_compressor_real_tools_write() {
    let env = Env::new("fidelity-more-compressors");
    let plain = rich_image(&env, "rich.tar", 7, TarFormat::Posix, Compression::None);
    let expected = gnu_manifest(&env, &plain);
    let tool = |name: &str, cmd: &str| {
        let out = env.image(name);
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{{ {cmd}; }} < \"$0\" > \"$1\""))
            .arg(&plain)
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "{cmd}");
        out
    };
    let images = [
        ("compress", tool("rich.tar.Z", "compress -c -f")),
        ("lzip", tool("rich.tar.lz", "lzip -c")),
        ("lzma", tool("rich.tar.lzma", "xz --format=lzma -c")),
        ("lzo", tool("rich.tar.lzo", "lzop -c")),
        ("zstd", tool("rich.tar.pzst", "pzstd -q -c -p 2")),
        // Multi-block (decoded on several threads), and two streams with padding between.
        ("xz", tool("rich.tar.mt.xz", "xz -T2 --block-size=65536 -c")),
        (
            "xz",
            tool(
                "rich.tar.cat.xz",
                "head -c 70000 | xz -c && printf '\\000\\000\\000\\000' && \
                 tail -c +70001 \"$0\" | xz -c",
            ),
        ),
        (
            "lz4",
            tool(
                "rich.tar.slz4",
                "printf 'P*M\\030\\004\\000\\000\\000user' && lz4 -q -c",
            ),
        ),
    ];
    for (compression, image) in &images {
        let exists = env.exists("c1");
        let r = if exists {
            env.rebuild_from("c1", image)
        } else {
            env.create_from("c1", image)
        };
        assert_eq!(r.ok()["image"]["compression"], *compression, "{image:?}");
        assert_same(&expected, &env.manifest_of("c1"), &Ignore::default());
    }
    let before = env.manifest_of("c1");
    for (compression, image) in &images[1..4] {
        if *compression == "lzma" {
            continue; // lzma-alone has no checksum
        }
        let mut bytes = std::fs::read(image).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        let damaged = env.image(&format!("damaged.{compression}"));
        std::fs::write(&damaged, bytes).unwrap();
        env.rebuild_from("c1", &damaged).failed("image_invalid", 1);
        assert_same(&before, &env.manifest_of("c1"), &Ignore::default());
    }
    // Formats that are recognised but not read.
    let zip = env.image("archive.zip");
    std::fs::write(&zip, b"PK\x03\x04\x14\x00\x00\x00\x00\x00rest-of-a-zip").unwrap();
    env.rebuild_from("c1", &zip).failed("image_unsupported", 1);
    let cpio = env.image("archive.cpio");
    std::fs::write(&cpio, b"070701000000000000000000000000000000").unwrap();
    env.rebuild_from("c1", &cpio).failed("image_unsupported", 1);
    assert!(env.leftovers().is_empty());
}
