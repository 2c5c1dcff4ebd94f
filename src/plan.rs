//! Planning a fill: from the measured image, the request and the pool's state, the size the
//! new volume gets and the space it needs, decided before anything is changed.
//!
//! Pure functions: no I/O, so every rule here is unit-tested.

use reimage_driver::{PoolSpace, SizeModel, Usage};

use crate::error::{Code, Error, Result};
use crate::protocol::request::{Fill, Mode, SizePolicy};

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Bytes the image takes on a 4 KiB-block filesystem (the measure estimate).
    pub need: u64,
    /// `need` grown by the headroom.
    pub need_with_headroom: u64,
    /// Bytes the volume's filesystem keeps for itself at that size (an xfs log), added to
    /// the size it gets; 0 where the volume is not a filesystem of its own size.
    pub fs_overhead: u64,
    /// Size or quota the new volume gets; `None` where the driver has no sizes.
    pub target_size: Option<u64>,
    /// Bytes the pool must have free before anything is destroyed.
    pub required: u64,
    /// Bytes the pool has free for it (in-place counts the old volume as freed).
    pub available: u64,
    /// `size` was asked for but the driver cannot enforce it.
    pub size_ignored: bool,
    /// An overcommitting pool (LVM thin): what its volumes were promised before this one,
    /// and the pool's real size.
    pub provisioned: Option<(u64, u64)>,
    /// Bytes of the image volume this fill builds before it clones it (a miss).
    pub image_bytes: Option<u64>,
}

pub fn grown(bytes: u64, headroom: f64) -> u64 {
    let v = (bytes as f64 * (1.0 + headroom)).ceil();
    if v >= u64::MAX as f64 {
        u64::MAX
    } else {
        v as u64
    }
}

/// What the measured image needs, and where the new volume's blocks come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    /// Bytes on a 4 KiB-block filesystem (the measure estimate).
    pub bytes: u64,
    pub inodes: u64,
    pub blocks: Blocks,
    /// See [`Plan::fs_overhead`].
    pub fs_overhead: u64,
}

/// Where a new volume's blocks come from, which decides the space it takes from the pool now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocks {
    /// Unpacked into the volume: the image's bytes and inodes, grown by the headroom.
    Unpacked,
    /// A clone of an image volume the pool holds: it shares every block and takes none now
    /// (its size limit still counts what it shares).
    Shared,
    /// A clone of an image volume built first: the image volume takes the image's bytes and
    /// inodes (grown by the headroom, the measure being an estimate), the clone none.
    NewImageVolume,
}

