//! Running the guest tier: this test binary, inside the QEMU guest that `scripts/guest` boots
//! from Debian's kernel (with the ZFS, device-mapper and quota support the host kernel lacks).

use std::path::{Path, PathBuf};
use std::process::Command;

use reimage_fixtures::{Compression, TarFormat};

/// Where the guest finds the large images made on the host before it boots.
pub const FIXTURES_VAR: &str = "REIMAGE_GUEST_FIXTURES";

pub fn bulky_name(files: usize) -> String {
    format!("bulky-{files}.tar")
}

/// The rich images every conformance case starts from (see `populate` there): made once on
/// the host rather than by each case in the guest, where packing them costs seconds a case.
pub const RICH: [(&str, u64, TarFormat, Compression); 2] = [
    ("a.tar.zst", 1, TarFormat::Posix, Compression::Zstd),
    ("b.tar.gz", 2, TarFormat::Gnu, Compression::Gzip),
];

/// The file name of a rich image made on the host: everything that makes it what it is.
pub fn rich_name(name: &str, seed: u64, format: TarFormat, compression: Compression) -> String {
    format!("rich-{seed}-{format:?}-{compression:?}-{name}")
}

/// The bulky images the cases use (64 or 96 files of 4 MiB of noise) and the rich images,
/// made on the host, where it takes seconds rather than minutes; removed when dropped.
struct HostFixtures {
    dir: PathBuf,
}

impl HostFixtures {
    fn make(bulky: &[usize]) -> HostFixtures {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("guest-fixtures-{}", std::process::id()));
        let fixtures = HostFixtures { dir };
        std::fs::create_dir_all(&fixtures.dir).unwrap();
        for &files in bulky {
            make_bulky(&fixtures.dir, files);
        }
        for (name, seed, format, compression) in RICH {
            let src = fixtures.dir.join(format!("src-{name}"));
            std::fs::create_dir_all(&src).unwrap();
            reimage_fixtures::tree::rich(&src, seed).unwrap();
            let out = fixtures
                .dir
                .join(rich_name(name, seed, format, compression));
            reimage_fixtures::gnu_tar(&src, &out, format, compression).unwrap();
            std::fs::remove_dir_all(&src).unwrap();
        }
        fixtures
    }
}

impl Drop for HostFixtures {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn make_bulky(dir: &Path, files: usize) {
    let src = dir.join(format!("src-{files}"));
    reimage_fixtures::tree::bulky(&src, files, 4 << 20).unwrap();
    reimage_fixtures::gnu_tar(
        &src,
        &dir.join(bulky_name(files)),
        reimage_fixtures::TarFormat::Gnu,
        reimage_fixtures::Compression::None,
    )
    .unwrap();
    std::fs::remove_dir_all(&src).unwrap();
}

/// The tests' files (their pools' loop files too) go to an ext4 scratch disk: the guest's
/// root is an overlay on tmpfs, which has no user xattrs (the test trees carry them) and
/// only half the guest's memory.
const SCRATCH: &str = "mkfs.ext4 -q /dev/vda
mkdir -p /scratch
mount /dev/vda /scratch
export REIMAGE_TEST_DIR=/scratch
";

/// Runs the ignored tests matching `filters` of the current test binary inside the guest,
/// after the shell command `banner` (which prints the backend's version into the log), and
/// fails unless all of them pass. Tests run two at a time on the guest's one CPU (one runs
/// while the other waits for its commands' I/O). `bulky`:
/// the sizes (in files) of the bulky images the cases use.
pub fn run_cases(filters: &[&str], banner: &str, bulky: &[usize]) {
    let exe = std::env::current_exe().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let fixtures = HostFixtures::make(bulky);
    let script = format!(
        "set -e\nmodprobe zfs 2>/dev/null || true\n{SCRATCH}export {FIXTURES_VAR}={}\n{banner}\n{} --ignored --test-threads 2 --show-output {}\n",
        fixtures.dir.display(),
        exe.display(),
        filters.join(" ")
    );
    let started = std::time::Instant::now();
    let out = Command::new(format!("{root}/scripts/guest"))
        .arg(&script)
        .current_dir(root)
        .env("GUEST_MEM", "4096")
        .env("GUEST_DISK_GB", "24")
        .env("GUEST_TIMEOUT", "2700")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    eprintln!(
        "guest tier {filters:?}: {} s in all",
        started.elapsed().as_secs()
    );
    assert!(out.status.success(), "the guest tier failed (see above)");
    assert!(
        text.contains("test result: ok."),
        "the guest ran no test harness: {text}"
    );
}
