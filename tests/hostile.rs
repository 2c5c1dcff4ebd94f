//! The hostile corpus (fixtures/src/hostile.rs), every case rebuilt onto a volume that holds
//! real content, next to a neighbour volume, with sentinels outside the pool and a probe path
//! on the host that an escape would create. For every case: no crash or panic (the run ends
//! with a result or error event and exit 0 or 1); nothing outside the volume changes; the
//! probe never appears; a refusal carries the expected code and a message that names the
//! entry or offset, and leaves the old content intact; a case that unpacks has the entry the
//! archive's last word gives it.

mod common;

use std::path::PathBuf;

use common::{rich_image, Env};
use reimage_fixtures::hostile::{self, Case, Expect};
use reimage_fixtures::{Compression, TarFormat};

fn probe() -> PathBuf {
    PathBuf::from(format!("/run/reimage-hostile-probe-{}", std::process::id())).join("escaped")
}

fn run_corpus(name: &str, cases: Vec<Case>) -> usize {
    let env = Env::new(name);
    let probe = probe();
    let probe_rel = probe.to_string_lossy().trim_start_matches('/').to_owned();
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    env.create_from("c1", &a).ok();
    env.create_from("n1", &a).ok();
    let neighbour = env.manifest_of("n1");
    let sentinel = env.dir.join("sentinel");
    std::fs::create_dir_all(sentinel.join("dir")).unwrap();
    std::fs::write(sentinel.join("file"), b"outside").unwrap();
    std::fs::write(
        env.dir.join("escape"),
        b"a decoy where ../escape would land",
    )
    .unwrap();
    let outside = || {
        (
            reimage_fixtures::manifest(&sentinel).unwrap(),
            std::fs::read(env.dir.join("escape")).unwrap(),
            std::fs::read_dir(&env.dir).unwrap().count(),
        )
    };
    let outside_before = outside();
    let count = cases.len();
    for case in cases {
        let image = env.image(&format!("{}.img", case.name));
        std::fs::write(&image, &case.bytes).unwrap();
        let before = env.manifest_of("c1");
        let r = env.rebuild_from("c1", &image);
        let last = r.last().clone();
        let name = &case.name;
        assert!(
            r.status == 0 || r.status == 1,
            "{name}: exit {} (crash?)\n{}",
            r.status,
            r.stderr
        );
        assert!(
            last["event"] == "result" || last["event"] == "error",
            "{name}: {last}"
        );
        let refused = |codes: &[&str]| {
            assert_eq!(
                last["event"], "error",
                "{name}: expected a refusal, got {last}"
            );
            assert!(
                codes.contains(&last["code"].as_str().unwrap()),
                "{name}: {last}"
            );
            let message = last["message"].as_str().unwrap();
            assert!(
                message.contains("entry")
                    || message.contains("offset")
                    || message.contains("squashfs")
                    || message.contains("image"),
                "{name}: {message}"
            );
            assert_eq!(
                before,
                env.manifest_of("c1"),
                "{name}: the old volume changed"
            );
        };
        match &case.expect {
            Expect::Refused(codes) => refused(codes),
            Expect::Either(codes) => {
                if last["event"] == "error" {
                    refused(codes);
                }
            }
            Expect::Unpacks { path, kind } => {
                assert_eq!(
                    last["event"], "result",
                    "{name}: expected to unpack, got {last}"
                );
                let path = if *path == "PROBE" {
                    probe_rel.as_str()
                } else {
                    path
                };
                let m = env.manifest_of("c1");
                let got = m.get(path).map(|r| r.kind);
                assert_eq!(got, Some(*kind), "{name}: {path} in the volume");
            }
        }
        assert!(
            !probe.exists() && !probe.parent().unwrap().exists(),
            "{name}: escaped to the host"
        );
        assert_eq!(
            outside_before,
            outside(),
            "{name}: something outside the pool changed"
        );
        assert_eq!(
            neighbour,
            env.manifest_of("n1"),
            "{name}: the neighbour volume changed"
        );
        assert!(env.leftovers().is_empty(), "{name}: temporary volumes left");
        std::fs::remove_file(&image).unwrap();
    }
    count
}

#[test]
fn hostile_tar_corpus() {
    let cases = hostile::tar_cases(&probe());
    let n = run_corpus("hostile-tar", cases);
    assert!(n >= 60, "{n} tar cases");
}

#[test]
fn hostile_squashfs_corpus() {
    let work = std::env::temp_dir().join(format!("reimage-hostile-sq-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let cases = hostile::squashfs_cases(&work);
    std::fs::remove_dir_all(&work).unwrap();
    let n = run_corpus("hostile-squashfs", cases.unwrap());
    assert!(n >= 20, "{n} squashfs cases");
}

#[test]
fn a_gzip_bomb_unpacks_as_holes() {
    let env = Env::new("bomb");
    let bytes = hostile::gzip_bomb(&env.dir, 256 << 20).unwrap();
    assert!(bytes.len() < 1 << 20);
    let image = env.image("bomb.tar.gz");
    std::fs::write(&image, bytes).unwrap();
    env.create_from("c1", &image).ok();
    let meta = std::fs::metadata(env.volume("c1").join("zeros")).unwrap();
    assert_eq!(meta.len(), 256 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 <= 4096,
        "zeros become holes"
    );
}

/// Inputs the fuzzers found (fixtures/regressions): each is refused cleanly, nothing changes.
#[test]
fn fuzzer_findings_stay_fixed() {
    let env = Env::new("regressions");
    let a = rich_image(&env, "a.tar", 1, TarFormat::Gnu, Compression::None);
    env.create_from("c1", &a).ok();
    let before = env.manifest_of("c1");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/regressions");
    let mut n = 0;
    for file in std::fs::read_dir(dir).unwrap().flatten() {
        let image = env.image(&file.file_name().to_string_lossy());
        std::fs::copy(file.path(), &image).unwrap();
        let r = env.rebuild_from("c1", &image);
        assert!(
            r.status == 0 || r.status == 1,
            "{:?}: exit {}",
            file.path(),
            r.status
        );
        if r.last()["event"] == "error" {
            assert_eq!(before, env.manifest_of("c1"));
        }
        n += 1;
    }
    assert!(n >= 1);
}
