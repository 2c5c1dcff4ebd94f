//! Image volumes that are plain directories beside a [`PoolDir`]'s volumes (the dir and
//! overlay drivers): built as `.reimage-image-new.KEY`, sealed by renaming that to
//! `.reimage-image.KEY` (never replacing one), removed fd-relative by [`crate::tree`]'s rules.
//! Which volumes use one is the driver's business.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{AtFlags, Mode, RenameFlags};
use rustix::io::Errno;

use crate::image::{image_name, parse_image_name};
use crate::pooldir::PoolDir;
use crate::walk::open_dir;
use crate::{Error, ErrorKind, ImageKey, Result};

fn cname(key: &ImageKey, sealed: bool) -> CString {
    // Image names are ASCII without NUL, so this cannot fail.
    CString::new(image_name(key, sealed)).unwrap_or_default()
}

impl PoolDir {
    /// Makes the empty, unsealed image volume `key`.
    pub fn create_image_dir(&self, key: &ImageKey) -> Result<()> {
        rustix::fs::mkdirat(&self.fd, cname(key, false), Mode::from_raw_mode(0o755)).map_err(|e| {
            match e {
                Errno::EXIST => Error::new(
                    ErrorKind::AlreadyExists,
                    format!("unsealed image volume {key} already exists"),
                ),
                e => Error::errno(format!("creating image volume {key}"), e),
            }
        })
    }

    /// The image volume's directory, `None` when there is none.
    pub fn open_image_dir(&self, key: &ImageKey, sealed: bool) -> Result<Option<OwnedFd>> {
        match open_dir(self.fd.as_fd(), &cname(key, sealed)) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(Error::errno(
                format!(
                    "opening {}",
                    self.path.join(image_name(key, sealed)).display()
                ),
                e,
            )),
        }
    }

    /// As [`PoolDir::open_image_dir`], and `NotFound` when there is none.
    pub fn require_image_dir(&self, key: &ImageKey, sealed: bool) -> Result<OwnedFd> {
        self.open_image_dir(key, sealed)?.ok_or_else(|| {
            let state = if sealed { "" } else { "unsealed " };
            Error::new(
                ErrorKind::NotFound,
                format!("{state}image volume {key} does not exist"),
            )
        })
    }

    /// Seals the image volume built as `building`: renamed to the sealed name of `key`, never
    /// over an existing one.
    pub fn seal_image_dir(&self, building: &ImageKey, key: &ImageKey) -> Result<()> {
        rustix::fs::renameat_with(
            &self.fd,
            cname(building, false),
            &self.fd,
            cname(key, true),
            RenameFlags::NOREPLACE,
        )
        .map_err(|e| Error::errno(format!("sealing image volume {key}"), e))
    }

    /// The image volumes in the pool directory, sealed or not, sorted by key.
    pub fn image_dirs(&self) -> Result<Vec<(ImageKey, bool)>> {
        let mut found: Vec<_> = self
            .names()?
            .iter()
            .filter_map(|name| parse_image_name(name))
            .collect();
        found.sort();
        Ok(found)
    }

    /// Removes the image volume's tree; one that does not exist is not an error.
    pub fn remove_image_dir(&self, key: &ImageKey, sealed: bool) -> Result<()> {
        let name = cname(key, sealed);
        match rustix::fs::statat(&self.fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(Error::errno(format!("stat of image volume {key}"), e)),
            Ok(_) => {}
        }
        crate::tree::remove_tree(
            self.fd.as_fd(),
            &name,
            &self
                .path
                .join(image_name(key, sealed))
                .display()
                .to_string(),
        )
    }
}
