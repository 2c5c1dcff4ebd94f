//! Image volumes: the unpacked content of one image, kept once per pool and cloned into
//! volumes. An image volume is named by its key (the SHA-256 of the image and of everything
//! that changes the unpacked tree), in a namespace of the pool that no volume name can reach.
//!
//! An image volume is built writable and unsealed, and sealed (read-only, under its final
//! name) as its last step: only a sealed image volume is ever cloned, and an unsealed one is
//! the leftover of an interrupted build, which recovery removes.

use std::fmt;

/// The key of an image volume: 64 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageKey(String);

impl ImageKey {
    pub fn parse(text: &str) -> Option<ImageKey> {
        (text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| ImageKey(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Prefixes of image volumes' names, for drivers that name them beside the volumes. Volume
/// names start with a letter or digit, so they never collide.
pub const SEALED_PREFIX: &str = ".reimage-image.";
pub const UNSEALED_PREFIX: &str = ".reimage-image-new.";

/// The name of the image volume `key`, sealed or not.
pub fn image_name(key: &ImageKey, sealed: bool) -> String {
    let prefix = if sealed {
        SEALED_PREFIX
    } else {
        UNSEALED_PREFIX
    };
    format!("{prefix}{key}")
}

/// The key and state of an image volume named by [`image_name`]; `None` for anything else.
pub fn parse_image_name(name: &str) -> Option<(ImageKey, bool)> {
    if let Some(key) = name.strip_prefix(UNSEALED_PREFIX) {
        return Some((ImageKey::parse(key)?, false));
    }
    Some((ImageKey::parse(name.strip_prefix(SEALED_PREFIX)?)?, true))
}

/// The prefix of a parked image volume's name (zfs): `.reimage-parked.KEY.GUID`.
pub const PARKED_PREFIX: &str = ".reimage-parked.";

/// One image volume of a pool, as its driver finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageVolume {
    pub key: ImageKey,
    /// Complete and read-only; only a sealed image volume is cloned.
    pub sealed: bool,
    /// The volumes that were cloned from it and still hold its content.
    pub clones: Vec<String>,
    /// Volumes the backend keeps depending on it although they no longer hold its content
    /// (a zfs clone refilled in place): it cannot be destroyed before they are, so it is
    /// parked instead ([`crate::Driver::park_image`]).
    pub holders: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_stay_out_of_the_volume_namespace() {
        let key = ImageKey::parse(&"ab".repeat(32)).unwrap();
        for sealed in [true, false] {
            let name = image_name(&key, sealed);
            assert_eq!(parse_image_name(&name), Some((key.clone(), sealed)));
            assert!(crate::VolumeName::parse(&name).is_err());
            assert!(crate::temporary_slot(&name).is_none());
        }
        for bad in ["", "AB", &"g".repeat(64), &"a".repeat(63), "../x"] {
            assert!(ImageKey::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(parse_image_name(".reimage-new.c1"), None);
    }
}
