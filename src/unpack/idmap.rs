//! Shifting ids for unprivileged containers: owners, the uid/gid entries of POSIX ACL xattrs,
//! and the root id of file capabilities (v2 capabilities become v3 with the mapped root id, as
//! the kernel itself does when a namespaced root writes them).

/// One range of an id mapping: container ids `container..container+count` become host ids
/// `host..host+count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdRange {
    pub host: u32,
    pub container: u32,
    pub count: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap {
    ranges: Vec<IdRange>,
}

const ACL_XATTRS: [&[u8]; 2] = [b"system.posix_acl_access", b"system.posix_acl_default"];
const CAP_XATTR: &[u8] = b"security.capability";
const ACL_VERSION: u32 = 2;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;
const VFS_CAP_REVISION_MASK: u32 = 0xff00_0000;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;

impl IdMap {
    pub fn new(ranges: Vec<IdRange>) -> Self {
        IdMap { ranges }
    }

    pub fn ranges(&self) -> &[IdRange] {
        &self.ranges
    }

    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The host id for container id `id`; `None` when no range maps it. Without ranges every
    /// id maps to itself.
    pub fn map(&self, id: u32) -> Option<u32> {
        if self.ranges.is_empty() {
            return Some(id);
        }
        self.ranges.iter().find_map(|r| {
            let offset = id.checked_sub(r.container)?;
            (offset < r.count).then(|| r.host + offset)
        })
    }

    /// The value to store for xattr `name`: ACL and capability values shifted, others as they
    /// are. Errors say which id could not be mapped or why the value is malformed.
    pub fn shift_xattr(&self, name: &[u8], value: &[u8]) -> Result<Vec<u8>, String> {
        if self.is_identity() {
            return Ok(value.to_vec());
        }
        if ACL_XATTRS.contains(&name) {
            return self.shift_acl(value);
        }
        if name == CAP_XATTR {
            return self.shift_capability(value);
        }
        Ok(value.to_vec())
    }

    fn shift_acl(&self, value: &[u8]) -> Result<Vec<u8>, String> {
        if value.len() < 4 || (value.len() - 4) % 8 != 0 {
            return Err("malformed POSIX ACL value".into());
        }
        if u32::from_le_bytes([value[0], value[1], value[2], value[3]]) != ACL_VERSION {
            return Err("unknown POSIX ACL version".into());
        }
        let mut out = value.to_vec();
        for entry in out[4..].chunks_mut(8) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            if tag == ACL_USER || tag == ACL_GROUP {
                let id = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
                let mapped = self
                    .map(id)
                    .ok_or_else(|| format!("ACL id {id} is outside every idmap range"))?;
                entry[4..8].copy_from_slice(&mapped.to_le_bytes());
            }
        }
        Ok(out)
    }

    fn shift_capability(&self, value: &[u8]) -> Result<Vec<u8>, String> {
        if value.len() < 4 {
            return Err("malformed file capability".into());
        }
        let magic = u32::from_le_bytes([value[0], value[1], value[2], value[3]]);
        let (body, rootid) = match (magic & VFS_CAP_REVISION_MASK, value.len()) {
            (VFS_CAP_REVISION_2, 20) => (&value[..20], 0),
            (VFS_CAP_REVISION_3, 24) => (
                &value[..20],
                u32::from_le_bytes([value[20], value[21], value[22], value[23]]),
            ),
            _ => return Err("unsupported file capability revision".into()),
        };
        let mapped = self
            .map(rootid)
            .ok_or_else(|| format!("capability root id {rootid} is outside every idmap range"))?;
        let mut out = body.to_vec();
        let flags = magic & !VFS_CAP_REVISION_MASK;
        out[..4].copy_from_slice(&(VFS_CAP_REVISION_3 | flags).to_le_bytes());
        out.extend_from_slice(&mapped.to_le_bytes());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> IdMap {
        IdMap::new(vec![IdRange {
            host: 100000,
            container: 0,
            count: 65536,
        }])
    }

    #[test]
    fn ids() {
        assert_eq!(map().map(0), Some(100000));
        assert_eq!(map().map(65535), Some(165535));
        assert_eq!(map().map(65536), None);
        assert_eq!(IdMap::default().map(7), Some(7));
    }

    #[test]
    fn acl_entries_shift() {
        let mut acl = ACL_VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (0x01u16, 6u16, u32::MAX),
            (ACL_USER, 4, 1000),
            (ACL_GROUP, 4, 5),
        ] {
            acl.extend_from_slice(&tag.to_le_bytes());
            acl.extend_from_slice(&perm.to_le_bytes());
            acl.extend_from_slice(&id.to_le_bytes());
        }
        let out = map().shift_xattr(b"system.posix_acl_access", &acl).unwrap();
        assert_eq!(&out[8..12], &u32::MAX.to_le_bytes()); // ACL_USER_OBJ carries no id
        assert_eq!(&out[16..20], &101000u32.to_le_bytes());
        assert_eq!(&out[24..28], &100005u32.to_le_bytes());
    }

    #[test]
    fn v2_capability_becomes_v3() {
        let mut cap = (VFS_CAP_REVISION_2 | 1).to_le_bytes().to_vec();
        cap.extend_from_slice(&[0x00, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let out = map().shift_xattr(b"security.capability", &cap).unwrap();
        assert_eq!(out.len(), 24);
        assert_eq!(&out[..4], &(VFS_CAP_REVISION_3 | 1).to_le_bytes());
        assert_eq!(&out[20..], &100000u32.to_le_bytes());
        assert_eq!(map().shift_xattr(b"user.x", b"v").unwrap(), b"v");
    }
}
