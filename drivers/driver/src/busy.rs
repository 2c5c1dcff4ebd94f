//! Who keeps a volume busy: processes whose working directory, root, executable or open files
//! lie inside it, and filesystems mounted below it. Shared by every driver whose volumes have
//! a path on the host.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `true` when `candidate` is `dir` itself or lies below it (compared as bytes, no resolution:
/// both come from the kernel's own view in /proc).
fn is_within(candidate: &[u8], dir: &[u8]) -> bool {
    candidate == dir
        || (candidate.len() > dir.len()
            && candidate.starts_with(dir)
            && (dir.ends_with(b"/") || candidate[dir.len()] == b'/'))
}

fn process_name(pid: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// The first process (other than this one) that uses something inside `dir`, described as
/// `"pid 123 (bash): cwd /srv/pool/c1/root"`. Processes that vanish while they are read are
/// passed over.
pub fn find_holder(dir: &Path) -> std::io::Result<Option<String>> {
    let dir = dir.as_os_str().as_bytes();
    find_process(|link, target| {
        let _ = link;
        is_within(target.as_os_str().as_bytes(), dir)
    })
}

/// The first process (other than this one) that uses something on the filesystem with
/// device number `dev` (a volume that is a filesystem of its own: a zfs dataset, an LV).
/// Compared by device, not by path: a path from /proc names the file in the holder's mount
/// namespace, which need not be ours.
pub fn find_holder_on_device(dev: u64) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::MetadataExt;
    find_process(|link, _| fs::metadata(link).is_ok_and(|m| m.dev() == dev))
}

/// Who holds a volume that is a filesystem of its own, mounted at `dir`: the process using
/// it if one is found (compared by device, see [`find_holder_on_device`]), and the mount.
pub fn holder_of_mount(dir: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(dir)?.dev();
    Ok(match find_holder_on_device(dev)? {
        Some(process) => format!("{process}; mounted at {}", dir.display()),
        None => format!("mounted at {}", dir.display()),
    })
}

/// The first process whose cwd, root, executable or an open file satisfies `uses` (given
/// the /proc link and its target).
fn find_process(uses: impl Fn(&Path, &Path) -> bool) -> std::io::Result<Option<String>> {
    let me = std::process::id().to_string();
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let pid = entry.file_name();
        let Some(pid) = pid.to_str() else { continue };
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let base = PathBuf::from("/proc").join(pid);
        let holder = |what: &str, link: &Path, target: &Path| {
            uses(link, target).then(|| {
                format!(
                    "pid {pid} ({}): {what} {}",
                    process_name(pid),
                    target.display()
                )
            })
        };
        // A kernel thread or a zombie has no executable, and no working directory or open
        // files either: passed over after one read (most processes are kernel threads). So
        // is a process whose links this one may not read (`EACCES`: the same ptrace check
        // guards all of them), rather than after one refused read per open file. The
        // executable's target, once read, is not read again.
        let exe = base.join("exe");
        let exe_target = match fs::read_link(&exe) {
            Ok(target) => Some(target),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                continue
            }
            Err(_) => None,
        };
        for what in ["cwd", "root"] {
            let link = base.join(what);
            if let Ok(target) = fs::read_link(&link) {
                if let Some(found) = holder(what, &link, &target) {
                    return Ok(Some(found));
                }
            }
        }
        if let Some(found) = exe_target.and_then(|target| holder("exe", &exe, &target)) {
            return Ok(Some(found));
        }
        let Ok(fds) = fs::read_dir(base.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let link = fd.path();
            if let Ok(target) = fs::read_link(&link) {
                let what = format!("fd {}", fd.file_name().to_string_lossy());
                if let Some(found) = holder(&what, &link, &target) {
                    return Ok(Some(found));
                }
            }
        }
    }
    Ok(None)
}

/// Undoes the octal escapes (`\040` for a space, ...) of /proc/self/mountinfo.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// `MAJOR:MINOR` of the mounted device.
    pub device: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    /// The mount source: a device path, or a zfs dataset name.
    pub source: String,
}

/// The mounts of this mount namespace.
pub fn mounts() -> std::io::Result<Vec<MountEntry>> {
    use std::os::unix::ffi::OsStringExt;
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in info.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let (Some(device), Some(mount_point), mut rest) =
            (fields.get(2), fields.get(4), after.split(' '))
        else {
            continue;
        };
        let (Some(fstype), Some(source)) = (rest.next(), rest.next()) else {
            continue;
        };
        out.push(MountEntry {
            device: (*device).to_owned(),
            mount_point: PathBuf::from(std::ffi::OsString::from_vec(unescape_mountinfo(
                mount_point,
            ))),
            fstype: String::from_utf8_lossy(&unescape_mountinfo(fstype)).into_owned(),
            source: String::from_utf8_lossy(&unescape_mountinfo(source)).into_owned(),
        });
    }
    Ok(out)
}

