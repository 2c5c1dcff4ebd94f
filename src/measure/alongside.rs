//! Measuring an image in the pass that unpacks it: an archive that hands the unpacker the
//! entries of the archive it wraps and measures each one on the way, so that an image is
//! decoded once instead of twice (measure, then unpack) where nothing needs its size first.
//!
//! The unpacker needs the rootfs prefix before the first entry, and detection (a unified
//! image's `metadata.yaml` beside `rootfs/`) knows it only after the last. So the prefix is
//! guessed from the first entry, and [`Alongside::finish`] says whether the guess was what
//! measure decided; when it was not, the caller throws the unpacked tree away and measures
//! first, as without this.

use std::collections::VecDeque;

use super::{Measurement, Measurer};
use crate::error::{Code, Error, Result};
use crate::image::archive::{Archive, PieceData};
use crate::image::entry::{Entry, Kind};
use crate::unpack::idmap::IdMap;
use crate::unpack::path::{normalize, RelPath};

pub struct Alongside<'a> {
    inner: &'a mut (dyn Archive + Send),
    measurer: Measurer,
    /// The entries read to guess the prefix, handed over first.
    peeked: VecDeque<Entry>,
    prefix: Option<RelPath>,
    budget: Budget,
}

/// The most the unpack may take: past it, the entry that would cross it is refused before
/// any of it is written (`insufficient_space`), so that a pool is never filled up by an image
/// that measure first would have found too big for it.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub bytes: u64,
    pub inodes: Option<u64>,
}

/// What [`Alongside::finish`] found.
pub enum Measured {
    /// The measurement of what was unpacked.
    Unpacked(Measurement),
    /// Measure picked another rootfs prefix than the unpack used: the tree is not the one
    /// the image stands for.
    OtherPrefix,
}

impl<'a> Alongside<'a> {
    /// Reads the first entry of `inner` to settle the prefix the unpacker must use.
    pub fn new(
        inner: &'a mut (dyn Archive + Send),
        prefix_override: Option<&str>,
        idmap: &IdMap,
        budget: Budget,
    ) -> Result<Self> {
        let measurer = Measurer::new(prefix_override, idmap)?;
        // The first entry that is not the root directory (which has no content, so the
        // reader can be moved past it before the unpacker has seen it).
        let mut peeked = VecDeque::new();
        let first = loop {
            let Some(entry) = inner.next_entry()? else {
                break None;
            };
            let is_root =
                entry.kind == Kind::Dir && normalize(&entry.path).is_ok_and(|path| path.is_root());
            let path = (!is_root).then(|| normalize(&entry.path).ok()).flatten();
            peeked.push_back(entry);
            if !is_root {
                break path;
            }
        };
        let prefix = match measurer.requested_prefix() {
            Some(fixed) => fixed,
            // A unified image is written metadata first or rootfs first; a root filesystem
            // never starts with either.
            None => {
                let detectable = measurer.detectable_prefix();
                let templates = normalize(b"templates")?;
                let starts_unified = first.is_some_and(|path| {
                    path.as_bytes() == b"metadata.yaml"
                        || path.is_within(&templates)
                        || detectable.as_ref().is_some_and(|p| path.is_within(p))
                });
                if starts_unified {
                    detectable
                } else {
                    None
                }
            }
        };
        Ok(Alongside {
            inner,
            measurer,
            peeked,
            prefix,
            budget,
        })
    }

    /// The rootfs prefix the unpacker is to use.
    pub fn prefix(&self) -> Option<RelPath> {
        self.prefix.clone()
    }

    /// Measures `entry`; refuses it as measure would have, before the unpacker sees it.
    fn measure(&mut self, entry: &Entry) -> Result<()> {
        self.measurer.add(entry)?;
        if let Some(e) = self.measurer.error_in(self.prefix.as_ref()) {
            return Err(e.clone());
        }
        let tally = self.measurer.tally_in(self.prefix.as_ref());
        if tally.allocated_bytes > self.budget.bytes
            || self
                .budget
                .inodes
                .is_some_and(|inodes| tally.inodes > inodes)
        {
            return Err(Error::new(
                Code::InsufficientSpace,
                "the image outgrows the pool's free space",
            ));
        }
        Ok(())
    }

    /// Measure's verdict on the whole image, once the unpacker has read all of it.
    pub fn finish(self) -> Result<Measured> {
        let m = self.measurer.finish()?;
        Ok(if m.rootfs_prefix == self.prefix {
            Measured::Unpacked(m)
        } else {
            Measured::OtherPrefix
        })
    }
}

