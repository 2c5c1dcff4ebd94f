//! Confinement of the threads that read the image and write the volume: a seccomp allow-list
//! and a Landlock ruleset, installed by each such thread on itself at its start, before it
//! touches the image.
//!
//! These threads parse hostile bytes. They never exec, never open a socket, never mount, and
//! open files only beneath the volume root (the image is already open), so everything else
//! is shut: a system call outside [`ALLOWED`] fails with `EPERM` (or kills the process under
//! the test switch, see [`kill_mode`]), and with Landlock a path outside the volume root
//! cannot be opened, created, linked or renamed whatever a bug in the unpacker computed.
//!
//! Filters are per thread (no `SECCOMP_FILTER_FLAG_TSYNC`): the request's own thread stays
//! unfiltered, since it runs `zfs`, `lvm` and `mkfs`. A thread the confined ones start (the
//! writers, liblzma's decoder threads) inherits both. The list is SECURITY.md's, with the
//! reason for each call.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::sync::OnceLock;

use landlock::{
    Access, AccessFs, LandlockStatus, PathBeneath, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The calls any confined thread may make, without conditions on their arguments.
pub const ALLOWED: &[(&str, libc::c_long)] = &[
    // Reading the image and writing file content.
    ("read", libc::SYS_read),
    ("pread64", libc::SYS_pread64),
    ("readv", libc::SYS_readv),
    ("write", libc::SYS_write),
    ("pwrite64", libc::SYS_pwrite64),
    ("writev", libc::SYS_writev),
    ("lseek", libc::SYS_lseek),
    ("close", libc::SYS_close),
    ("fstat", libc::SYS_fstat),
    ("newfstatat", libc::SYS_newfstatat),
    ("statx", libc::SYS_statx),
    ("fstatfs", libc::SYS_fstatfs),
    ("fcntl", libc::SYS_fcntl),
    ("ftruncate", libc::SYS_ftruncate),
    ("fallocate", libc::SYS_fallocate),
    ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync),
    // The namespace: entries created, replaced and removed relative to directory descriptors.
    ("openat", libc::SYS_openat),
    ("openat2", libc::SYS_openat2),
    ("mkdirat", libc::SYS_mkdirat),
    ("mknodat", libc::SYS_mknodat),
    ("symlinkat", libc::SYS_symlinkat),
    ("linkat", libc::SYS_linkat),
    ("unlinkat", libc::SYS_unlinkat),
    ("renameat2", libc::SYS_renameat2),
    ("readlinkat", libc::SYS_readlinkat),
    ("getdents64", libc::SYS_getdents64),
    ("faccessat2", libc::SYS_faccessat2),
    // Metadata: owners, modes, times, xattrs (ACLs and file capabilities among them).
    ("fchown", libc::SYS_fchown),
    ("fchownat", libc::SYS_fchownat),
    ("fchmod", libc::SYS_fchmod),
    ("fchmodat", libc::SYS_fchmodat),
    ("utimensat", libc::SYS_utimensat),
    ("fsetxattr", libc::SYS_fsetxattr),
    ("lsetxattr", libc::SYS_lsetxattr),
    ("fgetxattr", libc::SYS_fgetxattr),
    ("flistxattr", libc::SYS_flistxattr),
    ("fremovexattr", libc::SYS_fremovexattr),
    // The process's file mode mask, read once at the unpack's start (set and set back).
    ("umask", libc::SYS_umask),
    ("geteuid", libc::SYS_geteuid),
    ("getegid", libc::SYS_getegid),
    ("getuid", libc::SYS_getuid),
    ("getgid", libc::SYS_getgid),
    // Memory: the allocator, and buffers for decoded blocks.
    ("brk", libc::SYS_brk),
    ("mmap", libc::SYS_mmap),
    ("munmap", libc::SYS_munmap),
    ("mremap", libc::SYS_mremap),
    ("mprotect", libc::SYS_mprotect),
    ("madvise", libc::SYS_madvise),
    // Threads: queues (futex), the writers and liblzma's decoder threads started, ended.
    ("futex", libc::SYS_futex),
    ("sched_yield", libc::SYS_sched_yield),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("rseq", libc::SYS_rseq),
    ("gettid", libc::SYS_gettid),
    ("getpid", libc::SYS_getpid),
    ("exit", libc::SYS_exit),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("restart_syscall", libc::SYS_restart_syscall),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("nanosleep", libc::SYS_nanosleep),
    ("getrandom", libc::SYS_getrandom),
    // A panic's abort: the process ends as it would unconfined.
    ("tgkill", libc::SYS_tgkill),
    ("exit_group", libc::SYS_exit_group),
];