/// A filesystem mounted at or below `dir` (in this mount namespace), as its mount point.
pub fn holder_of_mount_below(dir: &Path) -> std::io::Result<Option<String>> {
    let dir = dir.as_os_str().as_bytes();
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        let Some(mount_point) = line.split(' ').nth(4) else {
            continue;
        };
        let mount_point = unescape_mountinfo(mount_point);
        if is_within(&mount_point, dir) {
            return Ok(Some(format!(
                "a filesystem is mounted at {}",
                String::from_utf8_lossy(&mount_point)
            )));
        }
    }
    Ok(None)
}

/// Who holds an overlay mount, in any process's mount namespace, whose upper layer or one of
/// whose lower layers is `dir`: the process using it if one is found (by the overlay's
/// device, see [`find_holder_on_device`]), and the mount, as `pid 7 (sleep): cwd /m/etc;
/// overlay mounted at /m (mount namespace of pid 1 (systemd))`. Each namespace is read once,
/// through the first process found in it; a process that vanishes meanwhile is passed over.
pub fn overlay_using(dir: &Path) -> std::io::Result<Option<String>> {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;
    let dir = dir.as_os_str().as_bytes();
    let mut seen = HashSet::new();
    // reimage's own namespace is a private copy of the one it started in, and what reimage
    // mounts itself is detached from every namespace: not read.
    if let Ok(own) = fs::metadata("/proc/self/ns/mnt") {
        seen.insert((own.dev(), own.ino()));
    }
    let mut pids: Vec<String> = Vec::new();
    for entry in fs::read_dir("/proc")?.flatten() {
        if let Some(pid) = entry.file_name().to_str() {
            if pid.bytes().all(|b| b.is_ascii_digit()) {
                pids.push(pid.to_owned());
            }
        }
    }
    for pid in pids {
        let Ok(ns) = fs::metadata(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if !seen.insert((ns.dev(), ns.ino())) {
            continue;
        }
        let Ok(info) = fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
            continue;
        };
        let Some((mount_point, device)) = overlay_in(&info, dir) else {
            continue;
        };
        let mount = format!(
            "overlay mounted at {} (mount namespace of pid {pid} ({}))",
            String::from_utf8_lossy(&mount_point),
            process_name(&pid)
        );
        return Ok(Some(
            match device.and_then(|dev| find_holder_on_device(dev).ok().flatten()) {
                Some(process) => format!("{process}; {mount}"),
                None => mount,
            },
        ));
    }
    Ok(None)
}

/// The mount point and device number of the first overlay in `mountinfo` that has `dir` as a
/// layer.
fn overlay_in(mountinfo: &str, dir: &[u8]) -> Option<(Vec<u8>, Option<u64>)> {
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let mut rest = after.splitn(3, ' ');
        let (Some("overlay"), Some(_source), Some(options)) =
            (rest.next(), rest.next(), rest.next())
        else {
            continue;
        };
        let uses = options.split(',').any(|option| {
            let Some((key, value)) = option.split_once('=') else {
                return false;
            };
            match key {
                "upperdir" | "workdir" => unescape_mountinfo(value) == dir,
                key if key.starts_with("lowerdir") => value
                    .split(':')
                    .any(|layer| !layer.is_empty() && unescape_mountinfo(layer) == dir),
                _ => false,
            }
        });
        if uses {
            let fields: Vec<&str> = before.split(' ').collect();
            let device = fields.get(2).and_then(|d| {
                let (major, minor) = d.split_once(':')?;
                Some(rustix::fs::makedev(
                    major.parse().ok()?,
                    minor.parse().ok()?,
                ))
            });
            return Some((unescape_mountinfo(fields.get(4)?), device));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn overlays_are_found_by_any_of_their_layers() {
        let info = "61 1 0:52 / /srv/c1\\040x rw,relatime - overlay overlay rw,lowerdir=/p/.reimage-image.k:/p/base,upperdir=/p/c1/upper,workdir=/p/c1/work\n\
                    62 1 0:53 / /other rw - ext4 /dev/vda rw\n";
        let found = Some((b"/srv/c1 x".to_vec(), Some(rustix::fs::makedev(0, 52))));
        assert_eq!(overlay_in(info, b"/p/c1/upper"), found);
        assert_eq!(overlay_in(info, b"/p/base"), found);
        assert_eq!(overlay_in(info, b"/p/c1"), None);
        assert_eq!(overlay_in(info, b"/p/c2/upper"), None);
    }

    use super::*;

    #[test]
    fn within_is_component_wise() {
        assert!(is_within(b"/a/b", b"/a/b"));
        assert!(is_within(b"/a/b/c", b"/a/b"));
        assert!(!is_within(b"/a/bc", b"/a/b"));
        assert!(is_within(b"/x", b"/"));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(r"/a\04"), b"/a\\04");
    }

    #[test]
    fn finds_a_process_with_its_cwd_inside() {
        let dir = std::env::temp_dir().join(format!("reimage-busy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(&dir)
            .spawn()
            .unwrap();
        let found = find_holder(&dir);
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_dir(&dir).unwrap();
        let found = found
            .unwrap()
            .expect("the sleeping child holds the directory");
        assert!(found.contains("(sleep): cwd"), "{found}");
    }
}
