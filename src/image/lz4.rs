//! lz4 streams: the frame format (`lz4`'s default, read by `lz4_flex`, skippable frames passed
//! over) and the legacy format (`lz4 -l`, what the kernel's initramfs tooling writes), told
//! apart by their first magic number.
//!
//! A legacy stream is its magic, then blocks: a little-endian u32 size and that many bytes of
//! one lz4 block, which decodes to at most 8 MiB (the last to less). It ends at the end of
//! the file, or where a size larger than any block can be is read: that is the magic of what
//! follows, which `lz4` reads as a new stream; another legacy stream is read on, anything
//! else is refused.

use std::io::{BufRead, Read};

/// The frame format's magic number, as it is in the file.
pub const FRAME_MAGIC: [u8; 4] = [0x04, 0x22, 0x4d, 0x18];
/// The legacy format's magic number, as it is in the file.
pub const LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LEGACY_MAGIC_VALUE: u32 = u32::from_le_bytes(LEGACY_MAGIC);
/// What one legacy block decodes to at most.
const LEGACY_BLOCK: usize = 8 << 20;
/// The largest a legacy block can be compressed: lz4's compress bound of 8 MiB.
const LEGACY_BOUND: usize = LEGACY_BLOCK + LEGACY_BLOCK / 255 + 16;

/// The decoder for an lz4 stream of either format, by its first bytes.
pub fn decoder<R: BufRead + Send + 'static>(mut raw: R) -> std::io::Result<Box<dyn Read + Send>> {
    let legacy = raw.fill_buf()?.starts_with(&LEGACY_MAGIC);
    Ok(if legacy {
        Box::new(Legacy::new(raw))
    } else {
        Box::new(Frames(lz4_flex::frame::FrameDecoder::new(raw)))
    })
}

fn invalid(why: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why.into())
}

/// A legacy stream, decoded one block at a time into a buffer of at most 8 MiB.
struct Legacy<R: Read> {
    inner: R,
    compressed: Vec<u8>,
    decoded: Vec<u8>,
    pos: usize,
    /// Whether a magic number is expected next (at the start, and after a stream's end).
    at_magic: bool,
    ended: bool,
}

impl<R: Read> Legacy<R> {
    fn new(inner: R) -> Self {
        Legacy {
            inner,
            compressed: Vec::new(),
            decoded: Vec::new(),
            pos: 0,
            at_magic: true,
            ended: false,
        }
    }

    /// A little-endian u32, or `None` at a clean end of the file.
    fn word(&mut self) -> std::io::Result<Option<u32>> {
        let mut bytes = [0u8; 4];
        let mut filled = 0;
        while filled < 4 {
            match self.inner.read(&mut bytes[filled..])? {
                0 if filled == 0 => return Ok(None),
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => filled += n,
            }
        }
        Ok(Some(u32::from_le_bytes(bytes)))
    }

    /// Decodes the next block into `decoded`; `false` at the end of the stream.
    fn next_block(&mut self) -> std::io::Result<bool> {
        loop {
            let Some(word) = self.word()? else {
                return Ok(false);
            };
            if self.at_magic || word as usize > LEGACY_BOUND {
                if word != LEGACY_MAGIC_VALUE {
                    return Err(invalid(format!(
                        "an lz4 legacy stream is followed by something else (magic {word:#010x})"
                    )));
                }
                self.at_magic = false;
                continue;
            }
            let size = word as usize;
            self.compressed.resize(size, 0);
            self.inner.read_exact(&mut self.compressed)?;
            self.decoded.resize(LEGACY_BLOCK, 0);
            let n = lz4_flex::block::decompress_into(&self.compressed, &mut self.decoded)
                .map_err(|e| invalid(format!("a corrupt lz4 legacy block: {e}")))?;
            self.decoded.truncate(n);
            self.pos = 0;
            if n > 0 {
                return Ok(true);
            }
        }
    }
}

impl<R: Read> Read for Legacy<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos == self.decoded.len() {
            if self.ended || !self.next_block()? {
                self.ended = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.decoded.len() - self.pos);
        buf[..n].copy_from_slice(&self.decoded[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// lz4 frames with the skippable frames between them passed over (lz4_flex reports one as an
/// error after reading its 8-byte header; its data is skipped here, bounded by its u32 size).
struct Frames<R: BufRead>(lz4_flex::frame::FrameDecoder<R>);

impl<R: BufRead> Read for Frames<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) => {
                    let skip = match e
                        .get_ref()
                        .and_then(|inner| inner.downcast_ref::<lz4_flex::frame::Error>())
                    {
                        Some(lz4_flex::frame::Error::SkippableFrame(len)) => u64::from(*len),
                        _ => return Err(e),
                    };
                    let inner = self.0.get_mut();
                    let skipped = std::io::copy(&mut inner.take(skip), &mut std::io::sink())?;
                    if skipped != skip {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A legacy stream of `blocks`, each compressed as one lz4 block.
    fn legacy(blocks: &[&[u8]]) -> Vec<u8> {
        let mut out = LEGACY_MAGIC.to_vec();
        for block in blocks {
            let packed = lz4_flex::block::compress(block);
            out.extend_from_slice(&(packed.len() as u32).to_le_bytes());
            out.extend_from_slice(&packed);
        }
        out
    }

    fn decode(bytes: Vec<u8>) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        decoder(std::io::Cursor::new(bytes))?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn legacy_blocks_and_concatenated_streams_decode_in_order() {
        let a = vec![7u8; LEGACY_BLOCK];
        let b = b"the end".to_vec();
        let mut stream = legacy(&[&a, &b]);
        stream.extend(legacy(&[b"second stream"]));
        let mut expected = a.clone();
        expected.extend_from_slice(&b);
        expected.extend_from_slice(b"second stream");
        assert_eq!(decode(stream).unwrap(), expected);
    }

    #[test]
    fn a_corrupt_or_foreign_continuation_is_refused() {
        let mut stream = legacy(&[b"data"]);
        stream.extend_from_slice(&FRAME_MAGIC);
        assert!(decode(stream).is_err());
        let mut truncated = legacy(&[&[1u8; 1000]]);
        truncated.truncate(truncated.len() - 3);
        assert!(decode(truncated).is_err());
        let mut lying = LEGACY_MAGIC.to_vec();
        lying.extend_from_slice(&100u32.to_le_bytes());
        lying.extend_from_slice(&[0xff; 100]);
        assert!(decode(lying).is_err());
    }
}