/// `_IOR('f', 1, long)` and `_IOW('f', 2, long)`: inode flags (`chattr`), read and set.
const FS_IOC_GETFLAGS: u64 = 0x8008_6601;
const FS_IOC_SETFLAGS: u64 = 0x4008_6602;
/// `_IOR('X', 31, struct fsxattr)`, `_IOW('X', 32, …)`: project ids and extended flags.
const FS_IOC_FSGETXATTR: u64 = 0x801c_581f;
const FS_IOC_FSSETXATTR: u64 = 0x401c_5820;
/// `BTRFS_IOC_ENCODED_WRITE`: a zstd frame stored as a compressed extent (see `encoded`).
const BTRFS_IOC_ENCODED_WRITE: u64 = 0x4080_9440;
/// `TCGETS`, `TIOCGWINSZ`: whether an output is a terminal, and its width.
const TCGETS: u64 = 0x5401;
const TIOCGWINSZ: u64 = 0x5413;

/// The ioctls a confined thread may make (compared on the low 32 bits of the request, as
/// the kernel reads it: a high bit set cannot slip past the rule).
const IOCTLS: &[u64] = &[
    FS_IOC_GETFLAGS,
    FS_IOC_SETFLAGS,
    FS_IOC_FSGETXATTR,
    FS_IOC_FSSETXATTR,
    BTRFS_IOC_ENCODED_WRITE,
    TCGETS,
    TIOCGWINSZ,
];

/// What one thread's confinement came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Confined {
    /// The seccomp filter is installed.
    pub seccomp: bool,
    /// The Landlock ABI the ruleset was enforced with; `None` where the kernel has none.
    pub landlock: Option<u32>,
}

/// What a thread may reach on the filesystem.
#[derive(Clone, Copy, Debug)]
pub enum Reach<'a> {
    /// Nothing beyond the descriptors it holds (the decoder thread: the image is open).
    Nothing,
    /// Everything beneath this directory (the volume root being filled).
    Beneath(BorrowedFd<'a>),
}

/// Under the test switch (`REIMAGE_SECCOMP=kill`, only in builds with the `fault-injection`
/// feature) a call outside the list kills the process, so that every test that unpacks
/// proves the list complete; otherwise the call fails with `EPERM`.
fn kill_mode() -> bool {
    cfg!(feature = "fault-injection")
        && std::env::var_os("REIMAGE_SECCOMP").is_some_and(|v| v == "kill")
}

