//! Decompression of `compress` (`.Z`) streams: LZW with 9- to 16-bit codes, as ncompress
//! writes them.
//!
//! The format has no checksum. Codes are packed little-endian; `compress` writes them in
//! groups of eight, so after a CLEAR code the rest of the current group is padding and is
//! skipped (a width change falls on a group boundary by itself). Every code is checked
//! against the dictionary built so far, and the dictionary is a fixed 64 Ki entries.

use std::io::{BufRead, Read};

const MAGIC: [u8; 2] = [0x1f, 0x9d];
const CLEAR: u16 = 256;

pub fn is_compress(head: &[u8]) -> bool {
    head.starts_with(&MAGIC)
}

fn corrupt(why: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("corrupt compress (.Z) stream: {why}"),
    )
}

pub struct LzwDecoder<R> {
    inner: R,
    started: bool,
    max_bits: u32,
    block_mode: bool,
    bits: u32,
    /// Bits read but not yet used, low bits first.
    buffer: u32,
    buffered: u32,
    /// Bytes read at the current code width since the last reset or width change.
    bytes_in_section: u32,
    next_code: u32,
    previous: Option<u16>,
    last_byte: u8,
    prefix: Vec<u16>,
    suffix: Vec<u8>,
    /// Decoded bytes of the current code, in reverse order.
    stack: Vec<u8>,
    done: bool,
}

impl<R: BufRead> LzwDecoder<R> {
    pub fn new(inner: R) -> Self {
        LzwDecoder {
            inner,
            started: false,
            max_bits: 16,
            block_mode: true,
            bits: 9,
            buffer: 0,
            buffered: 0,
            bytes_in_section: 0,
            next_code: 257,
            previous: None,
            last_byte: 0,
            prefix: vec![0; 1 << 16],
            suffix: vec![0; 1 << 16],
            stack: Vec::with_capacity(1 << 16),
            done: false,
        }
    }

    fn byte(&mut self) -> std::io::Result<Option<u8>> {
        let buf = self.inner.fill_buf()?;
        let Some(&b) = buf.first() else {
            return Ok(None);
        };
        self.inner.consume(1);
        Ok(Some(b))
    }

    fn header(&mut self) -> std::io::Result<()> {
        let mut head = [0u8; 3];
        self.inner
            .read_exact(&mut head)
            .map_err(|_| corrupt("no header"))?;
        if head[..2] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        self.max_bits = u32::from(head[2] & 0x1f);
        if !(9..=16).contains(&self.max_bits) {
            return Err(corrupt("code width out of range"));
        }
        self.block_mode = head[2] & 0x80 != 0;
        self.next_code = if self.block_mode { 257 } else { 256 };
        self.started = true;
        Ok(())
    }

    /// The next code, or `None` at the end of the stream.
    fn code(&mut self) -> std::io::Result<Option<u16>> {
        while self.buffered < self.bits {
            let Some(b) = self.byte()? else {
                return Ok(None);
            };
            self.buffer |= u32::from(b) << self.buffered;
            self.buffered += 8;
            self.bytes_in_section += 1;
        }
        let code = (self.buffer & ((1 << self.bits) - 1)) as u16;
        self.buffer >>= self.bits;
        self.buffered -= self.bits;
        Ok(Some(code))
    }

    /// Decodes one code onto the stack; `false` at the end of the stream.
    fn step(&mut self) -> std::io::Result<bool> {
        let Some(code) = self.code()? else {
            return Ok(false);
        };
        if code == CLEAR && self.block_mode {
            // The rest of the current group of `bits` bytes is padding.
            let skip = (self.bits - self.bytes_in_section % self.bits) % self.bits;
            self.buffer = 0;
            self.buffered = 0;
            for _ in 0..skip {
                if self.byte()?.is_none() {
                    return Ok(false);
                }
            }
            self.bytes_in_section = 0;
            self.bits = 9;
            self.next_code = 257;
            self.previous = None;
            return Ok(true);
        }
        let code32 = u32::from(code);
        if code32 > self.next_code || (code32 == self.next_code && self.previous.is_none()) {
            return Err(corrupt("a code beyond the dictionary"));
        }
        let mut walk = code;
        if code32 == self.next_code {
            // The KwKwK case: the previous string plus its own first byte.
            self.stack.push(self.last_byte);
            walk = self.previous.unwrap_or(0);
        }
        while walk >= 256 {
            if self.stack.len() >= 1 << 16 {
                return Err(corrupt("a dictionary loop"));
            }
            self.stack.push(self.suffix[usize::from(walk)]);
            walk = self.prefix[usize::from(walk)];
        }
        let first = walk as u8;
        self.stack.push(first);
        self.last_byte = first;
        if let Some(previous) = self.previous {
            if self.next_code < 1 << self.max_bits {
                self.prefix[self.next_code as usize] = previous;
                self.suffix[self.next_code as usize] = first;
                self.next_code += 1;
            }
        }
        if self.next_code >= 1 << self.bits && self.bits < self.max_bits {
            self.bits += 1;
            self.bytes_in_section = 0;
        }
        self.previous = Some(code);
        Ok(true)
    }
}

impl<R: BufRead> Read for LzwDecoder<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if !self.started {
            self.header()?;
        }
        let mut n = 0;
        while n < out.len() {
            if let Some(b) = self.stack.pop() {
                out[n] = b;
                n += 1;
                continue;
            }
            if self.done {
                break;
            }
            if !self.step()? {
                self.done = true;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_codes_beyond_the_dictionary() {
        // Header, then a 9-bit code 300 as the first code.
        let data = [0x1f, 0x9d, 0x90, 0x2c, 0x01];
        let mut out = Vec::new();
        assert!(LzwDecoder::new(&data[..]).read_to_end(&mut out).is_err());
    }

    #[test]
    fn decodes_literals() {
        // "ab": codes 97 and 98 at 9 bits, little-endian packed.
        let codes = [97u32, 98];
        let mut bits = 0u64;
        for (i, c) in codes.iter().enumerate() {
            bits |= u64::from(*c) << (9 * i);
        }
        let mut data = vec![0x1f, 0x9d, 0x90];
        data.extend_from_slice(&bits.to_le_bytes()[..3]);
        let mut out = Vec::new();
        LzwDecoder::new(&data[..]).read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ab");
    }
}
