//! Reading ahead on a thread of its own: the decoder thread reads and decompresses the image
//! into blocks while the caller parses, so decompression overlaps with everything else. At
//! most `BLOCKS_IN_FLIGHT` blocks are buffered.

use std::io::{BufRead, Read};

use crossbeam_channel::{bounded, Receiver, Sender};

/// Decoded bytes handed from the decoder thread to the reader at a time.
pub const BLOCK: usize = 1 << 20;
const BLOCKS_IN_FLIGHT: usize = 4;

/// A `BufRead` over a stream that another thread reads (and decompresses) ahead.
pub struct ReadAhead {
    blocks: Receiver<std::io::Result<Vec<u8>>>,
    recycle: Sender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl ReadAhead {
    pub fn spawn(mut inner: Box<dyn Read + Send>) -> std::io::Result<ReadAhead> {
        let (tx, blocks) = bounded::<std::io::Result<Vec<u8>>>(BLOCKS_IN_FLIGHT);
        let (recycle, reuse) = bounded::<Vec<u8>>(BLOCKS_IN_FLIGHT + 2);
        let spawned = std::thread::Builder::new()
            .name("reimage-decode".into())
            .spawn(move || {
                // The decoder reads hostile bytes from the open image and opens nothing.
                let _ = crate::confine::this_thread(crate::confine::Reach::Nothing);
                decode(&mut *inner, &tx, &reuse)
            });
        spawned?;
        Ok(ReadAhead {
            blocks,
            recycle,
            current: Vec::new(),
            pos: 0,
            ended: false,
        })
    }
}

/// The decoder thread's loop: blocks of `inner` sent on `tx` until its end, an error, or a
/// parser that stopped listening.
fn decode(
    inner: &mut (dyn Read + Send),
    tx: &Sender<std::io::Result<Vec<u8>>>,
    reuse: &Receiver<Vec<u8>>,
) {
    loop {
        let mut buf = reuse
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BLOCK));
        buf.resize(BLOCK, 0);
        let mut filled = 0;
        let result = loop {
            match inner.read(&mut buf[filled..]) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    filled += n;
                    if filled == buf.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        buf.truncate(filled);
        let last = filled == 0 || result.is_err();
        let message = match result {
            Ok(()) => Ok(buf),
            Err(e) => Err(e),
        };
        // The parser hung up (it stopped early): nothing more to do.
        if tx.send(message).is_err() || last {
            return;
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ReadAhead {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.pos == self.current.len() && !self.ended {
            match self.blocks.recv() {
                Ok(Ok(block)) if block.is_empty() => self.ended = true,
                Ok(Ok(block)) => {
                    let old = std::mem::replace(&mut self.current, block);
                    let _ = self.recycle.try_send(old);
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.ended = true;
                    return Err(e);
                }
                Err(_) => self.ended = true,
            }
        }
        Ok(&self.current[self.pos..])
    }

    fn consume(&mut self, amount: usize) {
        self.pos = (self.pos + amount).min(self.current.len());
    }
}
