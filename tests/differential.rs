//! Parser differentials: every archive of the hostile corpus and of the dialect corpus
//! (archives written by GNU tar, bsdtar and Python's tarfile in each of their formats, sparse
//! ones included) is extracted by GNU tar and by bsdtar, and by reimage.
//!
//! - Where the two tools build the same tree, reimage either refuses the archive or builds
//!   exactly that tree.
//! - Where they build different trees, reimage refuses it — unless the difference is one of
//!   the extraction *policies* listed in [`POLICY`] (how a tool confines a hostile path, not
//!   how it reads the archive), where reimage's confinement is documented in SECURITY.md.
//!
//! The reference tools run as root on hostile archives, so each runs in a mount namespace of
//! its own in which every mount is read-only but its destination directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Env;
use reimage_fixtures::hostile;
use reimage_fixtures::manifest::{self, Ignore, Manifest};

/// Hostile cases where reimage's tree differs from a tool's by extraction *policy*, with the
/// reason; every one reads the archive's members alike, and none leaves the volume.
const POLICY: &[(&str, &str)] = &[
    ("through-dotdot-link", CONFINED),
    ("through-root-link", CONFINED),
    ("link-chain", CONFINED),
    ("mkdir-through-link", CONFINED),
    ("dir-through-link", CONFINED),
    ("dup-dir-then-file", REPLACED),
    ("dup-dir-then-symlink", REPLACED),
    ("dup-dir-then-hardlink", REPLACED),
    ("dup-dir-then-fifo", REPLACED),
    ("dup-dir-then-device", REPLACED),
    ("dup-symlink-then-file", NOT_THROUGH),
    ("dup-symlink-then-fifo", NOT_THROUGH),
    ("dup-symlink-then-device", NOT_THROUGH),
];
/// GNU tar defers a symlink that points outside and bsdtar refuses to write through one; reimage
/// resolves every parent inside the volume, where such a link lands.
const CONFINED: &str = "symlinks in parents resolve inside the volume";
/// The tools cannot remove a non-empty directory and keep it; reimage's last entry wins.
const REPLACED: &str = "a later entry replaces a non-empty directory";
/// GNU tar writes some types through an existing symlink, bsdtar replaces it; reimage
/// replaces it.
const NOT_THROUGH: &str = "a later entry replaces a symlink, never writes through it";

/// Runs `tool` with `args` in a private mount namespace where only `dest` is writable.
fn sandboxed(dest: &Path, tool: &str, args: &[&str], image: &Path) -> bool {
    const SCRIPT: &str = r#"dest=$1; shift
mount --bind "$dest" "$dest"
awk '{print $5}' /proc/self/mountinfo | while read -r m; do
    [ "$m" = "$dest" ] || mount -o remount,bind,ro "$m" 2>/dev/null
done
if touch /run/.reimage-sandbox-probe 2>/dev/null; then
    rm -f /run/.reimage-sandbox-probe
    echo "the sandbox is writable outside $dest" >&2
    exit 99
fi
cd "$dest" && exec "$@""#;
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            SCRIPT,
            "sh",
        ])
        .arg(dest)
        .arg(tool)
        .args(args)
        .arg(image)
        .output()
        .unwrap();
    assert_ne!(
        out.status.code(),
        Some(99),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
}

/// The tree a reference tool extracts from `image` (whatever its exit status: a tool that
/// skips a member it refuses still extracts the rest).
fn extracted(dir: &Path, tool: &str, image: &Path) -> Manifest {
    let dest = dir.join(format!(
        "{tool}-{}",
        image.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest).unwrap();
    let args: &[&str] = match tool {
        "tar" => &[
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "-p",
            "-x",
            "-f",
        ],
        _ => &["--numeric-owner", "--xattrs", "--acls", "-p", "-x", "-f"],
    };
    sandboxed(&dest, tool, args, image);
    // A tree too deep for path-based reading is named as such.
    let m = manifest::manifest(&dest).unwrap_or_else(|e| {
        let mut m = Manifest::new();
        m.insert(format!("<unreadable: {e}>"), dummy_record());
        m
    });
    let _ = Command::new("rm").arg("-rf").arg(&dest).status();
    m
}

fn dummy_record() -> manifest::Record {
    manifest::Record {
        kind: '?',
        mode: 0,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: (0, 0),
        link: None,
        rdev: 0,
        xattrs: Default::default(),
        sha256: None,
        link_group: None,
    }
}

/// What one archive came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The tools agree and reimage built their tree.
    Same,
    /// The tools agree and reimage refused the archive.
    RefusedAgreed,
    /// The tools disagree and reimage refused it.
    RefusedDisagreed,
    /// reimage unpacked it, and differs from a tool by an extraction policy in [`POLICY`].
    Policy,
}

