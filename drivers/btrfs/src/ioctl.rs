//! The btrfs ioctls the driver uses, on byte buffers laid out as in `linux/btrfs.h`.
//!
//! Request numbers, struct sizes and field offsets were printed from the kernel's own header
//! by a C program (see the comments), not worked out by hand. Buffers are `u64`-aligned.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::io::Errno;

const IOC_SUBVOL_CREATE: libc::c_ulong = 0x5000_940e; // _IOW(0x94, 14, vol_args[4096])
const IOC_SNAP_DESTROY_V2: libc::c_ulong = 0x5000_943f; // _IOW(0x94, 63, vol_args_v2[4096])
const IOC_SNAP_CREATE_V2: libc::c_ulong = 0x5000_9417; // _IOW(0x94, 23, vol_args_v2[4096])
const IOC_TREE_SEARCH: libc::c_ulong = 0xd000_9411; // _IOWR(0x94, 17, search_args[4096])
const IOC_SPACE_INFO: libc::c_ulong = 0xc010_9414; // _IOWR(0x94, 20, space_args[16])
const IOC_SUBVOL_GETFLAGS: libc::c_ulong = 0x8008_9419;
const IOC_SUBVOL_SETFLAGS: libc::c_ulong = 0x4008_941a;
const IOC_DEV_INFO: libc::c_ulong = 0xd000_941e; // dev_info_args[4096]
const IOC_FS_INFO: libc::c_ulong = 0x8400_941f; // fs_info_args[1024]
const IOC_QUOTA_CTL: libc::c_ulong = 0xc010_9428; // quota_ctl_args[16]
const IOC_QGROUP_LIMIT: libc::c_ulong = 0x8030_942b; // qgroup_limit_args[48]
const IOC_QUOTA_RESCAN_WAIT: libc::c_ulong = 0x942e;
const IOC_GET_SUBVOL_INFO: libc::c_ulong = 0x81f8_943c; // get_subvol_info_args[504]
const IOC_GET_SUBVOL_ROOTREF: libc::c_ulong = 0xd000_943d; // rootref_args[4096]
const IOC_INO_LOOKUP_USER: libc::c_ulong = 0xd000_943e; // ino_lookup_user_args[4096]

const SUBVOL_SPEC_BY_ID: u64 = 0x10;
pub const SUBVOL_RDONLY: u64 = 0x2;
const ROOT_TREE: u64 = 1;
const QUOTA_TREE: u64 = 8;
const INODE_ITEM_KEY: u32 = 0x01;
const ROOT_ITEM_KEY: u32 = 0x84;
const ROOT_BACKREF_KEY: u32 = 0x90;
const QGROUP_INFO_KEY: u32 = 0xf2;
const QGROUP_LIMIT_KEY: u32 = 0xf4;
const QGROUP_LIMIT_MAX_RFER: u64 = 0x1;
const BLOCK_GROUP_DATA: u64 = 0x1;
const FIRST_FREE_OBJECTID: u64 = 256;
const LAST_FREE_OBJECTID: u64 = u64::MAX - 256;

/// A zeroed, `u64`-aligned buffer of `bytes` bytes.
struct Buf(Vec<u64>);

