//! `images`: a pool's image volumes — key, the image's SHA-256 and the file it was last
//! filled from, what it holds, the volumes cloned from it, when it was made and last used.

use super::*;

pub(super) fn images(ctx: Ctx<'_>) -> Result<Map<String, Value>> {
    let (pool, driver) = needs(&ctx)?;
    let records = image_records(ctx.state, &pool.name)?;
    let list: Vec<Value> = driver
        .images()?
        .into_iter()
        .map(|image| {
            let record = read_record(&records, &image.key);
            json!({
                "key": image.key.as_str(),
                "sealed": image.sealed,
                "sha256": record.as_ref().map(|r| r.sha256.clone()),
                "image": record.as_ref().map(|r| r.image.clone()),
                "unpacked_bytes": record.as_ref().map(|r| r.unpacked_bytes),
                "allocated_bytes": record.as_ref().map(|r| r.allocated_bytes),
                "inodes": record.as_ref().map(|r| r.inodes),
                "volumes": image.clones,
                "created": record.as_ref().map(|r| r.created),
                "last_used": record.as_ref().map(|r| r.last_used),
            })
        })
        .collect();
    let mut out = Map::new();
    out.insert(
        "image_volumes".into(),
        driver.capabilities().image_volumes.into(),
    );
    out.insert("images".into(), Value::Array(list));
    Ok(out)
}
