//! The guest tier's harness (scripts/guest): a QEMU guest booted from Debian's kernel runs
//! real OpenZFS and LVM (thick and thin). The zfs and lvm drivers' conformance runs there;
//! this checks the harness itself, and that it fails loudly rather than skipping.

use std::process::Command;

fn guest(script: &str) -> (i32, String) {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(format!("{root}/scripts/guest"))
        .arg(script)
        .current_dir(root)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_guest_runs_openzfs_and_lvm() {
    let (status, out) = guest(
        "set -e
         modprobe zfs
         zfs version
         truncate -s 256M /tmp/z.img
         zpool create -f tank $(losetup -f --show /tmp/z.img)
         zfs create -o mountpoint=legacy -o refquota=64M tank/v
         zfs get -H -p -o value refquota tank/v
         truncate -s 256M /tmp/l.img
         vgcreate -q vg0 $(losetup -f --show /tmp/l.img)
         lvcreate -q -L 32M -n thick vg0
         lvcreate -q --type thin-pool -L 64M -n pool vg0
         lvcreate -q -V 32M --thin -n thin vg0/pool
         lvs --reportformat json --units b --nosuffix -o lv_name,lv_size,pool_lv vg0",
    );
    eprintln!("{out}");
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("zfs-2."), "the guest's OpenZFS version: {out}");
    assert!(out.contains("67108864"), "refquota: {out}");
    assert!(
        out.contains("\"thin\"") && out.contains("\"thick\""),
        "LVs: {out}"
    );
}

#[test]
fn a_failing_command_fails_the_run() {
    let (status, out) = guest("echo about to fail; exit 7");
    assert_eq!(status, 7, "{out}");
    assert!(out.contains("about to fail"));
}
