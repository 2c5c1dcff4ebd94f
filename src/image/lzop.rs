//! Decompression of lzop (`.lzo`) files: the lzop container around LZO1X blocks, decoded with
//! reimage's own bounded LZO decoder ([`super::lzo`]).
//!
//! Every header and block checksum the file carries (Adler-32 or CRC-32, of the header, the
//! compressed and the decompressed data) is verified. Blocks are at most 64 MiB, lzop's own
//! limit. Filters (an lzop option nobody uses) are refused. Concatenated members are read
//! one after the other.

use std::io::{BufRead, Read};

pub const MAGIC: [u8; 9] = [0x89, b'L', b'Z', b'O', 0x00, 0x0d, 0x0a, 0x1a, 0x0a];
const MAX_BLOCK: u32 = 64 << 20;

const ADLER32_D: u32 = 0x1;
const ADLER32_C: u32 = 0x2;
const EXTRA_FIELD: u32 = 0x40;
const CRC32_D: u32 = 0x100;
const CRC32_C: u32 = 0x200;
const FILTER: u32 = 0x800;
const HEADER_CRC32: u32 = 0x1000;

fn corrupt(why: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("corrupt lzop stream: {why}"),
    )
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

pub struct LzopDecoder<R> {
    inner: R,
    flags: u32,
    /// In a member, after its header.
    in_member: bool,
    out: Vec<u8>,
    at: usize,
}

impl<R: BufRead> LzopDecoder<R> {
    pub fn new(inner: R) -> Self {
        LzopDecoder {
            inner,
            flags: 0,
            in_member: false,
            out: Vec::new(),
            at: 0,
        }
    }

    fn bytes(&mut self, n: usize, header: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.inner
            .read_exact(&mut b)
            .map_err(|_| corrupt("truncated"))?;
        header.extend_from_slice(&b);
        Ok(b)
    }

    fn u32(&mut self, header: &mut Vec<u8>) -> std::io::Result<u32> {
        let b = self.bytes(4, header)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u16(&mut self, header: &mut Vec<u8>) -> std::io::Result<u16> {
        let b = self.bytes(2, header)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Reads a member header; `false` at the end of the input.
    fn header(&mut self) -> std::io::Result<bool> {
        if self.inner.fill_buf()?.is_empty() {
            return Ok(false);
        }
        let mut ignored = Vec::new();
        if self.bytes(MAGIC.len(), &mut ignored)? != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let mut h = Vec::new();
        let version = self.u16(&mut h)?;
        self.u16(&mut h)?; // library version
        if version >= 0x0940 {
            self.u16(&mut h)?; // version needed to extract
        }
        let method = self.bytes(1, &mut h)?[0];
        if !(1..=3).contains(&method) {
            return Err(corrupt(format!("unknown method {method}")));
        }
        if version >= 0x0940 {
            self.bytes(1, &mut h)?; // level
        }
        let flags = self.u32(&mut h)?;
        if flags & FILTER != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "lzop files made with a filter are not supported",
            ));
        }
        self.u32(&mut h)?; // mode
        self.u32(&mut h)?; // mtime, low
        if version >= 0x0940 {
            self.u32(&mut h)?; // mtime, high
        }
        let name_len = self.bytes(1, &mut h)?[0];
        self.bytes(usize::from(name_len), &mut h)?;
        let expected = if flags & HEADER_CRC32 != 0 {
            crc32(&h)
        } else {
            adler32(&h)
        };
        if self.u32(&mut ignored)? != expected {
            return Err(corrupt("header checksum mismatch"));
        }
        if flags & EXTRA_FIELD != 0 {
            let len = self.u32(&mut ignored)?;
            if len > MAX_BLOCK {
                return Err(corrupt("extra field too large"));
            }
            self.bytes(len as usize, &mut ignored)?;
            self.u32(&mut ignored)?;
        }
        self.flags = flags;
        self.in_member = true;
        Ok(true)
    }

    /// Decodes the next block into `out`; `false` at the end of the input.
    fn block(&mut self) -> std::io::Result<bool> {
        if !self.in_member && !self.header()? {
            return Ok(false);
        }
        let mut ignored = Vec::new();
        let dst_len = self.u32(&mut ignored)?;
        if dst_len == 0 {
            self.in_member = false;
            return Ok(true);
        }
        let src_len = self.u32(&mut ignored)?;
        if dst_len > MAX_BLOCK || src_len > dst_len {
            return Err(corrupt("block size out of range"));
        }
        let flags = self.flags;
        let sum_d = if flags & (ADLER32_D | CRC32_D) != 0 {
            Some(self.u32(&mut ignored)?)
        } else {
            None
        };
        let sum_c = if src_len < dst_len && flags & (ADLER32_C | CRC32_C) != 0 {
            Some(self.u32(&mut ignored)?)
        } else {
            None
        };
        let mut data = vec![0u8; src_len as usize];
        self.inner
            .read_exact(&mut data)
            .map_err(|_| corrupt("truncated"))?;
        let check = |sum: Option<u32>, crc: bool, bytes: &[u8], what: &str| {
            let Some(sum) = sum else { return Ok(()) };
            let got = if crc { crc32(bytes) } else { adler32(bytes) };
            if got == sum {
                Ok(())
            } else {
                Err(corrupt(format!("{what} checksum mismatch")))
            }
        };
        check(sum_c, flags & CRC32_C != 0, &data, "compressed block")?;
        let out = if src_len == dst_len {
            data
        } else {
            let out = super::lzo::decompress(&data, dst_len as usize).map_err(corrupt)?;
            if out.len() != dst_len as usize {
                return Err(corrupt("a block decompressed to the wrong size"));
            }
            out
        };
        check(sum_d, flags & CRC32_D != 0, &out, "block")?;
        self.out = out;
        self.at = 0;
        Ok(true)
    }
}

impl<R: BufRead> Read for LzopDecoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.out.len() {
            self.out.clear();
            self.at = 0;
            if !self.block()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.at);
        buf[..n].copy_from_slice(&self.out[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adler32_of_known_text() {
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }
}
