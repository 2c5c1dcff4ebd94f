//! POSIX ACLs stored as text (`SCHILY.acl.access`, `SCHILY.acl.default`) turned into the
//! binary `system.posix_acl_*` xattr values the kernel takes.
//!
//! Only numeric ids are used: a named qualifier (`user:alice:r--`, as GNU tar writes when it
//! can resolve a name) is never looked up, since resolving names from the host's user
//! database would give the wrong ids for a container. star's form with the numeric id as a
//! fourth field (`user:alice:r--:1001`) is understood.

const VERSION: u32 = 2;
const UNDEFINED_ID: u32 = u32::MAX;

/// Converts ACL text to the xattr value, or says why it cannot.
pub fn text_to_xattr(text: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(text).map_err(|_| "the ACL text is not UTF-8".to_string())?;
    let mut entries: Vec<(u16, u32, u16)> = Vec::new();
    for item in text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let fields: Vec<&str> = item.split(':').collect();
        if fields.len() < 3 {
            return Err(format!("ACL entry {item:?} is malformed"));
        }
        let (tag, qualifier, perms) = (fields[0], fields[1], fields[2]);
        let mut bits = 0u16;
        for (i, c) in perms.chars().enumerate() {
            bits |= match (i, c) {
                (0, 'r') => 4,
                (1, 'w') => 2,
                (2, 'x') => 1,
                (0..=2, '-') => 0,
                _ => return Err(format!("ACL entry {item:?} has bad permissions")),
            };
        }
        let id = |qualifier: &str| -> Result<u32, String> {
            if let Ok(id) = qualifier.parse::<u32>() {
                return Ok(id);
            }
            match fields.get(3).and_then(|f| f.parse::<u32>().ok()) {
                Some(id) => Ok(id),
                None => Err(format!(
                    "ACL entry {item:?} names a user or group instead of a numeric id"
                )),
            }
        };
        let (tag, id) = match (tag, qualifier.is_empty()) {
            ("user" | "u", true) => (0x01, UNDEFINED_ID),
            ("user" | "u", false) => (0x02, id(qualifier)?),
            ("group" | "g", true) => (0x04, UNDEFINED_ID),
            ("group" | "g", false) => (0x08, id(qualifier)?),
            ("mask" | "m", _) => (0x10, UNDEFINED_ID),
            ("other" | "o", _) => (0x20, UNDEFINED_ID),
            _ => return Err(format!("ACL entry {item:?} has an unknown tag")),
        };
        entries.push((tag, id, bits));
    }
    if entries.len() > 1024 {
        return Err("the ACL has too many entries".into());
    }
    // The kernel wants entries ordered by tag, then id.
    entries.sort_by_key(|&(tag, id, _)| (tag, id));
    let mut out = VERSION.to_le_bytes().to_vec();
    for (tag, id, perm) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_text_becomes_binary() {
        let v = text_to_xattr(b"user::rw-\nuser:1000:r-x\ngroup::r--\nmask::rwx\nother::r--\n")
            .unwrap();
        assert_eq!(v.len(), 4 + 5 * 8);
        assert_eq!(&v[4..12], &[1, 0, 6, 0, 255, 255, 255, 255]);
        assert_eq!(&v[12..20], &[2, 0, 5, 0, 0xe8, 3, 0, 0]);
        assert!(
            text_to_xattr(b"user::rw-,user:alice:r--:1001,group::r--,mask::r--,other::---").is_ok()
        );
    }

    #[test]
    fn names_are_never_resolved() {
        let e = text_to_xattr(b"user::rw-\nuser:alice:r-x\n").unwrap_err();
        assert!(e.contains("numeric"), "{e}");
        assert!(text_to_xattr(b"user::rwz").is_err());
        assert!(text_to_xattr(b"bogus::rw-").is_err());
    }
}
