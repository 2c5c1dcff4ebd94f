//! Volume names: the one place that decides what a caller may name a volume.

use std::fmt;

/// A volume name as the protocol allows it: `^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`.
///
/// The first character is alphanumeric, so no volume name starts with `.`, `-` or `_`:
/// drivers build their temporary names from those to keep them out of the callers' namespace,
/// and no name can be read as a command-line option.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeName(String);

/// Why a string is not a volume name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameError(pub String);

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NameError {}

pub const MAX_NAME_LEN: usize = 64;

impl VolumeName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let shown: String = name.chars().take(80).collect();
        if name.is_empty() {
            return Err(NameError("the name is empty".into()));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(NameError(format!(
                "the name is {} bytes long; at most {MAX_NAME_LEN} are allowed",
                name.len()
            )));
        }
        let bytes = name.as_bytes();
        if !bytes[0].is_ascii_alphanumeric() {
            return Err(NameError(format!(
                "{shown:?} must start with a letter or digit"
            )));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(NameError(format!(
                "{shown:?} contains {bad:?}; only letters, digits, '_', '.' and '-' are allowed"
            )));
        }
        Ok(VolumeName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["c1", "a", "Web-01.example_x", &"x".repeat(64), "0"] {
            assert!(VolumeName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_hostile_names() {
        for bad in [
            "",
            "-o",
            "../x",
            "a/b",
            "a@b",
            ".hidden",
            "_x",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(65),
            &"y".repeat(300),
        ] {
            assert!(VolumeName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
