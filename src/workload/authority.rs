//! Interop shim for gRPC C-core clients (py-spiffe, grpc-java, …) on Unix sockets.
//!
//! Since grpc 1.57, C-core sends the percent-encoded socket path as `:authority`
//! (grpc/grpc#38142). The h2 server under tonic refuses that as a malformed authority
//! and resets every stream, so a stock py-spiffe client cannot use a tonic Workload
//! API. SPIRE's Go server accepts it. This shim sits between the Unix socket and h2:
//! it decodes each client header block (HPACK, with the client's dynamic table),
//! replaces an `:authority` that is not a valid authority with `localhost`, and
//! re-encodes the block as literals without indexing, so h2's decoder state stays
//! trivially in sync. Every other frame passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The default SETTINGS_MAX_FRAME_SIZE; h2 never advertises less.
const MAX_FRAME: usize = 16_384;
/// Bound on one buffered header block (h2's own default header list limit is 16 KiB).
const MAX_BLOCK: usize = 64 * 1024;

struct Pending {
    stream: [u8; 4],
    end_stream: bool,
    block: Vec<u8>,
}

/// A stream whose client→server HTTP/2 header blocks get a valid `:authority`.
pub struct AuthorityFix<S> {
    inner: S,
    raw: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    preface_seen: bool,
    passthrough: bool,
    pending: Option<Pending>,
    decoder: hpack::Decoder<'static>,
    eof: bool,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

fn encode_int(out: &mut Vec<u8>, mut v: usize, prefix_bits: u8, first: u8) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// Encodes headers as "literal header field without indexing — new name", no Huffman.
fn encode_block(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        encode_int(&mut out, name.len(), 7, 0);
        out.extend_from_slice(name);
        encode_int(&mut out, value.len(), 7, 0);
        out.extend_from_slice(value);
    }
    out
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: [u8; 4]) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream);
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted server-side stream.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            raw: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            preface_seen: false,
            passthrough: false,
            pending: None,
            decoder: hpack::Decoder::new(),
            eof: false,
        }
    }

    fn emit(&mut self, p: Pending) -> io::Result<()> {
        let mut headers = self
            .decoder
            .decode(&p.block)
            .map_err(|e| bad(&format!("HPACK decoding failed: {e:?}")))?;
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                *value = b"localhost".to_vec();
            }
        }
        let block = encode_block(&headers);
        let mut chunks = block.chunks(MAX_FRAME).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let mut flags = if last { END_HEADERS } else { 0 };
            let kind = if first { HEADERS } else { CONTINUATION };
            if first && p.end_stream {
                flags |= END_STREAM;
            }
            frame_header(&mut self.out, chunk.len(), kind, flags, p.stream);
            self.out.extend_from_slice(chunk);
            first = false;
        }
        if block.is_empty() {
            let flags = END_HEADERS | if p.end_stream { END_STREAM } else { 0 };
            frame_header(&mut self.out, 0, HEADERS, flags, p.stream);
        }
        Ok(())
    }

    /// Moves every complete frame from `raw` to `out`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        if self.passthrough {
            self.out.append(&mut self.raw);
            return Ok(());
        }
        if !self.preface_seen {
            if self.raw.len() < PREFACE.len() {
                return Ok(());
            }
            if &self.raw[..PREFACE.len()] != PREFACE {
                // Not HTTP/2 prior knowledge: let h2 deal with it.
                self.passthrough = true;
                self.out.append(&mut self.raw);
                return Ok(());
            }
            self.out.extend(self.raw.drain(..PREFACE.len()));
            self.preface_seen = true;
        }
        while self.raw.len() >= 9 {
            let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
            if self.raw.len() < 9 + len {
                break;
            }
            let frame: Vec<u8> = self.raw.drain(..9 + len).collect();
            let (kind, flags) = (frame[3], frame[4]);
            let stream = [frame[5], frame[6], frame[7], frame[8]];
            let payload = &frame[9..];
            match kind {
                HEADERS => {
                    let mut p = payload;
                    let mut pad = 0usize;
                    if flags & PADDED != 0 {
                        pad = *p.first().ok_or_else(|| bad("short HEADERS"))? as usize;
                        p = &p[1..];
                    }
                    if flags & PRIORITY != 0 {
                        p = p.get(5..).ok_or_else(|| bad("short HEADERS"))?;
                    }
                    let fragment =
                        p.get(..p.len().checked_sub(pad).ok_or_else(|| bad("bad padding"))?);
                    let pending = Pending {
                        stream,
                        end_stream: flags & END_STREAM != 0,
                        block: fragment.ok_or_else(|| bad("bad padding"))?.to_vec(),
                    };
                    if flags & END_HEADERS != 0 {
                        self.emit(pending)?;
                    } else {
                        self.pending = Some(pending);
                    }
                }
                CONTINUATION => match self.pending.take() {
                    Some(mut p) if p.stream == stream => {
                        p.block.extend_from_slice(payload);
                        if p.block.len() > MAX_BLOCK {
                            return Err(bad("header block too large"));
                        }
                        if flags & END_HEADERS != 0 {
                            self.emit(p)?;
                        } else {
                            self.pending = Some(p);
                        }
                    }
                    _ => return Err(bad("CONTINUATION without HEADERS")),
                },
                _ => self.out.extend_from_slice(&frame),
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                        // A truncated frame at EOF goes through as is; h2 reports it.
                        this.out.append(&mut this.raw);
                    } else {
                        this.raw.extend_from_slice(rb.filled());
                        this.process()?;
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    delegate_async_write!(inner);
}

impl<S> tonic::transport::server::Connected for AuthorityFix<S> {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn headers_frame(block: &[u8], flags: u8) -> Vec<u8> {
        let mut f = Vec::new();
        frame_header(&mut f, block.len(), HEADERS, flags, [0, 0, 0, 1]);
        f.extend_from_slice(block);
        f
    }

    async fn rewrite(input: Vec<u8>) -> Vec<u8> {
        let mut fix = AuthorityFix::new(std::io::Cursor::new(input));
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn replaces_an_invalid_authority_and_keeps_everything_else() {
        let mut enc = hpack::Encoder::new();
        let hdrs: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":authority", b"%2Ftmp%2Fagent.sock"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b"workload.spiffe.io", b"true"),
        ];
        let block = enc.encode(hdrs.clone());
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(&block, END_HEADERS | END_STREAM));
        // A second request reuses the client's dynamic table entries.
        input.extend(headers_frame(&enc.encode(hdrs), END_HEADERS));
        input.extend([0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame passes through
        let out = rewrite(input).await;
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut rest = &out[PREFACE.len()..];
        let mut dec = hpack::Decoder::new();
        for expect_end_stream in [true, false] {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            assert_eq!(rest[3], HEADERS);
            assert_eq!(rest[4] & END_STREAM != 0, expect_end_stream);
            let decoded = dec.decode(&rest[9..9 + len]).expect("decodes");
            assert!(decoded.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
            assert!(decoded.contains(&(b"workload.spiffe.io".to_vec(), b"true".to_vec())));
            assert_eq!(decoded.len(), 4);
            rest = &rest[9 + len..];
        }
        assert_eq!(rest, &[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    }

    #[tokio::test]
    async fn a_valid_authority_is_kept() {
        let block =
            hpack::Encoder::new().encode(vec![(&b":authority"[..], &b"localhost:1234"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(&block, END_HEADERS));
        let out = rewrite(input).await;
        let decoded = hpack::Decoder::new()
            .decode(&out[PREFACE.len() + 9..])
            .expect("decodes");
        assert_eq!(
            decoded,
            vec![(b":authority".to_vec(), b"localhost:1234".to_vec())]
        );
    }
}
