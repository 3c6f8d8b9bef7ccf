//! Transport limits that only a raw client can reach: the HTTP/2 concurrent stream limit
//! per connection and the TLS handshake timeout. A well-behaved client (tonic) never
//! exceeds the advertised stream limit and always finishes its handshake, so these tests
//! speak HTTP/2 frames and TCP directly. The in-flight cap and connections per peer are
//! in `lifecycle.rs`; message and header sizes in `hostile_input.rs`.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use prost::Message as _;
use rustls::pki_types::ServerName;
use spiffe::SpiffeId;
use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::dev::BROKER_ID;
use spiffe_broker::proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Every wait on the broker is bounded, so a regression fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

// HTTP/2 wire constants (RFC 9113 §3.4, §6, §7).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

const ISSUE_PATH: &str = "/spiffe_broker.v1.CredentialBroker/IssueCredential";

/// One HTTP/2 frame as read off the wire.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
    /// The decoded header list, for HEADERS frames.
    headers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Frame {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// The value of one setting in a SETTINGS frame (6-byte entries: 16-bit id, 32-bit value).
    fn setting(&self, id: u16) -> Option<u32> {
        self.payload
            .chunks_exact(6)
            .find(|e| u16::from_be_bytes([e[0], e[1]]) == id)
            .map(|e| u32::from_be_bytes([e[2], e[3], e[4], e[5]]))
    }
}

/// Encodes one frame: 24-bit length, type, flags, 31-bit stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame fits");
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend((stream & 0x7fff_ffff).to_be_bytes());
    out.extend(payload);
    out
}

/// A gRPC length-prefixed message: uncompressed flag, 32-bit length, protobuf.
fn grpc_message(m: &impl prost::Message) -> Vec<u8> {
    let body = m.encode_to_vec();
    let mut out = vec![0];
    out.extend(u32::try_from(body.len()).expect("fits").to_be_bytes());
    out.extend(body);
    out
}

/// A hand-driven HTTP/2 client connection over the broker's TLS.
struct RawH2 {
    tls: TlsStream<TcpStream>,
    encoder: hpack::Encoder<'static>,
    /// One decoder for the whole connection: HPACK state is shared by every header block
    /// the server sends, so each must be decoded, in order.
    decoder: hpack::Decoder<'static>,
}

impl RawH2 {
    /// TLS as `identity` (ALPN h2, as `client::connect` does), then the client preface
    /// and an empty SETTINGS frame.
    async fn connect(h: &Harness, identity: &ClientIdentity) -> Self {
        let broker = SpiffeId::new(BROKER_ID).expect("broker id");
        let cfg = client::tls_config(identity, &broker).expect("client TLS config");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = TcpStream::connect(h.env.grpc_addr).await.expect("connect");
        // The verifier checks the SPIFFE ID, not this name.
        let name = ServerName::try_from("spiffe-broker.invalid").expect("name");
        let tls = tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
            .await
            .expect("handshake in time")
            .expect("TLS handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut c = Self {
            tls,
            encoder: hpack::Encoder::new(),
            decoder: hpack::Decoder::new(),
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        c.send(&hello).await;
        c
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.expect("write");
        self.tls.flush().await.expect("flush");
    }

    /// A HEADERS frame opening an `IssueCredential` call on `stream`. END_STREAM is not
    /// set, so the stream stays open, waiting for its request body.
    fn issue_headers(&mut self, authority: &str, stream: u32) -> Vec<u8> {
        let headers: [(&[u8], &[u8]); 6] = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", ISSUE_PATH.as_bytes()),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ];
        let block = self.encoder.encode(headers);
        frame(HEADERS, END_HEADERS, stream, &block)
    }

    /// The next frame, with HEADERS decoded. Panics on GOAWAY: no limit here should cost
    /// the whole connection.
    async fn next(&mut self) -> Frame {
        let mut head = [0u8; 9];
        tokio::time::timeout(PATIENCE, self.tls.read_exact(&mut head))
            .await
            .expect("the broker sends a frame in time")
            .expect("frame header");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        tokio::time::timeout(PATIENCE, self.tls.read_exact(&mut payload))
            .await
            .expect("the broker sends the frame body in time")
            .expect("frame payload");
        let mut f = Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
            headers: Vec::new(),
        };
        assert_ne!(f.kind, GOAWAY, "GOAWAY: {:?}", f.payload);
        assert_ne!(f.kind, CONTINUATION, "header blocks here fit in one frame");
        if f.kind == HEADERS {
            assert!(
                f.flags & END_HEADERS != 0,
                "header blocks here fit in one frame"
            );
            let mut block = &f.payload[..];
            if f.flags & PADDED != 0 {
                let pad = usize::from(block[0]);
                block = &block[1..block.len() - pad];
            }
            if f.flags & PRIORITY != 0 {
                block = &block[5..];
            }
            f.headers = self.decoder.decode(block).expect("HPACK decodes");
        }
        f
    }
}

