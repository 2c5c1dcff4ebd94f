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

/// Every process that dies of a signal in the guest leaves a core on the scratch disk; after
/// the cases, each core's backtrace is printed with gdb (the guest runs the host's), so a
/// crash seen once in CI can be read from its log.
const CORES: &str = "ulimit -c unlimited
mkdir -p /scratch/cores
echo '/scratch/cores/core.%e.%p' > /proc/sys/kernel/core_pattern
echo 2 > /proc/sys/fs/suid_dumpable
";

/// Prints the backtrace of every core left, with the binary that dumped it: reimage, a
/// command on the PATH of that name (`zfs`, `zpool`, `lvcreate`, ...), else the test binary;
/// and the state of the thread that faulted: every register (the vector ones too), the code
/// before the faulting instruction, and the top of its stack, so that a stack slot holding a
/// correct value beside a register holding garbage shows.
fn backtraces(test_exe: &Path) -> String {
    format!(
        "for core in /scratch/cores/core.*; do
    [ -e \"$core\" ] || continue
    name=${{core##*/core.}}; name=${{name%.*}}
    case $name in
        reimage) exe={} ;;
        *) exe=$(command -v \"$name\" 2>/dev/null || echo {}) ;;
    esac
    echo \"== $core ($exe)\"
    gdb -q -batch -ex 'thread apply all bt' \"$exe\" \"$core\" 2>&1 | tail -n 80 || true
    gdb -q -batch -ex 'info all-registers' -ex 'x/16i $pc-48' -ex 'x/32gx $sp' \
        \"$exe\" \"$core\" 2>&1 | grep -v '^\\[New LWP' | tail -n 200 || true
done
",
        super::BIN,
        test_exe.display()
    )
}

/// Overrides for chasing a rare failure: `REIMAGE_GUEST_CASES` (space-separated test name
/// filters) replaces the tier's filters, and `REIMAGE_GUEST_REPEAT=N` runs them N times in one
/// boot, stopping at the first failure.
fn chase(filters: &[&str]) -> (String, u32) {
    let cases = std::env::var("REIMAGE_GUEST_CASES").unwrap_or_else(|_| filters.join(" "));
    let repeat = std::env::var("REIMAGE_GUEST_REPEAT")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    (cases, repeat)
}

/// Runs the ignored tests matching `filters` of the current test binary inside the guest,
/// after the shell command `banner` (which prints the backend's version into the log), and
/// fails unless all of them pass. Tests run two at a time on the guest's one CPU (one runs
/// while the other waits for its commands' I/O). `bulky`:
/// the sizes (in files) of the bulky images the cases use.
pub fn run_cases(filters: &[&str], banner: &str, bulky: &[usize]) {
    let exe = std::env::current_exe().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let fixtures = HostFixtures::make(bulky);
    let (cases, repeat) = chase(filters);
    let boot = |cases: &str, repeat: u32| {
        let script = format!(
            "set -e\nmodprobe zfs 2>/dev/null || true\n{SCRATCH}{CORES}export {FIXTURES_VAR}={}\n{banner}\nstatus=0\nfor round in $(seq {repeat}); do\n    [ {repeat} -eq 1 ] || echo \"== round $round of {repeat}\"\n    {} --ignored --test-threads 2 --show-output {cases} || {{ status=$?; break; }}\ndone\n{}exit $status\n",
            fixtures.dir.display(),
            exe.display(),
            backtraces(&exe),
        );
        let out = Command::new(format!("{root}/scripts/guest"))
            .arg(&script)
            .current_dir(root)
            .env("GUEST_MEM", "4096")
            .env("GUEST_DISK_GB", "24")
            .env("GUEST_TIMEOUT", (2700 * repeat).to_string())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{text}");
        (out.status.success(), text)
    };
    let started = std::time::Instant::now();
    let (mut passed, mut text) = boot(&cases, repeat);
    // See the README's *Known problem*: reimage has died of SIGSEGV in the emulated guest,
    // in safe code, a few times in hundreds of runs, never on the host. The cases that failed
    // then run once more in a fresh guest; the crash's backtrace stays in the log above.
    let crashed = emulator_crash(&text);
    if !passed && crashed && repeat == 1 {
        let failed = failed_cases(&text);
        if !failed.is_empty() {
            eprintln!(
                "guest tier {filters:?}: reimage died of a signal in the guest (backtrace above); running {} again in a fresh guest",
                failed.join(" ")
            );
            let first = failures(&text);
            (passed, text) = boot(&format!("--exact {}", failed.join(" ")), 1);
            eprintln!(
                "guest tier {filters:?}: the rerun {}; the first run's failures were:\n{first}",
                if passed { "passed" } else { "failed too" }
            );
        }
    }
    eprintln!(
        "guest tier {filters:?}: {} s in all",
        started.elapsed().as_secs()
    );
    assert!(
        passed,
        "the guest tier failed; its failures, again (the whole log is above):\n{}",
        failures(&text)
    );
    assert!(
        text.contains("test result: ok."),
        "the guest ran no test harness: {text}"
    );
}

/// Whether a guest log shows reimage itself killed by a memory fault (a core of `reimage`
/// that gdb says ended with SIGSEGV or SIGBUS).
pub fn emulator_crash(text: &str) -> bool {
    let mut in_reimage_core = false;
    for line in text.lines() {
        if line.starts_with("== /scratch/cores/core.") {
            in_reimage_core = line.contains("/core.reimage.");
        } else if in_reimage_core
            && line.starts_with("Program terminated with signal")
            && (line.contains("SIGSEGV") || line.contains("SIGBUS"))
        {
            return true;
        }
    }
    false
}

/// The names of the cases a libtest log says failed: the indented names under its last
/// `failures:` heading (the first such heading is followed by the cases' output instead).
pub fn failed_cases(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut listing = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed == "failures:" {
            listing = true;
        } else if listing
            && line.starts_with("    ")
            && trimmed.contains("::")
            && !trimmed.contains(' ')
        {
            names.push(trimmed.to_owned());
        } else if !trimmed.is_empty() {
            listing = false;
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The failing cases' own output from a libtest log (its `failures:` section and the panic
/// lines), at most a few kilobytes: what a CI log that keeps only its end must still show.
fn failures(text: &str) -> String {
    const MAX: usize = 6000;
    let mut picked = String::new();
    let mut in_failures = false;
    for line in text.lines() {
        let line_trimmed = line.trim_start();
        if line_trimmed == "failures:" {
            in_failures = true;
        } else if line_trimmed.starts_with("test result:") {
            in_failures = false;
        }
        let panic_line = line.contains("panicked at") || line.contains("FAILED");
        if (in_failures || panic_line) && !line_trimmed.starts_with("note: ") {
            picked.push_str(line);
            picked.push('\n');
        }
    }
    if picked.len() > MAX {
        let mut cut = picked.len() - MAX;
        while !picked.is_char_boundary(cut) {
            cut += 1;
        }
        picked = format!("[…]{}", &picked[cut..]);
    }
    picked
}