impl Archive for Alongside<'_> {
    fn next_entry(&mut self) -> Result<Option<Entry>> {
        let entry = match self.peeked.pop_front() {
            Some(peeked) => Some(peeked),
            None => self.inner.next_entry()?,
        };
        if let Some(entry) = &entry {
            self.measure(entry)?;
        }
        Ok(entry)
    }

    fn piece_size(&self) -> usize {
        self.inner.piece_size()
    }

    fn piece(&mut self, offset: u64, len: usize, buffer: Vec<u8>) -> Result<PieceData> {
        self.inner.piece(offset, len, buffer)
    }

    fn finish(&mut self) -> Result<()> {
        self.inner.finish()
    }

    fn skipped(&self) -> &[String] {
        self.inner.skipped()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::error::Code;

    /// A directory, or a file of `size` bytes.
    fn entry(path: &str, size: Option<u64>) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: if size.is_some() {
                Kind::File
            } else {
                Kind::Dir
            },
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            size: size.unwrap_or(0),
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            sparse: None,
            notes: Vec::new(),
            unholdable: Vec::new(),
            offset: 0,
        }
    }

    struct Listed(VecDeque<Entry>);

    impl Archive for Listed {
        fn next_entry(&mut self) -> Result<Option<Entry>> {
            Ok(self.0.pop_front())
        }
        fn piece_size(&self) -> usize {
            1 << 20
        }
        fn piece(&mut self, _: u64, len: usize, _: Vec<u8>) -> Result<PieceData> {
            Ok(PieceData::Bytes(vec![0; len]))
        }
        fn finish(&mut self) -> Result<()> {
            Ok(())
        }
    }

    const ROOMY: Budget = Budget {
        bytes: u64::MAX,
        inodes: None,
    };

    /// Reads `entries` through an `Alongside` (with `prefix_override`); returns the prefix it
    /// guessed, the paths handed over, and its verdict.
    fn read(
        entries: &[Entry],
        prefix_override: Option<&str>,
        budget: Budget,
    ) -> (Option<String>, Vec<String>, Result<Measured>) {
        let mut inner = Listed(entries.iter().cloned().collect());
        let mut along =
            Alongside::new(&mut inner, prefix_override, &IdMap::new(Vec::new()), budget)
                .expect("the first entries read");
        let guessed = along
            .prefix()
            .map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned());
        let mut paths = Vec::new();
        loop {
            match along.next_entry() {
                Ok(Some(e)) => paths.push(String::from_utf8_lossy(&e.path).into_owned()),
                Ok(None) => break,
                Err(e) => return (guessed, paths, Err(e)),
            }
        }
        (guessed, paths, along.finish())
    }

    fn unified(first: &[&str]) -> Vec<Entry> {
        let mut all: Vec<Entry> = first.iter().map(|p| entry(p, None)).collect();
        all.extend([
            entry("metadata.yaml", Some(10)),
            entry("rootfs/", None),
            entry("rootfs/etc/", None),
            entry("rootfs/etc/hosts", Some(20)),
            entry("templates/", None),
        ]);
        all
    }

    #[test]
    fn a_root_filesystem_is_unpacked_whole() {
        let entries = [
            entry("./", None),
            entry("./etc/", None),
            entry("./etc/hosts", Some(5)),
        ];
        let (guessed, paths, verdict) = read(&entries, None, ROOMY);
        assert_eq!(guessed, None);
        assert_eq!(paths, ["./", "./etc/", "./etc/hosts"]);
        let Ok(Measured::Unpacked(m)) = verdict else {
            panic!("not measured")
        };
        assert_eq!((m.tally.unpacked_bytes, m.tally.inodes), (5, 3));
    }

    #[test]
    fn a_unified_image_is_recognised_past_its_root_directory() {
        for first in [&[][..], &["./"][..]] {
            let (guessed, paths, verdict) = read(&unified(first), None, ROOMY);
            assert_eq!(guessed.as_deref(), Some("rootfs"));
            assert_eq!(paths.len(), first.len() + 5, "every entry handed over");
            let Ok(Measured::Unpacked(m)) = verdict else {
                panic!("not measured")
            };
            assert_eq!(m.tally.unpacked_bytes, 20, "only below rootfs/");
        }
    }

    #[test]
    fn a_wrong_guess_is_reported() {
        // A unified image that starts with something else is taken for a root filesystem.
        let (guessed, _, verdict) = read(&unified(&["zzz/"]), None, ROOMY);
        assert_eq!(guessed, None);
        assert!(matches!(verdict, Ok(Measured::OtherPrefix)));
        // A root filesystem that starts with a rootfs/ directory is taken for a unified one.
        let entries = [entry("rootfs/", None), entry("etc/", None)];
        let (guessed, _, verdict) = read(&entries, None, ROOMY);
        assert_eq!(guessed.as_deref(), Some("rootfs"));
        assert!(matches!(verdict, Ok(Measured::OtherPrefix)));
    }

    #[test]
    fn an_explicit_prefix_is_not_guessed() {
        let (guessed, _, verdict) = read(&unified(&[]), Some(""), ROOMY);
        assert_eq!(guessed, None);
        assert!(matches!(verdict, Ok(Measured::Unpacked(_))));
        let (guessed, _, _) = read(&unified(&[]), Some("templates"), ROOMY);
        assert_eq!(guessed.as_deref(), Some("templates"));
    }

    #[test]
    fn the_entry_that_crosses_the_budget_is_never_handed_over() {
        let entries = [
            entry("./", None),
            entry("small", Some(4096)),
            entry("big", Some(1 << 30)),
            entry("after", Some(1)),
        ];
        let budget = Budget {
            bytes: 1 << 20,
            inodes: None,
        };
        let (_, paths, verdict) = read(&entries, None, budget);
        assert_eq!(paths, ["./", "small"]);
        assert!(matches!(verdict, Err(e) if e.code == Code::InsufficientSpace));
        let budget = Budget {
            bytes: u64::MAX,
            inodes: Some(2),
        };
        let (_, paths, _) = read(&entries, None, budget);
        assert_eq!(paths, ["./", "small"]);
    }
}