/// A rule of one condition on argument `arg`.
fn rule(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompRule, String> {
    let condition = SeccompCondition::new(arg, len, op, value).map_err(|e| e.to_string())?;
    SeccompRule::new(vec![condition]).map_err(|e| e.to_string())
}

/// Argument `arg` equals `value` in its low 32 bits (as the kernel reads an ioctl request or
/// a `prctl` option).
fn equals(arg: u8, value: u64) -> Result<SeccompRule, String> {
    rule(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// The allow-list as a BPF program: [`ALLOWED`] as they are; `clone` only for threads
/// (`CLONE_THREAD`: a new process could exec); `ioctl` only for [`IOCTLS`]; `prctl` only
/// to name the thread; `clone3` allowed here and answered `ENOSYS` by [`clone3_filter`]
/// (glibc falls back to `clone`; `EPERM` would be fatal to `pthread_create`).
fn allow_list(kill: bool) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&(_, nr)| (nr, Vec::new())).collect();
    rules.insert(
        libc::SYS_clone,
        vec![rule(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?],
    );
    rules.insert(libc::SYS_clone3, Vec::new());
    rules.insert(
        libc::SYS_ioctl,
        IOCTLS
            .iter()
            .map(|&request| equals(1, request))
            .collect::<Result<_, _>>()?,
    );
    rules.insert(libc::SYS_prctl, vec![equals(0, libc::PR_SET_NAME as u64)?]);
    let mismatch = if kill {
        SeccompAction::KillProcess
    } else {
        SeccompAction::Errno(libc::EPERM as u32)
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch())
        .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// `clone3` answered `ENOSYS`, everything else allowed; installed before the allow-list
/// (whose installation needs `prctl` and `seccomp`, which it then shuts), and it wins over
/// the allow-list's `Allow` there, as the kernel takes the strictest answer of all filters.
fn clone3_filter() -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        [(libc::SYS_clone3, Vec::new())].into_iter().collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch(),
    )
    .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

#[cfg(target_arch = "x86_64")]
fn arch() -> TargetArch {
    TargetArch::x86_64
}

#[cfg(target_arch = "aarch64")]
fn arch() -> TargetArch {
    TargetArch::aarch64
}

/// Both programs, compiled once per process.
fn programs() -> &'static Result<(BpfProgram, BpfProgram), String> {
    static PROGRAMS: OnceLock<Result<(BpfProgram, BpfProgram), String>> = OnceLock::new();
    PROGRAMS.get_or_init(|| Ok((allow_list(kill_mode())?, clone3_filter()?)))
}

/// Installs the seccomp filters on the calling thread.
fn filter_this_thread() -> Result<(), String> {
    let (allow, clone3) = programs().as_ref().map_err(Clone::clone)?;
    seccompiler::apply_filter(clone3).map_err(|e| e.to_string())?;
    seccompiler::apply_filter(allow).map_err(|e| e.to_string())
}

/// Restricts the calling thread's filesystem access to `reach`; the ABI it was enforced
/// with, or `None` where the kernel has no Landlock.
fn landlock_this_thread(reach: Reach<'_>) -> Result<Option<u32>, String> {
    let abi = ABI::V5;
    let ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .map_err(|e| e.to_string())?;
    let ruleset = match reach {
        Reach::Nothing => ruleset,
        Reach::Beneath(root) => ruleset
            .add_rule(PathBeneath::new(root, AccessFs::from_all(abi)))
            .map_err(|e| e.to_string())?,
    };
    let status = ruleset.restrict_self().map_err(|e| e.to_string())?;
    Ok(match (status.ruleset, status.landlock) {
        (RulesetStatus::NotEnforced, _) => None,
        (_, LandlockStatus::Available { effective_abi, .. }) => Some(effective_abi as u32),
        _ => None,
    })
}

/// Confines the calling thread: Landlock first (its own setup opens nothing), then seccomp.
/// Returns what is in force, or the warning to give where part of it is not: a kernel
/// without Landlock leaves the allow-list alone in force, which is not a reason to fail.
pub fn this_thread(reach: Reach<'_>) -> (Confined, Option<String>) {
    let mut problems = Vec::new();
    let landlock = landlock_this_thread(reach).unwrap_or_else(|e| {
        problems.push(format!("Landlock could not be set up ({e})"));
        None
    });
    if landlock.is_none() && problems.is_empty() {
        problems.push(
            "the kernel has no Landlock (not built in, or not in the `lsm=` boot list), so file access is confined by the unpacker's own checks alone"
                .to_owned(),
        );
    }
    let seccomp = match filter_this_thread() {
        Ok(()) => true,
        Err(e) => {
            problems.push(format!("the seccomp filter could not be installed ({e})"));
            false
        }
    };
    let warning = (!problems.is_empty()).then(|| {
        format!(
            "the unpack runs less confined than it can: {}",
            problems.join("; ")
        )
    });
    (Confined { seccomp, landlock }, warning)
}

/// What confinement the kernel offers, without confining anything: whether seccomp filters
/// can be installed and the Landlock ABI (`None`: no Landlock), for the start of a request.
pub fn available() -> Confined {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only
    // returns the ABI version (or an error); it reads no memory and creates nothing.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    };
    let seccomp = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail")
        .is_ok_and(|actions| actions.split_whitespace().any(|a| a == "errno"));
    Confined {
        seccomp,
        landlock: u32::try_from(version).ok().filter(|&v| v > 0),
    }
}

/// A test hook, in builds with the `fault-injection` feature: with
/// `REIMAGE_TEST_FORBIDDEN_CALL=1` a confined thread tries to open a socket, a call the
/// list does not allow, and reports what the kernel answered.
pub fn forbidden_call_probe() -> Option<String> {
    if !cfg!(feature = "fault-injection")
        || std::env::var_os("REIMAGE_TEST_FORBIDDEN_CALL").is_none()
    {
        return None;
    }
    // SAFETY: socket(2) with constant arguments; the descriptor, if any, is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: `fd` is the descriptor socket(2) just returned and nothing else owns it.
        unsafe { libc::close(fd) };
        return Some("the forbidden call socket(2) succeeded".to_owned());
    }
    Some(format!(
        "the forbidden call socket(2) was refused: {}",
        std::io::Error::last_os_error()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn errno_of(result: libc::c_long) -> i32 {
        if result >= 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        }
    }

    #[test]
    fn a_confined_thread_keeps_what_it_needs_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("reimage-confine-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("root")).unwrap();
        std::fs::write(dir.join("outside"), b"x").unwrap();
        let root = std::fs::File::open(dir.join("root")).unwrap();
        let outside = dir.join("outside");
        let confined = std::thread::spawn(move || {
            let (confined, _) = this_thread(Reach::Beneath(root.as_fd()));
            // Outside the list: EPERM.
            // SAFETY: socket(2) with constant arguments; a descriptor would be leaked only
            // if the filter failed, and the assertion below fails then.
            let socket =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) } as libc::c_long;
            assert_eq!(errno_of(socket), libc::EPERM);
            // clone3 answers ENOSYS, and threads still start (glibc falls back to clone).
            // SAFETY: clone3 with a null argument would fail with EFAULT if it were run.
            let clone3 = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            assert_eq!(errno_of(clone3), libc::ENOSYS);
            assert_eq!(std::thread::spawn(|| 7).join().unwrap(), 7);
            // Files beneath the root can be made; outside it they cannot even be read.
            let made = rustix::fs::openat(
                root.as_fd(),
                "made",
                rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY,
                rustix::fs::Mode::from_raw_mode(0o600),
            );
            assert!(made.is_ok(), "{made:?}");
            let read = std::fs::read(&outside);
            if confined.landlock.is_some() {
                assert!(read.is_err(), "read outside the root: {read:?}");
            }
            confined
        })
        .join()
        .unwrap();
        assert!(confined.seccomp);
        // The thread that confined itself is gone; this one was never confined.
        assert!(std::fs::read(dir.join("outside")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ioctls_are_compared_on_their_low_32_bits() {
        let dir = std::env::temp_dir().join(format!("reimage-ioctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = std::fs::File::create(dir.join("f")).unwrap();
        std::thread::spawn(move || {
            this_thread(Reach::Nothing);
            let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
            let mut flags: libc::c_long = 0;
            // FIONREAD is not on the list; with a high bit set neither is FS_IOC_GETFLAGS.
            // SAFETY: both ioctls write at most a long into `flags`.
            let fionread = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut flags) } as libc::c_long;
            assert_eq!(errno_of(fionread), libc::EPERM);
            let high = (1u64 << 32) | FS_IOC_GETFLAGS;
            // SAFETY: as above; the kernel reads only the low 32 bits of the request.
            let got = unsafe { libc::syscall(libc::SYS_ioctl, fd, high, &mut flags) };
            // Allowed as FS_IOC_GETFLAGS, which it is to the kernel: no bypass, no EPERM.
            assert_ne!(errno_of(got), libc::EPERM);
        })
        .join()
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
