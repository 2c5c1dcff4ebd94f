//! Project quotas: a size limit per directory tree, on ext4 (made with `-O quota,project`)
//! and xfs, both mounted with `prjquota`.
//!
//! A volume's project id is the inode number of its root directory: unique in the filesystem
//! for as long as the volume exists, unchanged by renames, and kept nowhere but in the
//! filesystem itself, so no crash can lose it. The root gets the id with the inherit flag
//! (`FS_IOC_FSSETXATTR`), so everything created below it is charged to the project; a tree
//! made before (a volume from a pool without quotas) is assigned walking it. Limits and usage
//! go through `quotactl_fd(2)`, which needs no device path.

use std::collections::HashSet;
use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use reimage_driver::walk::DirStack;
use reimage_driver::{Error, ErrorKind, Result};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// `struct fsxattr` of linux/fs.h.
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// `_IOR('X', 31, struct fsxattr)` and `_IOW('X', 32, struct fsxattr)`.
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;

/// `struct if_dqblk` of linux/quota.h.
#[repr(C)]
#[derive(Default)]
struct DqBlk {
    bhardlimit: u64,
    bsoftlimit: u64,
    curspace: u64,
    ihardlimit: u64,
    isoftlimit: u64,
    curinodes: u64,
    btime: u64,
    itime: u64,
    valid: u32,
}

const PRJQUOTA: u32 = 2;
const Q_GETQUOTA: u32 = 0x80_0007;
const Q_SETQUOTA: u32 = 0x80_0008;
const QIF_BLIMITS: u32 = 1;
/// Limits are counted in blocks of 1 KiB.
const QIF_DQBLKSIZE: u64 = 1024;

fn qcmd(cmd: u32) -> libc::c_uint {
    (cmd << 8) | (PRJQUOTA & 0xff)
}

fn quotactl_fd(
    fd: BorrowedFd<'_>,
    cmd: u32,
    id: u32,
    dq: &mut DqBlk,
) -> std::result::Result<(), Errno> {
    // SAFETY: quotactl_fd reads or writes one `if_dqblk` at `dq`, which lives for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_quotactl_fd,
            fd.as_raw_fd(),
            qcmd(cmd),
            id as libc::c_int,
            dq as *mut DqBlk,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}

/// The errno of the last failed system call made through libc.
fn last_errno() -> Errno {
    Errno::from_raw_os_error(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

/// Why the filesystem under `fd` cannot enforce project quotas, or `None` when it can.
pub fn unsupported(fd: BorrowedFd<'_>) -> Option<String> {
    let mut dq = DqBlk::default();
    match quotactl_fd(fd, Q_GETQUOTA, 0, &mut dq) {
        Ok(()) => None,
        Err(e) => Some(format!(
            "project quotas are not enabled on this filesystem ({}); for ext4 make it with \
             `mkfs.ext4 -O quota,project` (or `tune2fs -O project,quota`), for xfs and ext4 \
             mount it with `-o prjquota`",
            std::io::Error::from(e)
        )),
    }
}

fn get_xattr(fd: BorrowedFd<'_>) -> std::result::Result<FsXattr, Errno> {
    let mut x = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR fills one `struct fsxattr`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FSGETXATTR, &mut x as *mut FsXattr) };
    if r == 0 {
        Ok(x)
    } else {
        Err(last_errno())
    }
}

fn set_project(fd: BorrowedFd<'_>, id: u32, inherit: bool) -> std::result::Result<(), Errno> {
    let mut x = get_xattr(fd)?;
    if x.projid == id && (!inherit || x.xflags & FS_XFLAG_PROJINHERIT != 0) {
        return Ok(());
    }
    x.projid = id;
    if inherit {
        x.xflags |= FS_XFLAG_PROJINHERIT;
    }
    // SAFETY: FS_IOC_FSSETXATTR reads one `struct fsxattr`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FSSETXATTR, &x as *const FsXattr) };
    if r == 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}

