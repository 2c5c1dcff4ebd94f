//! The guest tier's harness (scripts/guest): a QEMU guest booted from Debian's kernel runs
//! real OpenZFS and LVM (thick and thin). The zfs and lvm drivers' conformance runs there;
//! this checks the harness itself, and that it fails loudly rather than skipping.

use std::process::Command;

fn guest(script: &str) -> (i32, String) {
    guest_booted_with("", script)
}

/// `script` in a guest whose kernel command line also has `append`.
fn guest_booted_with(append: &str, script: &str) -> (i32, String) {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(format!("{root}/scripts/guest"))
        .env("GUEST_APPEND", append)
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

#[test]
fn a_kernel_without_landlock_leaves_the_unpack_confined_by_seccomp_and_warned() {
    // Debian's kernel booted with an `lsm=` list that leaves Landlock out: a real kernel
    // without it. The unpack still runs, under its seccomp list (kill mode), with a warning.
    let script = r#"set -e
mkdir -p /etc/reimage-ll /tmp/ll/pool /tmp/ll/images /tmp/ll/state /tmp/ll/src/etc
echo guest > /tmp/ll/src/etc/hostname
tar -C /tmp/ll/src -cf /tmp/ll/images/a.tar .
cat > /etc/reimage-ll/config.toml <<'TOML'
state_dir = "/tmp/ll/state"
[images]
allow = ["/tmp/ll/images"]
[pools.default]
driver = "dir"
path = "/tmp/ll/pool"
TOML
[ -e /sys/kernel/security/lsm ] || mount -t securityfs none /sys/kernel/security
echo "lsm: $(cat /sys/kernel/security/lsm)"
echo '{"api":1,"op":"create","pool":"default","volume":"v","source":{"image":"/tmp/ll/images/a.tar"}}' |
    REIMAGE_SECCOMP=kill BIN --config /etc/reimage-ll/config.toml --progress never dir
echo "volume: $(cat /tmp/ll/pool/v/etc/hostname)"
"#
    .replace("BIN", env!("CARGO_BIN_EXE_reimage"));
    let (status, out) = guest_booted_with("lsm=lockdown,yama", &script);
    eprintln!("{out}");
    assert_eq!(status, 0, "{out}");
    let lsm = out
        .lines()
        .find(|l| l.starts_with("lsm: "))
        .unwrap_or_default();
    assert!(lsm.contains("yama") && !lsm.contains("landlock"), "{out}");
    assert!(out.contains("\"landlock_abi\":null"), "{out}");
    assert!(out.contains("\"code\":\"unconfined\""), "{out}");
    assert!(out.contains("\"event\":\"result\""), "{out}");
    assert!(
        out.contains("volume: guest"),
        "the volume holds the image: {out}"
    );
}