/// Records an RST_STREAM's error code under its stream.
fn note_reset(resets: &mut HashMap<u32, u32>, f: &Frame) {
    if f.kind == RST_STREAM {
        let code = u32::from_be_bytes(f.payload[..4].try_into().expect("4-byte error code"));
        assert!(
            resets.insert(f.stream, code).is_none(),
            "stream {} reset twice",
            f.stream
        );
    }
}

#[tokio::test]
async fn a_connection_cannot_open_more_streams_than_allowed() {
    const N: u32 = 4;
    // `max_in_flight` keeps its default (1024), far above N: only the stream limit applies.
    let h = start_with(Some(Box::new(|demo: String| {
        demo.replacen(
            "reaper_interval = \"30s\"",
            &format!("reaper_interval = \"30s\"\nmax_streams_per_connection = {N}"),
            1,
        )
    })))
    .await;
    // An authenticated caller, so an admitted stream can be finished into a real issuance.
    let identity = h.identity(DEPLOY_AGENT).await;
    let leases_before = h.lease_count();
    let mut conn = RawH2::connect(&h, &identity).await;

    // The server's preface is its SETTINGS frame, which advertises the limit.
    let settings = conn.next().await;
    assert_eq!((settings.kind, settings.flags & ACK), (SETTINGS, 0));
    assert_eq!(
        settings.setting(SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(N),
        "SETTINGS_MAX_CONCURRENT_STREAMS"
    );
    conn.send(&frame(SETTINGS, ACK, 0, &[])).await;

    // Open N + 2 calls at once, ignoring the advertised limit (client streams are odd).
    let ids: Vec<u32> = (0..N + 2).map(|i| 2 * i + 1).collect();
    let (admitted, excess) = ids.split_at(N as usize);
    let authority = h.env.grpc_addr.to_string();
    let mut burst = Vec::new();
    for &id in &ids {
        burst.extend(conn.issue_headers(&authority, id));
    }
    conn.send(&burst).await;

    // Every RST_STREAM the server sends: stream -> error code.
    let mut resets: HashMap<u32, u32> = HashMap::new();
    while !excess.iter().all(|id| resets.contains_key(id)) {
        let f = conn.next().await;
        note_reset(&mut resets, &f);
    }
    // A PING round trip: the connection handles frames in order, so by the ACK it has
    // dealt with the whole burst, and a reset of an admitted stream would be here.
    conn.send(&frame(PING, 0, 0, b"barrier!")).await;
    loop {
        let f = conn.next().await;
        note_reset(&mut resets, &f);
        if f.kind == PING && f.flags & ACK != 0 {
            assert_eq!(f.payload, b"barrier!");
            break;
        }
    }
    for id in excess {
        assert_eq!(resets.get(id), Some(&REFUSED_STREAM), "stream {id} refused");
    }
    for id in admitted {
        assert!(!resets.contains_key(id), "admitted stream {id} was reset");
    }

    // The admitted streams are live calls: finish the first one and it is served.
    let first = admitted[0];
    let body = grpc_message(&gpu_request(600));
    conn.send(&frame(DATA, END_STREAM, first, &body)).await;
    let (mut status, mut grpc_status, mut reply) = (None, None, Vec::new());
    loop {
        let f = conn.next().await;
        note_reset(&mut resets, &f);
        if f.stream != first {
            continue;
        }
        match f.kind {
            HEADERS => {
                status = status.or(f.header(":status"));
                grpc_status = f.header("grpc-status").or(grpc_status);
            }
            DATA => reply.extend(&f.payload),
            RST_STREAM => panic!("stream {first} reset"),
            _ => {}
        }
        if f.flags & END_STREAM != 0 {
            break;
        }
    }
    assert_eq!(status.as_deref(), Some("200"));
    assert_eq!(grpc_status.as_deref(), Some("0"));
    let reply = pb::IssueCredentialResponse::decode(reply.get(5..).expect("a gRPC message"))
        .expect("an IssueCredentialResponse");
    assert!(reply.lease.is_some(), "issued a lease");
    for id in admitted {
        assert!(!resets.contains_key(id), "admitted stream {id} was reset");
    }
    drop(conn);

    // The broker still serves; the one finished call made the only lease from the raw
    // connection (refused and abandoned calls made none).
    let mut c = h.broker_as(DEPLOY_AGENT).await;
    c.issue_credential(gpu_request(600))
        .await
        .expect("serves after the refusals");
    assert_eq!(h.lease_count(), leases_before + 2);
}

/// Reads and discards until the peer closes (EOF or reset); returns when, measured from
/// `since`. Panics if it stays open past `deadline`.
async fn closed_after(mut s: TcpStream, since: Instant, deadline: Duration) -> Duration {
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_sub(since.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => panic!("still open after {deadline:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            // Whatever the server says (an alert, say), it must then close.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_dropped() {
    // `handshake_timeout` (default 10 s), set short here. The test waits it out in real
    // time: that is what it is about. Long enough for a real client to be served during
    // the stall on a loaded machine; the slack covers the close arriving late.
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
    const SLACK: Duration = Duration::from_secs(5);
    // Three connections per peer: two stalled handshakes and one real client. A fourth
    // is refused during the stall and fits afterwards only if the stalled ones gave
    // their slots back when dropped.
    let h = start_with(Some(Box::new(|demo: String| {
        demo.replacen(
            "reaper_interval = \"30s\"",
            "reaper_interval = \"30s\"\nmax_connections_per_peer = 3\nhandshake_timeout = \"3s\"",
            1,
        )
    })))
    .await;
    // Fetched first, so the Workload API is not part of the timed window.
    let identity = h.identity(DEPLOY_AGENT).await;

    let since = Instant::now();
    let silent = TcpStream::connect(h.env.grpc_addr).await.expect("connect");
    let mut partial = TcpStream::connect(h.env.grpc_addr).await.expect("connect");
    // A TLS record header promising a 512-byte handshake record, and only the start of
    // the ClientHello in it (type 1, length 508, legacy version 1.2).
    partial
        .write_all(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ])
        .await
        .expect("write");
    let deadline = HANDSHAKE_TIMEOUT + SLACK;
    let silent = tokio::spawn(closed_after(silent, since, deadline));
    let partial = tokio::spawn(closed_after(partial, since, deadline));

    // While both handshakes are stalled, a real client connects and is served: a slow
    // handshake does not hold up the accept loop.
    let ch = h.channel_as(&identity).await;
    pb::credential_broker_client::CredentialBrokerClient::new(ch.clone())
        .issue_credential(gpu_request(600))
        .await
        .expect("served during the stall");
    // The stalled handshakes hold per-peer slots (taken at accept, so a peer cannot
    // flood handshakes either): with all three in use, a fourth connection is refused.
    let fourth = client::connect(&h.env.grpc_addr.to_string(), BROKER_ID, &identity).await;
    assert!(fourth.is_err(), "a fourth connection during the stall");
    assert!(
        !silent.is_finished() && !partial.is_finished(),
        "the stalled handshakes were still pending while the real client was served"
    );

    for (what, task) in [("silent", silent), ("partial ClientHello", partial)] {
        let took = task.await.expect("reader task");
        assert!(took < deadline, "{what}: closed after {took:?}");
        // Closed by the timeout, not by anything earlier.
        assert!(
            took >= HANDSHAKE_TIMEOUT - Duration::from_millis(50),
            "{what}: closed after only {took:?}"
        );
    }

    // Their per-peer slots were released: with `ch` still open, another connection fits.
    let extra = client::connect(&h.env.grpc_addr.to_string(), BROKER_ID, &identity)
        .await
        .expect("a fourth connection fits once the stalled handshakes are dropped");
    pb::credential_broker_client::CredentialBrokerClient::new(extra)
        .issue_credential(gpu_request(600))
        .await
        .expect("a new connection is served once the stalled ones are gone");
    drop(ch);
}
