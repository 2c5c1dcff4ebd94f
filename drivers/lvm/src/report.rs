//! The JSON reports of `lvs` and `vgs` (`--reportformat json --units b --nosuffix`), read
//! into plain structs. Numbers arrive as strings; an empty string is "not applicable".

use serde::Deserialize;

use reimage_driver::{Error, ErrorKind, Result};

#[derive(Deserialize)]
struct Report<T> {
    report: Vec<T>,
}

#[derive(Deserialize)]
struct LvSection {
    lv: Vec<Lv>,
}

#[derive(Deserialize)]
struct VgSection {
    vg: Vec<Vg>,
}

/// One logical volume, with the fields the driver asks for ([`LV_FIELDS`]).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Lv {
    pub lv_name: String,
    pub lv_uuid: String,
    pub lv_size: String,
    /// The LV this one is a snapshot of (empty when none).
    pub origin: String,
    /// The thin pool of a thin LV (empty for a thick one).
    pub pool_lv: String,
    /// Thin LVs and pools: how full, in percent (empty for thick LVs).
    pub data_percent: String,
    /// "open" when something holds the device open (a mount, a VM).
    pub lv_device_open: String,
    pub lv_dm_path: String,
    /// Comma-separated.
    pub lv_tags: String,
    pub lv_attr: String,
    /// Creation time, `YYYY-MM-DD HH:MM:SS +ZZZZ`.
    pub lv_time: String,
    /// The volume group's size and free space, on every LV's row: the listing of the LVs
    /// says how much room is left without a `vgs` of its own.
    pub vg_size: String,
    pub vg_free: String,
    /// LV sizes are whole extents of this many bytes.
    pub vg_extent_size: String,
}

pub const LV_FIELDS: &str =
    "lv_name,lv_uuid,lv_size,origin,pool_lv,data_percent,lv_device_open,lv_dm_path,lv_tags,lv_attr,lv_time,vg_size,vg_free,vg_extent_size";

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Vg {
    pub vg_name: String,
    pub vg_size: String,
    pub vg_free: String,
    pub vg_extent_size: String,
}

pub const VG_FIELDS: &str = "vg_name,vg_size,vg_free,vg_extent_size";

fn bad(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Failed,
        format!("cannot read the {what} report: {e}"),
    )
}

pub fn parse_lvs(json: &str) -> Result<Vec<Lv>> {
    let r: Report<LvSection> = serde_json::from_str(json).map_err(|e| bad("lvs", e))?;
    Ok(r.report.into_iter().flat_map(|s| s.lv).collect())
}

pub fn parse_vgs(json: &str) -> Result<Vec<Vg>> {
    let r: Report<VgSection> = serde_json::from_str(json).map_err(|e| bad("vgs", e))?;
    Ok(r.report.into_iter().flat_map(|s| s.vg).collect())
}

/// A byte count from a report (`--units b --nosuffix` prints whole bytes).
pub fn bytes(what: &str, text: &str) -> Result<u64> {
    text.trim()
        .parse()
        .map_err(|_| bad("lvm", format!("{what} is {text:?}, not a number of bytes")))
}

/// A percentage from a report; empty means 0.
pub fn percent(what: &str, text: &str) -> Result<f64> {
    if text.trim().is_empty() {
        return Ok(0.0);
    }
    text.trim()
        .parse()
        .map_err(|_| bad("lvm", format!("{what} is {text:?}, not a percentage")))
}

impl Lv {
    pub fn size(&self) -> Result<u64> {
        bytes("lv_size", &self.lv_size)
    }

    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.lv_tags.split(',').filter(|t| !t.is_empty())
    }

    /// `bytes` rounded up to whole extents, as LVM sizes this LV.
    pub fn in_extents(&self, size: u64) -> Result<u64> {
        let extent = bytes("vg_extent_size", &self.vg_extent_size)?.max(1);
        Ok(size.div_ceil(extent).saturating_mul(extent))
    }

    pub fn is_open(&self) -> bool {
        self.lv_device_open == "open"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_lvs_report() {
        let json = r#"{
      "report": [
          {
              "lv": [
                  {"lv_name":"v+c1", "lv_uuid":"abc", "lv_size":"33554432", "origin":"", "pool_lv":"pool", "data_percent":"12.50", "lv_device_open":"", "lv_dm_path":"/dev/mapper/vg0-v+c1", "lv_tags":"a,b", "lv_attr":"Vwi-a-tz--", "lv_time":"2026-11-22 05:00:00 +0000", "vg_size":"1073741824", "vg_free":"536870912", "vg_extent_size":"4194304"}
              ]
          }
      ]
  }"#;
        let lvs = parse_lvs(json).unwrap();
        assert_eq!(lvs.len(), 1);
        assert_eq!(lvs[0].size().unwrap(), 33554432);
        assert_eq!(percent("d", &lvs[0].data_percent).unwrap(), 12.5);
        assert_eq!(lvs[0].tags().collect::<Vec<_>>(), ["a", "b"]);
        assert!(!lvs[0].is_open());
        assert_eq!(lvs[0].in_extents(1).unwrap(), 4 << 20);
        assert_eq!(lvs[0].in_extents(8 << 20).unwrap(), 8 << 20);
    }
}