/// The project id of the volume whose root is `root`: its inode number.
pub fn id_of(root: BorrowedFd<'_>) -> Result<u32> {
    let st = rustix::fs::fstat(root).map_err(|e| Error::errno("stat of the volume root", e))?;
    u32::try_from(st.st_ino).ok().filter(|id| *id != 0).ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "the volume's root has inode number {}, too large for a project id; mount xfs with inode32",
                st.st_ino
            ),
        )
    })
}

/// Whether the root already carries its project id with the inherit flag.
pub fn is_assigned(root: BorrowedFd<'_>) -> Result<bool> {
    let id = id_of(root)?;
    let x = get_xattr(root).map_err(|e| Error::errno("reading the project id", e))?;
    Ok(x.projid == id && x.xflags & FS_XFLAG_PROJINHERIT != 0)
}

/// Gives the tree below `root` the volume's project id: directories with the inherit flag,
/// regular files plainly; other kinds cannot be opened for the ioctl and are skipped (they
/// hold no blocks worth counting). Never follows a symlink or enters another mount.
pub fn assign(root: BorrowedFd<'_>) -> Result<u32> {
    let id = id_of(root)?;
    let fail = |e: Errno| Error::errno("assigning the project id", e);
    let root_mnt = mount_id(root, c"").map_err(fail)?;
    set_project(root, id, true).map_err(fail)?;
    let mut seen = HashSet::new();
    // A bounded walk: the tree may be deeper than the open-file limit.
    let mut stack = DirStack::new(reopen(root).map_err(fail)?).map_err(fail)?;
    loop {
        let Some(entry) = stack.next_entry() else {
            if stack.pop().map_err(fail)?.is_none() {
                break;
            }
            continue;
        };
        let name = entry.map_err(fail)?.name;
        let dir = stack.fd().map_err(fail)?;
        let st = rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW).map_err(fail)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                if mount_id(dir, &name).map_err(fail)? != root_mnt {
                    continue;
                }
                let fd = open_nofollow(dir, &name, true).map_err(fail)?;
                set_project(fd.as_fd(), id, true).map_err(fail)?;
                stack.push(fd, &name).map_err(fail)?;
            }
            FileType::RegularFile if seen.insert(st.st_ino) => {
                let fd = open_nofollow(dir, &name, false).map_err(fail)?;
                set_project(fd.as_fd(), id, false).map_err(fail)?;
            }
            _ => {}
        }
    }
    Ok(id)
}

fn reopen(fd: BorrowedFd<'_>) -> std::result::Result<OwnedFd, Errno> {
    rustix::fs::openat(
        fd,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn open_nofollow(
    dir: BorrowedFd<'_>,
    name: &CStr,
    directory: bool,
) -> std::result::Result<OwnedFd, Errno> {
    let mut flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    if directory {
        flags |= OFlags::DIRECTORY;
    }
    rustix::fs::openat(dir, name, flags, Mode::empty())
}

fn mount_id(dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> std::result::Result<u64, Errno> {
    let st = rustix::fs::statx(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::MNT_ID,
    )?;
    Ok(st.stx_mnt_id)
}

/// Sets the project's block limit (`0`: no limit).
pub fn set_limit(fs: BorrowedFd<'_>, id: u32, bytes: u64) -> Result<()> {
    let mut dq = DqBlk {
        bhardlimit: bytes.div_ceil(QIF_DQBLKSIZE),
        bsoftlimit: 0,
        valid: QIF_BLIMITS,
        ..DqBlk::default()
    };
    quotactl_fd(fs, Q_SETQUOTA, id, &mut dq)
        .map_err(|e| Error::errno(format!("setting the limit of project {id}"), e))
}

/// `(limit, bytes used, inodes used)` of the project; a limit of `None` is no limit.
pub fn usage(fs: BorrowedFd<'_>, id: u32) -> Result<(Option<u64>, u64, u64)> {
    let mut dq = DqBlk::default();
    quotactl_fd(fs, Q_GETQUOTA, id, &mut dq)
        .map_err(|e| Error::errno(format!("reading the quota of project {id}"), e))?;
    let limit = dq.bhardlimit.saturating_mul(QIF_DQBLKSIZE);
    Ok(((limit > 0).then_some(limit), dq.curspace, dq.curinodes))
}