impl Buf {
    fn new(bytes: usize) -> Buf {
        Buf(vec![0u64; bytes.div_ceil(8)])
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: a u64 slice viewed as bytes, same allocation and length.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 8) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), self.0.len() * 8)
        }
    }
    fn u64_at(&self, at: usize) -> u64 {
        u64::from_ne_bytes(self.bytes()[at..at + 8].try_into().unwrap_or([0; 8]))
    }
    fn put_u64(&mut self, at: usize, v: u64) {
        self.bytes_mut()[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u32(&mut self, at: usize, v: u32) {
        self.bytes_mut()[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
}

fn ioctl(fd: BorrowedFd<'_>, request: libc::c_ulong, buf: &mut Buf) -> Result<(), Errno> {
    // SAFETY: `buf` is at least as large as the struct the request names (sizes above).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, buf.0.as_mut_ptr()) };
    if r < 0 {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ))
    } else {
        Ok(())
    }
}

fn name_field(buf: &mut Buf, at: usize, max: usize, name: &CStr) -> Result<(), Errno> {
    let bytes = name.to_bytes();
    if bytes.len() > max {
        return Err(Errno::NAMETOOLONG);
    }
    buf.bytes_mut()[at..at + bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// Creates subvolume `name` in directory `dir`.
pub fn subvol_create(dir: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    let mut buf = Buf::new(4096);
    name_field(&mut buf, 8, 4087, name)?;
    ioctl(dir, IOC_SUBVOL_CREATE, &mut buf)
}

/// Makes `name` in directory `dir` a writable snapshot of the subvolume `source` is the
/// root of (`vol_args_v2`: the source fd at 0, flags at 16, the name at 56).
pub fn snapshot_create(
    source: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    name: &CStr,
) -> Result<(), Errno> {
    let mut buf = Buf::new(4096);
    buf.put_u64(0, source.as_raw_fd() as u64);
    name_field(&mut buf, 56, 4039, name)?;
    ioctl(dir, IOC_SNAP_CREATE_V2, &mut buf)
}

/// Deletes the subvolume with id `id` (any fd on the filesystem).
pub fn subvol_destroy_by_id(fs: BorrowedFd<'_>, id: u64) -> Result<(), Errno> {
    let mut buf = Buf::new(4096);
    buf.put_u64(16, SUBVOL_SPEC_BY_ID); // flags
    buf.put_u64(56, id); // subvolid
    ioctl(fs, IOC_SNAP_DESTROY_V2, &mut buf)
}

/// What `GET_SUBVOL_INFO` says of the subvolume `fd` is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubvolInfo {
    pub id: u64,
    pub flags: u64,
    pub uuid: [u8; 16],
    pub parent_uuid: [u8; 16],
}

pub fn subvol_info(fd: BorrowedFd<'_>) -> Result<SubvolInfo, Errno> {
    let mut buf = Buf::new(504);
    ioctl(fd, IOC_GET_SUBVOL_INFO, &mut buf)?;
    let b = buf.bytes();
    let uuid = |at: usize| -> [u8; 16] { b[at..at + 16].try_into().unwrap_or([0; 16]) };
    Ok(SubvolInfo {
        id: buf.u64_at(0),
        flags: buf.u64_at(288),
        uuid: uuid(296),
        parent_uuid: uuid(312),
    })
}

pub fn subvol_flags(fd: BorrowedFd<'_>) -> Result<u64, Errno> {
    let mut buf = Buf::new(8);
    ioctl(fd, IOC_SUBVOL_GETFLAGS, &mut buf)?;
    Ok(buf.u64_at(0))
}

pub fn set_subvol_flags(fd: BorrowedFd<'_>, flags: u64) -> Result<(), Errno> {
    let mut buf = Buf::new(8);
    buf.put_u64(0, flags);
    ioctl(fd, IOC_SUBVOL_SETFLAGS, &mut buf)
}

/// Subvolumes directly below the subvolume `fd` is in: (tree id, id of the directory holding it).
pub fn child_subvols(fd: BorrowedFd<'_>) -> Result<Vec<(u64, u64)>, Errno> {
    let mut out = Vec::new();
    let mut min = 0u64;
    loop {
        let mut buf = Buf::new(4096);
        buf.put_u64(0, min);
        let r = ioctl(fd, IOC_GET_SUBVOL_ROOTREF, &mut buf);
        let n = buf.bytes()[4088] as usize;
        for i in 0..n.min(255) {
            out.push((buf.u64_at(8 + i * 16), buf.u64_at(16 + i * 16)));
        }
        match r {
            Ok(()) => return Ok(out),
            // More than fit in one answer: continue after the last one.
            Err(Errno::OVERFLOW) => min = buf.u64_at(0),
            Err(e) => return Err(e),
        }
    }
}

/// The path (relative to the subvolume `fd` is in, ending in `/` or empty) of directory
/// `dirid`, and the name under which subvolume `treeid` sits in it.
pub fn ino_lookup_user(
    fd: BorrowedFd<'_>,
    dirid: u64,
    treeid: u64,
) -> Result<(Vec<u8>, Vec<u8>), Errno> {
    let mut buf = Buf::new(4096);
    buf.put_u64(0, dirid);
    buf.put_u64(8, treeid);
    ioctl(fd, IOC_INO_LOOKUP_USER, &mut buf)?;
    let b = buf.bytes();
    let cstr = |at: usize, len: usize| -> Vec<u8> {
        let field = &b[at..at + len];
        field[..field.iter().position(|&c| c == 0).unwrap_or(len)].to_vec()
    };
    Ok((cstr(272, 3824), cstr(16, 256)))
}

/// Runs `TREE_SEARCH` over `tree` for keys of `key_type` with objectid in `objectids` (and
/// offsets in `offsets`), calling `item(objectid, offset, data)` for each. Needs root.
fn tree_search(
    fd: BorrowedFd<'_>,
    tree: u64,
    key_type: u32,
    objectids: (u64, u64),
    offsets: (u64, u64),
    item: &mut dyn FnMut(u64, u64, &[u8]),
) -> Result<(), Errno> {
    // The range is lexicographic over (objectid, type, offset): items of other types in
    // between come back too and are passed over, and a continuation starts after the last key.
    let (mut min_obj, mut min_type, mut min_off) = (objectids.0, key_type, offsets.0);
    loop {
        let mut buf = Buf::new(4096);
        buf.put_u64(0, tree);
        buf.put_u64(8, min_obj);
        buf.put_u64(16, objectids.1);
        buf.put_u64(24, min_off);
        buf.put_u64(32, offsets.1);
        buf.put_u64(40, 0);
        buf.put_u64(48, u64::MAX);
        buf.put_u32(56, min_type);
        buf.put_u32(60, key_type);
        buf.put_u32(64, 4096);
        ioctl(fd, IOC_TREE_SEARCH, &mut buf)?;
        let count = u32::from_ne_bytes(buf.bytes()[64..68].try_into().unwrap_or([0; 4]));
        if count == 0 {
            return Ok(());
        }
        let b = buf.bytes();
        let mut at = 104;
        let mut last = (0u64, 0u32, 0u64);
        for _ in 0..count {
            if at + 32 > b.len() {
                break;
            }
            let objectid = u64::from_ne_bytes(b[at + 8..at + 16].try_into().unwrap_or([0; 8]));
            let offset = u64::from_ne_bytes(b[at + 16..at + 24].try_into().unwrap_or([0; 8]));
            let kind = u32::from_ne_bytes(b[at + 24..at + 28].try_into().unwrap_or([0; 4]));
            let len = u32::from_ne_bytes(b[at + 28..at + 32].try_into().unwrap_or([0; 4])) as usize;
            let data = &b[(at + 32).min(b.len())..(at + 32 + len).min(b.len())];
            if kind == key_type {
                item(objectid, offset, data);
            }
            last = (objectid, kind, offset);
            at += 32 + len;
        }
        // Continue after the last key returned.
        (min_obj, min_type, min_off) = if last.2 < u64::MAX {
            (last.0, last.1, last.2 + 1)
        } else if last.1 < u32::MAX {
            (last.0, last.1 + 1, 0)
        } else if last.0 < objectids.1 {
            (last.0 + 1, 0, 0)
        } else {
            return Ok(());
        };
    }
}

/// Ids of the subvolumes whose parent uuid is `uuid`: its snapshots. A deleted subvolume
/// keeps its root item until the cleaner gets to it; those (no references left, marked dead,
/// or without a name any more) are not snapshots.
pub fn snapshots_of(fd: BorrowedFd<'_>, uuid: &[u8; 16]) -> Result<Vec<u64>, Errno> {
    // btrfs_root_item (packed): flags u64 at 208 (bit 48: being deleted), refs u32 at 216,
    // parent_uuid 16 bytes at 263.
    const ROOT_SUBVOL_DEAD: u64 = 1 << 48;
    let mut ids = Vec::new();
    let mut item = |id: u64, _: u64, data: &[u8]| {
        if data.len() < 279 || &data[263..279] != uuid || ids.contains(&id) {
            return;
        }
        let flags = u64::from_le_bytes(data[208..216].try_into().unwrap_or([0; 8]));
        let refs = u32::from_le_bytes(data[216..220].try_into().unwrap_or([0; 4]));
        if refs > 0 && flags & ROOT_SUBVOL_DEAD == 0 {
            ids.push(id);
        }
    };
    let all = (FIRST_FREE_OBJECTID, LAST_FREE_OBJECTID);
    tree_search(fd, ROOT_TREE, ROOT_ITEM_KEY, all, (0, u64::MAX), &mut item)?;
    let mut live = Vec::with_capacity(ids.len());
    for id in ids {
        if subvol_name(fd, id)?.is_some() {
            live.push(id);
        }
    }
    Ok(live)
}

/// The name subvolume `id` has in its parent directory.
pub fn subvol_name(fd: BorrowedFd<'_>, id: u64) -> Result<Option<String>, Errno> {
    let mut name = None;
    tree_search(
        fd,
        ROOT_TREE,
        ROOT_BACKREF_KEY,
        (id, id),
        (0, u64::MAX),
        &mut |_, _, data| {
            // btrfs_root_ref: dirid u64, sequence u64, name_len u16, name.
            if data.len() >= 18 {
                let len = u16::from_le_bytes([data[16], data[17]]) as usize;
                if let Some(n) = data.get(18..18 + len) {
                    name.get_or_insert_with(|| String::from_utf8_lossy(n).into_owned());
                }
            }
        },
    )?;
    Ok(name)
}

/// Opens the root directory of subvolume `id` (`fs`: any fd on the filesystem) by its file
/// handle, wherever it is in the filesystem and whether or not a path to it is mounted.
/// Needs `CAP_DAC_READ_SEARCH`.
pub fn open_subvol(fs: BorrowedFd<'_>, id: u64) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::FromRawFd;
    // The handle names an inode by (objectid, root, generation): the subvolume's root
    // directory is inode 256 of tree `id`, its generation is in its inode item.
    let mut generation = None;
    tree_search(
        fs,
        id,
        INODE_ITEM_KEY,
        (FIRST_FREE_OBJECTID, FIRST_FREE_OBJECTID),
        (0, 0),
        &mut |_, _, data| {
            // btrfs_inode_item: generation u64 first.
            if let Some(g) = data.get(0..8) {
                generation.get_or_insert(u64::from_le_bytes(g.try_into().unwrap_or([0; 8])));
            }
        },
    )?;
    let generation = generation.ok_or(Errno::NOENT)?;
    // struct file_handle { u32 handle_bytes; i32 handle_type; } followed by the packed
    // btrfs_fid of type FILEID_BTRFS_WITHOUT_PARENT (0x4d): objectid u64, root_objectid
    // u64, gen u32.
    const FILEID_BTRFS_WITHOUT_PARENT: i32 = 0x4d;
    let mut handle = Buf::new(8 + 20);
    handle.put_u32(0, 20);
    handle.put_u32(4, FILEID_BTRFS_WITHOUT_PARENT as u32);
    handle.put_u64(8, FIRST_FREE_OBJECTID);
    handle.put_u64(16, id);
    handle.put_u32(24, generation as u32);
    // SAFETY: a complete file_handle of the size it declares; the returned fd is new and
    // owned by no one else.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            fs.as_raw_fd(),
            handle.0.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ));
    }
    // SAFETY: `fd` was just opened for us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Enables quotas on the filesystem (a no-op when they are on) and waits for the rescan.
