//! `.xz` images: every stream of the file, as `xz -d` reads it (streams may be concatenated,
//! with zero padding in multiples of four bytes between them), each decoded by liblzma's
//! multithreaded decoder. That decoder decodes the blocks of a multi-block stream (what
//! `xz -T0` writes) on several threads, and a single-block stream on one, as fast as the
//! single-threaded decoder.

use std::io::{self, BufRead, Read};

use liblzma::bufread::XzDecoder;
use liblzma::stream::{MtStreamBuilder, Stream};

/// The decoded bytes of every stream in `R`.
pub struct XzStreams<R: BufRead> {
    decoder: Option<XzDecoder<R>>,
    memlimit: u64,
}

impl<R: BufRead> XzStreams<R> {
    /// Decodes `input`, refusing any stream that needs more than `memlimit` bytes of memory
    /// on one thread (a hostile header may ask for gigabytes of dictionary); more threads are
    /// used only within that limit.
    pub fn new(input: R, memlimit: u64) -> io::Result<Self> {
        Ok(XzStreams {
            decoder: Some(XzDecoder::new_stream(input, mt_decoder(memlimit)?)),
            memlimit,
        })
    }
}

fn mt_decoder(memlimit: u64) -> io::Result<Stream> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8)) as u32;
    MtStreamBuilder::new()
        .threads(threads)
        .memlimit_threading(memlimit)
        .memlimit_stop(memlimit)
        .decoder()
        .map_err(|e| io::Error::other(format!("cannot start xz decoding: {e}")))
}

/// Consumes the zero bytes after a stream; returns how many there were and whether
/// anything follows them.
fn skip_padding(input: &mut impl BufRead) -> io::Result<(u64, bool)> {
    let mut zeros = 0u64;
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok((zeros, false));
        }
        let n = buf.iter().take_while(|&&b| b == 0).count();
        let more = n < buf.len();
        input.consume(n);
        zeros += n as u64;
        if more {
            return Ok((zeros, true));
        }
    }
}

impl<R: BufRead> Read for XzStreams<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(decoder) = self.decoder.as_mut() else {
                return Ok(0);
            };
            let n = decoder.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // The end of a stream: padding, then the end of the file or another stream.
            let Some(decoder) = self.decoder.take() else {
                return Ok(0);
            };
            let mut input = decoder.into_inner();
            let (zeros, more) = skip_padding(&mut input)?;
            if zeros % 4 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "xz stream padding is not a multiple of four bytes",
                ));
            }
            if !more {
                return Ok(0);
            }
            self.decoder = Some(XzDecoder::new_stream(input, mt_decoder(self.memlimit)?));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn xz(data: &[u8], threads: u32, block: u64) -> Vec<u8> {
        let stream = MtStreamBuilder::new()
            .threads(threads)
            .block_size(block)
            .preset(1)
            .encoder()
            .unwrap();
        let mut out = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
        out.write_all(data).unwrap();
        out.finish().unwrap()
    }

    fn decode(bytes: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        XzStreams::new(bytes, 512 << 20)?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn multi_block_and_concatenated_streams_decode_whole() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let multi = xz(&data, 2, 1 << 20);
        assert_eq!(decode(&multi).unwrap(), data);
        // Two streams with padding between them, as `cat a.xz b.xz` and pixz write.
        let mut two = xz(b"first ", 1, 0);
        two.extend_from_slice(&[0; 8]);
        two.extend(xz(b"second", 1, 0));
        assert_eq!(decode(&two).unwrap(), b"first second");
    }

    #[test]
    fn bad_padding_truncation_and_trailing_garbage_are_errors() {
        let mut padded = xz(b"data", 1, 0);
        padded.extend_from_slice(&[0; 3]);
        assert!(decode(&padded).is_err());
        let whole = xz(b"data", 1, 0);
        assert!(decode(&whole[..whole.len() - 5]).is_err());
        let mut garbage = whole.clone();
        garbage.extend_from_slice(b"junk");
        assert!(decode(&garbage).is_err());
    }
}