/// Directories the extraction made itself (the root, and parents the archive does not list),
/// whose mtimes are the time of extraction: everything the archive gives is older.
fn made_now(m: &Manifest, started: i64) -> Vec<String> {
    let mut out = vec![".".to_owned()];
    out.extend(
        m.iter()
            .filter(|(_, r)| r.kind == 'd' && r.mtime.0 >= started)
            .map(|(p, _)| p.clone()),
    );
    out
}

fn check(env: &Env, name: &str, image: &Path, started: i64) -> Result<Outcome, String> {
    let gnu = extracted(&env.dir, "tar", image);
    let bsd = extracted(&env.dir, "bsdtar", image);
    // GNU tar also leaves directory mtimes at extraction time for archives that return to a
    // directory (bsdtar's order), which is an extraction artefact, not a reading.
    let tools = Ignore {
        mtime_of: made_now(&bsd, started),
        dir_mtimes: true,
        whole_seconds: false,
    };
    let agree = manifest::diff(&gnu, &bsd, &tools).is_empty();
    let r = if env.exists("v") {
        env.rebuild_from("v", image)
    } else {
        env.create_from("v", image)
    };
    let last = r.last().clone();
    if r.status != 0 && r.status != 1 {
        return Err(format!("{name}: exit {}: {}", r.status, r.stderr));
    }
    let policy = POLICY.iter().any(|(case, _)| *case == name);
    if last["event"] == "error" {
        let code = last["code"].as_str().unwrap_or_default().to_owned();
        if !["unsafe_image", "image_invalid", "image_unsupported"].contains(&code.as_str()) {
            return Err(format!("{name}: {last}"));
        }
        return Ok(if agree {
            Outcome::RefusedAgreed
        } else {
            Outcome::RefusedDisagreed
        });
    }
    if !agree {
        if policy {
            return Ok(Outcome::Policy);
        }
        let d = manifest::diff(&gnu, &bsd, &tools);
        return Err(format!(
            "{name}: GNU tar and bsdtar read it two ways, and reimage did not refuse it:\n{}",
            d.join("\n")
        ));
    }
    if policy {
        return Ok(Outcome::Policy);
    }
    let mine = env.manifest_of("v");
    let mut ours = Ignore {
        mtime_of: made_now(&bsd, started),
        dir_mtimes: false,
        whole_seconds: false,
    };
    ours.mtime_of.extend(made_now(&mine, started));
    let d = manifest::diff(&bsd, &mine, &ours);
    if !d.is_empty() {
        return Err(format!(
            "{name}: GNU tar and bsdtar agree, reimage differs:\n{}",
            d.join("\n")
        ));
    }
    Ok(Outcome::Same)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Packs the tree `src` into `image` with `cmd` (GNU tar or bsdtar). Formats that cannot
/// hold the rich tree's longest names (ustar, v7) leave those out and exit non-zero, so only
/// the archive's existence is required.
fn pack(mut cmd: Command, src: &Path, image: &Path) {
    let _ = cmd
        .arg("-C")
        .arg(src)
        .arg("-cf")
        .arg(image)
        .arg(".")
        .output();
    assert!(image.exists(), "{cmd:?}");
}

/// The dialect corpus: the rich tree (and a sparse one) written by every tool and format
/// reimage claims.
fn dialects(env: &Env) -> Vec<(String, PathBuf)> {
    let rich = env.dir.join("src-rich");
    reimage_fixtures::tree::rich(&rich, 7).unwrap();
    let sparse = env.dir.join("src-sparse");
    reimage_fixtures::tree::sparse(&sparse).unwrap();
    let mut out = Vec::new();
    for (format, xattrs) in [
        ("gnu", true),
        ("oldgnu", false),
        ("posix", true),
        ("ustar", false),
        ("v7", false),
    ] {
        let image = env.image(&format!("gnu-{format}.tar"));
        let mut cmd = Command::new("tar");
        cmd.args(["--numeric-owner", "--sort=name"])
            .arg(format!("--format={format}"));
        if xattrs {
            cmd.args(["--xattrs", "--xattrs-include=*", "--acls"]);
        }
        pack(cmd, &rich, &image);
        out.push((format!("gnu-{format}"), image));
    }
    for (name, args) in [
        ("old-gnu", &["--format=gnu"][..]),
        ("pax-0.0", &["--format=posix", "--sparse-version=0.0"]),
        ("pax-0.1", &["--format=posix", "--sparse-version=0.1"]),
        ("pax-1.0", &["--format=posix", "--sparse-version=1.0"]),
    ] {
        let image = env.image(&format!("sparse-{name}.tar"));
        run(Command::new("tar")
            .args(args)
            .args(["--sparse", "--numeric-owner", "-C"])
            .arg(&sparse)
            .arg("-cf")
            .arg(&image)
            .arg("."));
        out.push((format!("sparse-{name}"), image));
    }
    for format in ["pax", "ustar", "gnutar", "v7tar"] {
        let image = env.image(&format!("bsdtar-{format}.tar"));
        let mut cmd = Command::new("bsdtar");
        cmd.args(["--numeric-owner", "--format", format]);
        if format == "pax" {
            cmd.args(["--xattrs", "--acls"]);
        }
        pack(cmd, &rich, &image);
        out.push((format!("bsdtar-{format}"), image));
    }
    for format in ["GNU_FORMAT", "PAX_FORMAT", "USTAR_FORMAT"] {
        let image = env.image(&format!("python-{format}.tar"));
        // USTAR cannot hold the longest names and links: those members are left out.
        let script = format!(
            "import os, sys, tarfile\n\
             root = sys.argv[2]\n\
             with tarfile.open(sys.argv[1], 'w', format=tarfile.{format}) as t:\n\
             \x20   for d, dirs, files in os.walk(root):\n\
             \x20       dirs.sort()\n\
             \x20       for p in [d] + [os.path.join(d, f) for f in sorted(files)]:\n\
             \x20           try:\n\
             \x20               t.add(p, arcname=os.path.relpath(p, root), recursive=False)\n\
             \x20           except ValueError:\n\
             \x20               pass\n"
        );
        run(Command::new("python3")
            .args(["-c", &script])
            .arg(&image)
            .arg(&rich));
        out.push((format!("python-{format}"), image));
    }
    out
}

#[test]
fn reimage_reads_every_archive_as_gnu_tar_and_bsdtar_do_or_refuses_it() {
    let env = Env::new("differential");
    let probe = PathBuf::from(format!(
        "/run/reimage-differential-probe-{}",
        std::process::id()
    ));
    let mut archives: Vec<(String, PathBuf)> = Vec::new();
    for case in hostile::tar_cases(&probe.join("escaped")) {
        let image = env.image(&format!("{}.tar", case.name));
        std::fs::write(&image, &case.bytes).unwrap();
        archives.push((case.name, image));
    }
    archives.extend(dialects(&env));
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 1;
    let mut tally: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut failures = Vec::new();
    for (name, image) in &archives {
        match check(&env, name, image, started) {
            Ok(outcome) => tally
                .entry(format!("{outcome:?}"))
                .or_default()
                .push(name.clone()),
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} archives:\n{}",
        failures.len(),
        archives.len(),
        failures.join("\n")
    );
    assert!(!probe.exists(), "a reference tool escaped its directory");
    for (outcome, names) in &tally {
        eprintln!("{outcome}: {} — {}", names.len(), names.join(", "));
    }
    for (case, why) in POLICY {
        eprintln!("policy: {case}: {why}");
    }
    let same = tally.get("Same").map_or(0, Vec::len);
    assert!(archives.len() >= 140, "{} archives", archives.len());
    assert!(same >= 40, "{same} archives read alike by all three");
    for (name, _) in &archives {
        if name.starts_with("gnu-") || name.starts_with("bsdtar-") || name.starts_with("python-") {
            assert!(
                tally["Same"].contains(name),
                "{name}: a dialect archive must unpack as the tools extract it"
            );
        }
    }
}