pub fn quota_enable(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut buf = Buf::new(16);
    buf.put_u64(0, 1); // BTRFS_QUOTA_CTL_ENABLE
    ioctl(fd, IOC_QUOTA_CTL, &mut buf)?;
    let mut none = Buf::new(8);
    match ioctl(fd, IOC_QUOTA_RESCAN_WAIT, &mut none) {
        Ok(()) | Err(Errno::NOTCONN) | Err(Errno::INVAL) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Limits the referenced bytes of level-0 qgroup `0/id` (`None` removes the limit).
pub fn qgroup_limit(fd: BorrowedFd<'_>, id: u64, max_referenced: Option<u64>) -> Result<(), Errno> {
    let mut buf = Buf::new(48);
    buf.put_u64(0, id);
    buf.put_u64(8, QGROUP_LIMIT_MAX_RFER); // lim.flags
    buf.put_u64(16, max_referenced.unwrap_or(u64::MAX)); // lim.max_rfer
    ioctl(fd, IOC_QGROUP_LIMIT, &mut buf)
}

/// Referenced bytes of qgroup `0/id` and its referenced limit, if quotas are on.
pub fn qgroup_usage(fd: BorrowedFd<'_>, id: u64) -> Result<Option<(u64, Option<u64>)>, Errno> {
    let mut referenced = None;
    let mut limit = None;
    let found = tree_search(
        fd,
        QUOTA_TREE,
        QGROUP_INFO_KEY,
        (0, 0),
        (id, id),
        &mut |_, _, data| {
            if data.len() >= 16 {
                referenced = Some(u64::from_le_bytes(data[8..16].try_into().unwrap_or([0; 8])));
            }
        },
    );
    match found {
        Ok(()) => {}
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e),
    }
    tree_search(
        fd,
        QUOTA_TREE,
        QGROUP_LIMIT_KEY,
        (0, 0),
        (id, id),
        &mut |_, _, data| {
            if data.len() >= 16 {
                let flags = u64::from_le_bytes(data[0..8].try_into().unwrap_or([0; 8]));
                let max = u64::from_le_bytes(data[8..16].try_into().unwrap_or([0; 8]));
                if flags & QGROUP_LIMIT_MAX_RFER != 0 && max != u64::MAX {
                    limit = Some(max);
                }
            }
        },
    )?;
    Ok(referenced.map(|r| (r, limit)))
}

/// Space from the allocator's own figures: (bytes new data can take, total device bytes).
/// Free space inside data block groups, plus space no block group has claimed yet.
pub fn space(fd: BorrowedFd<'_>) -> Result<(u64, u64), Errno> {
    let mut info = Buf::new(1024);
    ioctl(fd, IOC_FS_INFO, &mut info)?;
    let max_id = info.u64_at(0);
    let mut total = 0u64;
    let mut allocated = 0u64;
    for devid in 1..=max_id.min(4096) {
        let mut dev = Buf::new(4096);
        dev.put_u64(0, devid);
        match ioctl(fd, IOC_DEV_INFO, &mut dev) {
            Ok(()) => {
                allocated += dev.u64_at(24);
                total += dev.u64_at(32);
            }
            Err(Errno::NODEV) => {}
            Err(e) => return Err(e),
        }
    }
    let mut head = Buf::new(16);
    ioctl(fd, IOC_SPACE_INFO, &mut head)?;
    let slots = head.u64_at(8).min(256);
    let mut spaces = Buf::new(16 + 24 * slots as usize);
    spaces.put_u64(0, slots);
    ioctl(fd, IOC_SPACE_INFO, &mut spaces)?;
    let mut data_free = 0u64;
    for i in 0..spaces.u64_at(8).min(slots) as usize {
        let at = 16 + i * 24;
        if spaces.u64_at(at) & BLOCK_GROUP_DATA != 0 {
            data_free += spaces.u64_at(at + 8).saturating_sub(spaces.u64_at(at + 16));
        }
    }
    Ok((data_free + total.saturating_sub(allocated), total))
}