/// Decides the size and checks the space for filling a volume with what `need` says.
/// `current` is the volume being replaced (rebuild), `None` for create.
pub fn plan_fill(
    model: SizeModel,
    fill: &Fill,
    need: Need,
    current: Option<&Usage>,
    mode: Mode,
    space: PoolSpace,
) -> Result<Plan> {
    let (inodes, blocks, fs_overhead) = (need.inodes, need.blocks, need.fs_overhead);
    let need = need.bytes;
    let need_with_headroom = grown(need, fill.headroom);
    let target_size = match model {
        SizeModel::Unlimited => None,
        SizeModel::Quota | SizeModel::Allocated => Some(match (fill.size_policy, fill.size) {
            (SizePolicy::Exact, Some(size)) => {
                if need.saturating_add(fs_overhead) > size {
                    return Err(Error::new(
                        Code::InsufficientSpace,
                        format!(
                            "the image needs {need} bytes but size_policy \"exact\" fixes the size at {size}; \
                             give a larger size or drop size_policy"
                        ),
                    )
                    .with("needed", need.saturating_add(fs_overhead))
                    .with("size", size));
                }
                size
            }
            (_, size) => size
                .unwrap_or(0)
                .max(current.and_then(|u| u.size).unwrap_or(0))
                .max(need_with_headroom.saturating_add(fs_overhead)),
        }),
    };
    let required = match (model, target_size, blocks) {
        (SizeModel::Allocated, Some(size), _) => size,
        (_, _, Blocks::Shared) => 0,
        _ => need_with_headroom,
    };
    let image_bytes = (blocks == Blocks::NewImageVolume).then_some(need_with_headroom);
    let freed = match (mode, current) {
        (Mode::InPlace, Some(usage)) => match model {
            SizeModel::Allocated => usage.size.unwrap_or(usage.used),
            _ => usage.used,
        },
        _ => 0,
    };
    let available = space.available.saturating_add(freed);
    if required > available {
        let (what, fix) = match image_bytes {
            Some(_) => (
                "this image's image volume, which every volume filled from it shares,",
                "free space in the pool (`prune` removes unused image volumes)",
            ),
            None => (
                "the new volume",
                "free space in the pool or use a smaller headroom",
            ),
        };
        let e = Error::new(
            Code::InsufficientSpace,
            format!(
                "the pool has {available} bytes free but {what} needs {required} (image {need} \
                 bytes + {:.0}% headroom); {fix}",
                fill.headroom * 100.0
            ),
        )
        .with("needed", required)
        .with("available", available)
        .with("measured", need)
        .with("headroom", fill.headroom);
        return Err(match image_bytes {
            Some(bytes) => e.with("image_bytes", bytes),
            None => e,
        });
    }
    if let (Some(free_inodes), false) = (space.inodes_available, blocks == Blocks::Shared) {
        let freed = match (mode, current) {
            (Mode::InPlace, Some(usage)) => usage.inodes.unwrap_or(0),
            _ => 0,
        };
        if inodes > free_inodes.saturating_add(freed) {
            return Err(Error::new(
                Code::InsufficientSpace,
                format!(
                    "the pool has {free_inodes} free inodes but the image needs {inodes}; \
                     free inodes in the pool (or make its filesystem with more)"
                ),
            )
            .with("needed_inodes", inodes)
            .with("available_inodes", free_inodes));
        }
    }
    Ok(Plan {
        need,
        need_with_headroom,
        fs_overhead,
        target_size,
        required,
        available,
        size_ignored: fill.size.is_some() && model == SizeModel::Unlimited,
        provisioned: space.provisioned.map(|p| (p, space.total)),
        image_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::request::Source;

    fn fill(size: Option<u64>, policy: SizePolicy) -> Fill {
        Fill {
            source: Source::Empty,
            size,
            headroom: 0.2,
            size_policy: policy,
            idmap: vec![],
            dry_run: false,
            unsupported_metadata: Default::default(),
        }
    }

    const ROOMY: PoolSpace = PoolSpace {
        available: 1 << 40,
        total: 1 << 40,
        inodes_available: None,
        provisioned: None,
    };

    fn n(bytes: u64) -> Need {
        Need {
            bytes,
            inodes: 1,
            blocks: Blocks::Unpacked,
            fs_overhead: 0,
        }
    }

    #[test]
    fn size_is_the_largest_of_request_current_and_need() {
        let cur = Usage {
            size: Some(500),
            used: 100,
            inodes: None,
        };
        let p = plan_fill(
            SizeModel::Quota,
            &fill(Some(300), SizePolicy::Grow),
            n(1000),
            Some(&cur),
            Mode::Atomic,
            ROOMY,
        )
        .unwrap();
        assert_eq!(p.target_size, Some(1200));
        let p = plan_fill(
            SizeModel::Quota,
            &fill(Some(5000), SizePolicy::Grow),
            n(1000),
            Some(&cur),
            Mode::Atomic,
            ROOMY,
        )
        .unwrap();
        assert_eq!(p.target_size, Some(5000));
        let p = plan_fill(
            SizeModel::Unlimited,
            &fill(Some(5000), SizePolicy::Grow),
            n(1000),
            None,
            Mode::Atomic,
            ROOMY,
        )
        .unwrap();
        assert_eq!(p.target_size, None);
        assert!(p.size_ignored);
    }

    #[test]
    fn exact_refuses_an_image_that_does_not_fit() {
        let e = plan_fill(
            SizeModel::Quota,
            &fill(Some(999), SizePolicy::Exact),
            n(1000),
            None,
            Mode::Atomic,
            ROOMY,
        )
        .unwrap_err();
        assert_eq!(e.code, Code::InsufficientSpace);
        let p = plan_fill(
            SizeModel::Quota,
            &fill(Some(1000), SizePolicy::Exact),
            n(1000),
            None,
            Mode::Atomic,
            ROOMY,
        )
        .unwrap();
        assert_eq!(p.target_size, Some(1000));
    }

    #[test]
    fn space_is_checked_and_in_place_counts_the_old_volume() {
        let small = PoolSpace {
            available: 1000,
            total: 10_000,
            inodes_available: Some(10),
            provisioned: None,
        };
        let cur = Usage {
            size: None,
            used: 5000,
            inodes: None,
        };
        let e = plan_fill(
            SizeModel::Unlimited,
            &fill(None, SizePolicy::Grow),
            n(1000),
            Some(&cur),
            Mode::Atomic,
            small,
        )
        .unwrap_err();
        assert_eq!(e.code, Code::InsufficientSpace);
        assert_eq!(e.details["needed"], 1200);
        assert_eq!(e.details["available"], 1000);
        assert!(plan_fill(
            SizeModel::Unlimited,
            &fill(None, SizePolicy::Grow),
            n(1000),
            Some(&cur),
            Mode::InPlace,
            small
        )
        .is_ok());
        // A block device takes its whole size from the pool.
        let e = plan_fill(
            SizeModel::Allocated,
            &fill(Some(1 << 20), SizePolicy::Grow),
            n(10),
            None,
            Mode::Atomic,
            small,
        )
        .unwrap_err();
        assert_eq!(e.details["needed"], 1 << 20);
        let e = plan_fill(
            SizeModel::Unlimited,
            &fill(None, SizePolicy::Grow),
            Need {
                bytes: 1,
                inodes: 11,
                blocks: Blocks::Unpacked,
                fs_overhead: 0,
            },
            None,
            Mode::Atomic,
            small,
        )
        .unwrap_err();
        assert_eq!(e.details["needed_inodes"], 11);
    }

    #[test]
    fn a_filesystem_of_its_own_size_gets_its_overhead_on_top() {
        let need = Need {
            fs_overhead: 64,
            ..n(1000)
        };
        let plan = plan_fill(
            SizeModel::Quota,
            &fill(None, SizePolicy::Grow),
            need,
            None,
            Mode::Atomic,
            ROOMY,
        )
        .unwrap();
        assert_eq!(plan.target_size, Some(grown(1000, 0.2) + 64));
        // Space is asked for what is written, not for the filesystem's reservations.
        assert_eq!(plan.required, grown(1000, 0.2));
        let e = plan_fill(
            SizeModel::Quota,
            &fill(Some(1030), SizePolicy::Exact),
            need,
            None,
            Mode::Atomic,
            ROOMY,
        )
        .unwrap_err();
        assert_eq!(e.details["needed"], 1064);
    }

    #[test]
    fn a_clone_takes_no_space_and_a_new_image_volume_takes_the_image() {
        let full = PoolSpace {
            available: 100,
            total: 10_000,
            inodes_available: Some(0),
            provisioned: None,
        };
        let need = |blocks| Need {
            bytes: 1000,
            inodes: 10,
            blocks,
            fs_overhead: 0,
        };
        // A clone of an image volume the pool holds: nothing to find room for, but the limit
        // still counts what the clone shares.
        let p = plan_fill(
            SizeModel::Quota,
            &fill(None, SizePolicy::Grow),
            need(Blocks::Shared),
            None,
            Mode::Atomic,
            full,
        )
        .unwrap();
        assert_eq!(
            (p.required, p.target_size, p.image_bytes),
            (0, Some(1200), None)
        );
        // The image volume built first needs the image's room, and says so.
        let e = plan_fill(
            SizeModel::Quota,
            &fill(None, SizePolicy::Grow),
            need(Blocks::NewImageVolume),
            None,
            Mode::Atomic,
            full,
        )
        .unwrap_err();
        assert_eq!(e.code, Code::InsufficientSpace);
        assert_eq!(e.details["image_bytes"], 1200);
        assert!(e.message.contains("image volume"), "{e}");
        let roomy = plan_fill(
            SizeModel::Quota,
            &fill(None, SizePolicy::Grow),
            need(Blocks::NewImageVolume),
            None,
            Mode::Atomic,
            ROOMY,
        )
        .unwrap();
        assert_eq!(roomy.image_bytes, Some(1200));
    }
}
