//! Sparse file maps of tar archives: old GNU (`S` members with the map in the header and
//! extension blocks) and the PAX formats 0.0 (repeated `GNU.sparse.offset`/`numbytes`
//! records), 0.1 (`GNU.sparse.map`) and 1.0 (the map as decimal lines at the start of the
//! member's data).
//!
//! A map is a list of (offset, length) data segments; everything else in the file is a hole.
//! Maps are checked before use: segments in order, not overlapping, inside the real size, and
//! adding up to the data the archive really holds. Their number and the real size are bounded.

use crate::error::{Code, Error, Result};

/// Sparse maps with more segments than this are refused.
pub const MAX_SEGMENTS: usize = 1 << 20;
/// Sparse files claiming a larger size than this are refused: GNU tar's `off_t` range. Holes
/// cost nothing to read or write; a file larger than the volume's filesystem holds fails
/// to be written with a message that says so.
pub const MAX_REAL_SIZE: u64 = i64::MAX as u64;

pub type Map = Vec<(u64, u64)>;

fn invalid(at: u64, why: impl std::fmt::Display) -> Error {
    Error::new(
        Code::ImageInvalid,
        format!("tar header at offset {at}: sparse map: {why}"),
    )
    .with("offset", at)
}

/// Checks `map` against the real size and the bytes of data stored; drops empty segments.
pub fn validate(mut map: Map, real_size: u64, stored: u64, at: u64) -> Result<Map> {
    if real_size > MAX_REAL_SIZE {
        return Err(invalid(
            at,
            format!("a real size of {real_size} bytes is beyond what a file can be (2^63 - 1)"),
        ));
    }
    if map.len() > MAX_SEGMENTS {
        return Err(invalid(at, format!("more than {MAX_SEGMENTS} segments")));
    }
    map.retain(|&(_, len)| len > 0);
    let mut end = 0u64;
    let mut total = 0u64;
    for &(offset, len) in &map {
        let seg_end = offset
            .checked_add(len)
            .ok_or_else(|| invalid(at, "a segment overflows"))?;
        if offset < end {
            return Err(invalid(at, "segments overlap or are out of order"));
        }
        if seg_end > real_size {
            return Err(invalid(at, "a segment lies beyond the file's size"));
        }
        end = seg_end;
        total += len;
    }
    if total != stored {
        return Err(invalid(
            at,
            format!("segments hold {total} bytes but the member stores {stored}"),
        ));
    }
    Ok(map)
}

fn number(text: &[u8], at: u64) -> Result<u64> {
    std::str::from_utf8(text)
        .ok()
        .filter(|t| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| invalid(at, "a number is malformed"))
}

/// PAX 0.1: `offset,size,offset,size,...`.
pub fn parse_01(text: &[u8], at: u64) -> Result<Map> {
    let numbers: Vec<u64> = text
        .split(|&b| b == b',')
        .map(|n| number(n, at))
        .collect::<Result<_>>()?;
    if numbers.len() % 2 != 0 || numbers.len() / 2 > MAX_SEGMENTS {
        return Err(invalid(at, "GNU.sparse.map must hold offset,size pairs"));
    }
    Ok(numbers.chunks(2).map(|p| (p[0], p[1])).collect())
}

/// PAX 0.0: the offset/numbytes records in the order they appeared.
pub fn parse_00(records: &[(String, Vec<u8>)], at: u64) -> Result<Map> {
    let mut map = Vec::new();
    let mut offset = None;
    for (key, value) in records {
        match (key.as_str(), offset) {
            ("GNU.sparse.offset", None) => offset = Some(number(value, at)?),
            ("GNU.sparse.numbytes", Some(o)) => {
                map.push((o, number(value, at)?));
                offset = None;
            }
            _ => {
                return Err(invalid(
                    at,
                    "GNU.sparse.offset and numbytes records must alternate",
                ))
            }
        }
        if map.len() > MAX_SEGMENTS {
            return Err(invalid(at, format!("more than {MAX_SEGMENTS} segments")));
        }
    }
    if offset.is_some() {
        return Err(invalid(at, "a GNU.sparse.offset without its numbytes"));
    }
    Ok(map)
}

/// Old GNU: up to `count` entries of (offset[12], numbytes[12]) at the start of `area`;
/// an all-zero entry ends the list.
pub fn parse_gnu_entries(
    area: &[u8],
    count: usize,
    at: u64,
    parse: impl Fn(&[u8]) -> Option<u64>,
) -> Result<Map> {
    let mut map = Vec::new();
    for i in 0..count {
        let e = &area[i * 24..i * 24 + 24];
        if e.iter().all(|&b| b == 0) {
            break;
        }
        let offset = parse(&e[..12]).ok_or_else(|| invalid(at, "an unreadable offset"))?;
        let len = parse(&e[12..]).ok_or_else(|| invalid(at, "an unreadable length"))?;
        map.push((offset, len));
    }
    Ok(map)
}

/// PAX 1.0: the map at the start of the data, as decimal lines: the segment count, then an
/// offset and a length per segment. `read_line` yields the next line (without `\n`).
pub fn parse_10(mut read_line: impl FnMut() -> Result<Vec<u8>>, at: u64) -> Result<Map> {
    let count = number(&read_line()?, at)? as usize;
    if count > MAX_SEGMENTS {
        return Err(invalid(at, format!("more than {MAX_SEGMENTS} segments")));
    }
    let mut map = Vec::with_capacity(count);
    for _ in 0..count {
        let offset = number(&read_line()?, at)?;
        let len = number(&read_line()?, at)?;
        map.push((offset, len));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_checked() {
        assert_eq!(
            validate(vec![(0, 10), (100, 5), (200, 0)], 300, 15, 0).unwrap(),
            vec![(0, 10), (100, 5)]
        );
        assert!(
            validate(vec![(0, 10), (5, 5)], 300, 15, 0).is_err(),
            "overlap"
        );
        assert!(
            validate(vec![(100, 5), (0, 10)], 300, 15, 0).is_err(),
            "order"
        );
        assert!(
            validate(vec![(295, 10)], 300, 10, 0).is_err(),
            "beyond the end"
        );
        assert!(validate(vec![(0, 10)], 300, 11, 0).is_err(), "stored size");
        assert!(
            validate(vec![(u64::MAX, 10)], u64::MAX, 10, 0).is_err(),
            "overflow"
        );
        assert!(validate(vec![], MAX_REAL_SIZE + 1, 0, 0).is_err(), "huge");
    }

    #[test]
    fn formats() {
        assert_eq!(
            parse_01(b"4997120,4096,10485760,0", 0).unwrap(),
            vec![(4997120, 4096), (10485760, 0)]
        );
        assert!(parse_01(b"1,2,3", 0).is_err());
        let recs = vec![
            ("GNU.sparse.offset".to_string(), b"10".to_vec()),
            ("GNU.sparse.numbytes".to_string(), b"5".to_vec()),
        ];
        assert_eq!(parse_00(&recs, 0).unwrap(), vec![(10, 5)]);
        let mut lines = vec![b"1".to_vec(), b"8".to_vec(), b"2".to_vec()].into_iter();
        assert_eq!(
            parse_10(|| Ok(lines.next().unwrap_or_default()), 0).unwrap(),
            vec![(8, 2)]
        );
    }
}
