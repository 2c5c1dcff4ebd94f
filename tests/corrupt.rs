//! Corrupt images of every kind: each compression and each squashfs compressor, truncated at
//! many offsets and with bits flipped at many places. Whatever the damage: no crash, and
//! either a refusal (image_invalid and friends) with the old volume intact, or — where the
//! format has no checksum over the damaged bytes (plain tar data, squashfs data) — a tree
//! confined to the volume. Truncation is always refused.

mod common;

use std::path::Path;
use std::process::Command;

use common::{rich_image, Env};
use reimage_fixtures::{Compression, TarFormat};

const REFUSALS: &[&str] = &["image_invalid", "image_unsupported", "unsafe_image"];

fn damage(env: &Env, name: &str, good: &[u8], offsets: &[usize], flip: bool) -> usize {
    let before = env.manifest_of("c1");
    let mut refused = 0;
    for &at in offsets {
        let bytes = if flip {
            let mut b = good.to_vec();
            b[at] ^= 0x10;
            b
        } else {
            good[..at].to_vec()
        };
        let image = env.image(&format!("{name}-{at}.img"));
        std::fs::write(&image, &bytes).unwrap();
        let r = env.rebuild_from("c1", &image);
        assert!(
            r.status == 0 || r.status == 1,
            "{name} at {at}: exit {} (crash?)\n{}",
            r.status,
            r.stderr
        );
        let last = r.last();
        if last["event"] == "error" {
            assert!(
                REFUSALS.contains(&last["code"].as_str().unwrap()),
                "{name} at {at}: {last}"
            );
            assert_eq!(
                before,
                env.manifest_of("c1"),
                "{name} at {at}: the old volume changed"
            );
            refused += 1;
        } else {
            assert!(flip, "{name}: a truncation at {at} was accepted");
            // Accepted: put the old content back for the next case.
            env.rebuild_from("c1", &env.image("a.tar")).ok();
        }
        assert!(env.leftovers().is_empty());
        std::fs::remove_file(&image).unwrap();
    }
    refused
}

fn offsets(len: usize, n: usize) -> Vec<usize> {
    (1..=n)
        .map(|i| (len * i / (n + 1)).max(1))
        .chain([len - 1])
        .collect()
}

/// `meaningful` bytes of the image carry content; what follows is padding (tar's records,
/// squashfs' 4 KiB alignment) that may go without loss.
fn check(env: &Env, name: &str, image: &Path, meaningful: usize, checksummed: bool) {
    let good = std::fs::read(image).unwrap();
    let cuts = offsets(meaningful, 12);
    let refused = damage(env, &format!("{name}-cut"), &good, &cuts, false);
    assert_eq!(refused, cuts.len(), "{name}: every truncation refused");
    let flips = offsets(good.len(), 12);
    let refused = damage(env, &format!("{name}-flip"), &good, &flips, true);
    eprintln!(
        "{name}: {} truncations refused, {refused} of {} bit flips refused",
        cuts.len(),
        flips.len()
    );
    if checksummed {
        // A flip in the last byte may hit padding after the checksum; all others are caught.
        assert!(
            refused >= flips.len() - 1,
            "{name}: only {refused} of {} flips caught",
            flips.len()
        );
    }
}

/// Where an uncompressed tar's end-of-archive marker ends (its first all-zero block + 512).
fn end_of_archive(tar: &[u8]) -> usize {
    let mut at = 0;
    while at + 512 <= tar.len() {
        let block = &tar[at..at + 512];
        if block.iter().all(|&b| b == 0) {
            return at + 512;
        }
        let size = std::str::from_utf8(&block[124..135])
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim_matches(|c| c == ' ' || c == '\0'), 8).ok())
            .unwrap_or(0);
        at += 512 + (size as usize).div_ceil(512) * 512;
    }
    tar.len()
}

#[test]
fn every_tar_compression() {
    let env = Env::new("corrupt-tar");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    env.create_from("c1", &a).ok();
    for c in Compression::ALL {
        let image = rich_image(&env, &format!("b.{}", c.name()), 2, TarFormat::Posix, c);
        // gzip, xz, bzip2 carry checksums over all data; zstd and lz4 frames from their
        // command-line tools carry content checksums too.
        let len = std::fs::metadata(&image).unwrap().len() as usize;
        // Uncompressed, the archive ends with its two zero blocks, then record padding.
        let meaningful = if c == Compression::None {
            end_of_archive(&std::fs::read(&image).unwrap())
        } else {
            len
        };
        check(&env, c.name(), &image, meaningful, c != Compression::None);
    }
}

#[test]
fn every_squashfs_compressor() {
    let env = Env::new("corrupt-sqfs");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    env.create_from("c1", &a).ok();
    let src = env.dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    reimage_fixtures::tree::rich(&src, 3).unwrap();
    std::fs::write(src.join("text"), "compressible\n".repeat(50_000)).unwrap();
    for comp in ["gzip", "xz", "zstd", "lz4", "lzo"] {
        let image = env.image(&format!("b-{comp}.sqfs"));
        let status = Command::new("mksquashfs")
            .arg(&src)
            .arg(&image)
            .args(["-comp", comp, "-quiet", "-no-progress"])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        // squashfs has no checksums: flips in data may pass; the tree stays confined.
        let bytes = std::fs::read(&image).unwrap();
        let bytes_used = u64::from_le_bytes(bytes[40..48].try_into().unwrap()) as usize;
        check(&env, &format!("squashfs-{comp}"), &image, bytes_used, false);
    }
}
