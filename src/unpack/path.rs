//! Member paths turned into paths inside the volume.
//!
//! An archive path is split on `/`; empty and `.` components are dropped, so `/x`, `//x`
//! and `./x` all mean `x` inside the volume (absolute paths are confined, not followed out).
//! A `..` component or a NUL byte makes the entry unsafe: no root filesystem needs them, and
//! accepting them is how extractors have been escaped.

use crate::error::{Code, Error, Result};
use crate::image::tar::shown;

pub const MAX_PATH_BYTES: usize = 4095;
pub const MAX_NAME_BYTES: usize = 255;

/// A normalized relative path inside the volume; empty means the volume root.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// `self/name`; `name` is one component from an already normalized path.
    pub fn join(&self, name: &[u8]) -> RelPath {
        let mut out = self.0.clone();
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(name);
        RelPath(out)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    pub fn depth(&self) -> usize {
        self.components().count()
    }

    /// The parent path and the last component; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &[u8])> {
        if self.is_root() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some((RelPath(self.0[..i].to_vec()), &self.0[i + 1..])),
            None => Some((RelPath::root(), &self.0[..])),
        }
    }

    /// The path with `prefix` removed: `Some(root)` for the prefix itself, `None` when the
    /// path is not below it.
    pub fn strip_prefix(&self, prefix: &RelPath) -> Option<RelPath> {
        if prefix.is_root() {
            return Some(self.clone());
        }
        if self.0 == prefix.0 {
            return Some(RelPath::root());
        }
        let rest = self.0.strip_prefix(prefix.0.as_slice())?;
        rest.strip_prefix(b"/").map(|r| RelPath(r.to_vec()))
    }

    /// `true` when `self` is `other` or lies below it.
    pub fn is_within(&self, other: &RelPath) -> bool {
        self.strip_prefix(other).is_some()
    }

    pub fn shown(&self) -> String {
        if self.is_root() {
            "/".into()
        } else {
            format!("/{}", shown(&self.0))
        }
    }
}

/// Normalizes a member path; errors name the entry as the archive spelled it.
pub fn normalize(raw: &[u8]) -> Result<RelPath> {
    let unsafe_entry = |why: &str| {
        Error::new(Code::UnsafeImage, format!("entry {:?}: {why}", shown(raw)))
            .with("entry", shown(raw))
    };
    if raw.contains(&0) {
        return Err(unsafe_entry("the path contains a NUL byte"));
    }
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(unsafe_entry("the path contains '..'")),
            name => {
                if name.len() > MAX_NAME_BYTES {
                    return Err(Error::new(
                        Code::ImageInvalid,
                        format!(
                            "entry {:?}: a path component is longer than {MAX_NAME_BYTES} bytes",
                            shown(raw)
                        ),
                    ));
                }
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(name);
            }
        }
    }
    if out.len() > MAX_PATH_BYTES {
        return Err(Error::new(
            Code::ImageInvalid,
            format!(
                "entry {:?}: the path is longer than {MAX_PATH_BYTES} bytes",
                shown(raw)
            ),
        ));
    }
    Ok(RelPath(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &[u8]) -> Vec<u8> {
        normalize(p).unwrap().as_bytes().to_vec()
    }

    #[test]
    fn normal_forms() {
        assert_eq!(n(b"./a/b/"), b"a/b");
        assert_eq!(n(b"/etc//passwd"), b"etc/passwd");
        assert_eq!(n(b"//x"), b"x");
        assert_eq!(n(b"."), b"");
        assert_eq!(n(b"/"), b"");
        assert_eq!(n(b""), b"");
    }

    #[test]
    fn unsafe_forms() {
        for bad in [
            &b".."[..],
            b"a/../../x",
            b"./../x",
            b"/../x",
            b"a/..",
            b"a\0b",
        ] {
            assert_eq!(
                normalize(bad).unwrap_err().code,
                Code::UnsafeImage,
                "{bad:?}"
            );
        }
        assert_eq!(
            normalize(&[b'a'; 256]).unwrap_err().code,
            Code::ImageInvalid
        );
        let deep: Vec<u8> = b"a/".repeat(3000);
        assert_eq!(normalize(&deep).unwrap_err().code, Code::ImageInvalid);
    }

    #[test]
    fn prefixes() {
        let p = normalize(b"rootfs").unwrap();
        assert_eq!(
            normalize(b"rootfs/etc").unwrap().strip_prefix(&p),
            Some(normalize(b"etc").unwrap())
        );
        assert_eq!(
            normalize(b"rootfs").unwrap().strip_prefix(&p),
            Some(RelPath::root())
        );
        assert_eq!(normalize(b"rootfsx/etc").unwrap().strip_prefix(&p), None);
        assert_eq!(normalize(b"metadata.yaml").unwrap().strip_prefix(&p), None);
        let (parent, name) = normalize(b"a/b/c")
            .unwrap()
            .split_last()
            .map(|(p, n)| (p, n.to_vec()))
            .unwrap();
        assert_eq!(
            (parent.as_bytes(), name.as_slice()),
            (&b"a/b"[..], &b"c"[..])
        );
    }
}
