//! `images`: a pool's image volumes — key, the image's SHA-256 and the file it was last
//! filled from, what it holds, the volumes cloned from it, when it was made and last used.

use super::*;

pub(super) fn images(ctx: Ctx<'_>) -> Result<out::ImageVolumes> {
    let (pool, driver) = needs(&ctx)?;
    let records = image_records(ctx.state, &pool.name)?;
    let images = driver
        .images()?
        .into_iter()
        .map(|image| {
            let record = read_record(&records, &image.key);
            out::ImageVolume {
                key: image.key.as_str().to_owned(),
                sealed: image.sealed,
                sha256: record.as_ref().map(|r| r.sha256.clone()),
                image: record.as_ref().map(|r| r.image.clone()),
                unpacked_bytes: record.as_ref().map(|r| r.unpacked_bytes),
                allocated_bytes: record.as_ref().map(|r| r.allocated_bytes),
                inodes: record.as_ref().map(|r| r.inodes),
                volumes: image.clones,
                holders: image.holders,
                created: record.as_ref().map(|r| r.created),
                last_used: record.as_ref().map(|r| r.last_used),
            }
        })
        .collect();
    Ok(out::ImageVolumes {
        image_volumes: driver.capabilities().image_volumes,
        images,
    })
}
