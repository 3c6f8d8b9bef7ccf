use super::worker::{backoff_delay, build_request, sign};
use super::*;

use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const KEY: &[u8] = b"test-webhook-key-0123456789abcdef";

/// Test retries take milliseconds, not minutes.
fn fast() -> Tuning {
    Tuning {
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(100),
        ..Tuning::default()
    }
}

fn config(addr: SocketAddr) -> WebhookConfig {
    WebhookConfig {
        url: format!("http://{addr}/hooks/approvals"),
        hmac_key: KEY.to_vec(),
        timeout: Duration::from_secs(5),
    }
}

fn sample(id: &str) -> Notification {
    Notification {
        event: "access_request.pending".into(),
        access_request_id: id.into(),
        profile: "db-admin".into(),
        requester: "spiffe://example.org/ns/ops/sa/alice".into(),
        state: "pending".into(),
        approvers_notified: vec!["spiffe://example.org/ns/ops/sa/bob".into()],
        break_glass: false,
        time_ms: 1_767_225_600_000,
        reason: Some("incident 42: \"quoted\" and ünïcode".into()),
    }
}

/// A request as the test server saw it.
#[derive(Debug)]
struct Received {
    request_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Received> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap().to_owned();
    let headers: Vec<(String, String)> = lines
        .map(|l| l.split_once(':').unwrap())
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .unwrap()
        .1
        .parse()
        .unwrap();
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), len, "body longer than Content-Length");
    Ok(Received {
        request_line,
        headers,
        body,
    })
}

/// A tiny HTTP server: answers each request with the next of `statuses` (200 once
/// they run out). Each request is reported on `seen` *before* it is answered, so
/// once the notifier has counted an outcome the test already has the request.
fn serve(listener: TcpListener, statuses: Vec<u16>) -> mpsc::UnboundedReceiver<Received> {
    let (seen, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut statuses = statuses.into_iter();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let Ok(req) = read_request(&mut stream).await else {
                continue;
            };
            let status = statuses.next().unwrap_or(200);
            let _ = seen.send(req);
            let reason = if status == 200 { "OK" } else { "Nope" };
            let answer = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    rx
}

/// Waits (bounded, so a bug fails instead of hanging) until `done` holds; re-checked
/// after every finished delivery attempt rather than on a timer.
async fn wait_until(notifier: &Notifier, done: impl Fn(&Notifier, u64) -> bool) {
    let mut attempts = notifier.counters.attempts.subscribe();
    tokio::time::timeout(
        Duration::from_secs(20),
        attempts.wait_for(|&n| done(notifier, n)),
    )
    .await
    .expect("timed out waiting for the notifier")
    .expect("counters dropped");
}

fn drain(rx: &mut mpsc::UnboundedReceiver<Received>) -> Vec<Received> {
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push(r);
    }
    out
}

/// An address with nothing listening on it.
async fn closed_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Checks a received request's signature exactly as a receiver would, with ring
/// directly rather than this module's `sign`.
fn assert_signed(req: &Received) {
    let ts = req.header("X-Spiffe-Broker-Timestamp").unwrap();
    let ts_num: i64 = ts.parse().unwrap();
    assert!(
        (crate::clock::Clock::unix_seconds(&crate::clock::SystemClock) - ts_num).abs() < 300,
        "stale timestamp {ts}"
    );
    let sig = req
        .header("X-Spiffe-Broker-Signature")
        .unwrap()
        .strip_prefix("sha256=")
        .unwrap();
    assert_eq!(sig.len(), 64);
    assert!(sig
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(&req.body);
    let key = hmac::Key::new(hmac::HMAC_SHA256, KEY);
    hmac::verify(&key, &signed, &hex::decode(sig).unwrap()).expect("signature must verify");
    // And a tampered timestamp must not.
    let mut replayed = format!("{}.", ts_num + 1).into_bytes();
    replayed.extend_from_slice(&req.body);
    assert!(hmac::verify(&key, &replayed, &hex::decode(sig).unwrap()).is_err());
}

// (1)
#[tokio::test]
async fn delivers_signed_json() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut seen = serve(listener, vec![]);
    let notifier = Notifier::spawn(Some(config(addr))).unwrap();

    let n = sample("ar-1");
    notifier.notify(n.clone());
    wait_until(&notifier, |n, _| n.delivered() == 1).await;

    let reqs = drain(&mut seen);
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req.request_line, "POST /hooks/approvals HTTP/1.1");
    assert_eq!(req.header("Host"), Some(addr.to_string().as_str()));
    assert_eq!(req.header("Content-Type"), Some("application/json"));
    assert_eq!(
        req.header("Content-Length"),
        Some(req.body.len().to_string().as_str())
    );
    assert_eq!(
        req.header("X-Spiffe-Broker-Event"),
        Some("access_request.pending")
    );
    let delivery = req.header("X-Spiffe-Broker-Delivery").unwrap();
    assert_eq!(delivery.len(), 16);
    assert!(hex::decode(delivery).is_ok());
    assert_signed(req);

    let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(body, serde_json::to_value(&n).unwrap());
    assert_eq!(body["access_request_id"], "ar-1");
    assert_eq!(
        body["approvers_notified"][0],
        "spiffe://example.org/ns/ops/sa/bob"
    );
    assert_eq!(body["break_glass"], false);
    assert_eq!(body["time_ms"], 1_767_225_600_000_i64);

    assert_eq!((notifier.failed(), notifier.dropped()), (0, 0));
}

// (2)
#[tokio::test]
async fn retries_server_errors_then_delivers_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut seen = serve(listener, vec![500, 500, 200]);
    let notifier = Notifier::spawn_tuned(Some(config(addr)), fast()).unwrap();

    notifier.notify(sample("ar-2"));
    wait_until(&notifier, |n, _| n.delivered() == 1).await;

    let reqs = drain(&mut seen);
    assert_eq!(reqs.len(), 3, "two 500s then a 200");
    assert_eq!(notifier.delivered(), 1);
    assert_eq!(notifier.failed(), 0);
    // Retries are the same delivery (receivers dedupe on it), each signed afresh.
    let id = reqs[0].header("X-Spiffe-Broker-Delivery").unwrap();
    for r in &reqs {
        assert_eq!(r.header("X-Spiffe-Broker-Delivery"), Some(id));
        assert_eq!(r.body, reqs[0].body);
        assert_signed(r);
    }
}

// (3)
#[tokio::test]
async fn delivers_once_a_down_endpoint_comes_up() {
    let addr = closed_addr().await;
    let notifier = Notifier::spawn_tuned(Some(config(addr)), fast()).unwrap();

    notifier.notify(sample("ar-3"));
    // At least one attempt has been refused before anything listens.
    wait_until(&notifier, |_, attempts| attempts >= 1).await;
    assert_eq!(notifier.delivered(), 0);

    let listener = TcpListener::bind(addr).await.unwrap();
    let mut seen = serve(listener, vec![]);
    wait_until(&notifier, |n, _| n.delivered() == 1).await;

    let reqs = drain(&mut seen);
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&reqs[0].body).unwrap()["access_request_id"],
        "ar-3"
    );
    assert_eq!(notifier.failed(), 0);
}

// (4)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_returns_at_once_while_endpoint_hangs() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Accept, never read, never answer; hold the sockets open.
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
            let _ = accepted_tx.send(());
        }
    });
    let cfg = WebhookConfig {
        timeout: Duration::from_millis(200),
        ..config(addr)
    };
    let notifier = Notifier::spawn_tuned(Some(cfg), fast()).unwrap();

    let start = Instant::now();
    notifier.notify(sample("ar-4a"));
    let first = start.elapsed();

    // The delivery task is now connected and stuck waiting for an answer.
    accepted.recv().await.unwrap();
    let start = Instant::now();
    notifier.notify(sample("ar-4b"));
    let second = start.elapsed();

    assert!(first < Duration::from_millis(50), "notify took {first:?}");
    assert!(second < Duration::from_millis(50), "notify took {second:?}");

    // The hung attempt is abandoned at the timeout instead of blocking the queue.
    wait_until(&notifier, |_, attempts| attempts >= 1).await;
    assert_eq!(notifier.delivered(), 0);
    assert_eq!(notifier.dropped(), 0);
}

// (5)
#[tokio::test(flavor = "current_thread")]
async fn full_queue_drops_and_counts() {
    let notifier = Notifier::spawn(Some(config(closed_addr().await))).unwrap();
    // On a current-thread runtime the delivery task cannot run until this test
    // awaits, so nothing drains the queue while it is filled: exactly
    // QUEUE_CAPACITY fit and the rest are dropped.
    for i in 0..QUEUE_CAPACITY + 5 {
        notifier.notify(sample(&format!("ar-5-{i}")));
    }
    assert_eq!(notifier.dropped(), 5);
    assert_eq!((notifier.delivered(), notifier.failed()), (0, 0));
}

// (6)
#[test]
fn noop_notifier_accepts_events_without_a_runtime() {
    let notifier = Notifier::spawn(None).unwrap();
    for i in 0..3 {
        notifier.notify(sample(&format!("ar-6-{i}")));
    }
    assert_eq!(
        (notifier.delivered(), notifier.failed(), notifier.dropped()),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn gives_up_after_max_attempts_and_moves_on() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut seen = serve(listener, vec![503, 503, 503]);
    let tuning = Tuning {
        max_attempts: 3,
        ..fast()
    };
    let notifier = Notifier::spawn_tuned(Some(config(addr)), tuning).unwrap();

    notifier.notify(sample("ar-7a"));
    notifier.notify(sample("ar-7b"));
    wait_until(&notifier, |n, _| n.failed() == 1 && n.delivered() == 1).await;

    let ids: Vec<String> = drain(&mut seen)
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["access_request_id"]
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["\"ar-7a\"", "\"ar-7a\"", "\"ar-7a\"", "\"ar-7b\""]);
}

#[tokio::test]
async fn delivers_in_order() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // A failure on the first event must not let later ones overtake it.
    let mut seen = serve(listener, vec![500]);
    let notifier = Notifier::spawn_tuned(Some(config(addr)), fast()).unwrap();

    for i in 0..5 {
        notifier.notify(sample(&format!("ar-8-{i}")));
    }
    wait_until(&notifier, |n, _| n.delivered() == 5).await;

    let ids: Vec<String> = drain(&mut seen)
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["access_request_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        ids,
        ["ar-8-0", "ar-8-0", "ar-8-1", "ar-8-2", "ar-8-3", "ar-8-4"]
    );
}

#[tokio::test]
async fn interim_1xx_is_skipped_and_non_http_answer_retried() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let answers: [&[u8]; 2] = [
            b"garbage\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        ];
        for answer in answers {
            let (mut stream, _) = listener.accept().await.unwrap();
            read_request(&mut stream).await.unwrap();
            stream.write_all(answer).await.unwrap();
        }
    });
    let notifier = Notifier::spawn_tuned(Some(config(addr)), fast()).unwrap();
    notifier.notify(sample("ar-9"));
    wait_until(&notifier, |n, _| n.delivered() == 1).await;
    assert_eq!(*notifier.counters.attempts.borrow(), 2);
}

#[test]
fn url_parsing() {
    let ok = |url: &str| Endpoint::parse(url).unwrap();
    // (url, scheme, authority, path); https: port 443 by default, and a default port is
    // not repeated.
    for (url, scheme, authority, path) in [
        ("http://example.com", "http", "example.com", "/"),
        (
            "HTTP://hooks.internal:8080/a/b?x=1",
            "http",
            "hooks.internal:8080",
            "/a/b?x=1",
        ),
        ("http://127.0.0.1:9/", "http", "127.0.0.1:9", "/"),
        ("http://[::1]:8443/h", "http", "[::1]:8443", "/h"),
        ("https://example.com", "https", "example.com", "/"),
        ("HTTPS://example.com:443/h", "https", "example.com", "/h"),
        ("https://h:8443/x?t=1", "https", "h:8443", "/x?t=1"),
        ("http://h:443/", "http", "h:443", "/"),
        ("https://h:80/", "https", "h:80", "/"),
    ] {
        let e = ok(url);
        assert_eq!(
            (e.scheme, e.authority.as_str(), e.path.as_str()),
            (scheme, authority, path),
            "{url}"
        );
    }
    let e = ok("http://h?q");
    assert_eq!(e.path, "/?q");

    for bad in [
        "",
        "ftp://example.com/",
        "https://",
        "https://user:pw@h/",
        "https://h:0/",
        "example.com/hook",
        "http://",
        "http:///path",
        "http://:80/",
        "http://host:/",
        "http://host:0/",
        "http://host:65536/",
        "http://host:8x/",
        "http://host:1:2/",
        "http://[::1/",
        "http://[nope]/",
        "http://[::1]x/",
        "http://host/a b",
        "http://host/a\r\nX-Evil: 1",
        "http://host/#frag",
        "http://ho st/",
    ] {
        assert!(
            matches!(Endpoint::parse(bad), Err(NotifyError::InvalidUrl(_))),
            "{bad:?} should be rejected"
        );
    }
    // The error never echoes the URL, which may carry a secret.
    let err = Endpoint::parse("http://user:hunter2@host/")
        .unwrap_err()
        .to_string();
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn spawn_rejects_bad_config() {
    let cfg = |url: &str, key: &[u8], timeout| WebhookConfig {
        url: url.into(),
        hmac_key: key.to_vec(),
        timeout,
    };
    let t = Duration::from_secs(1);
    assert!(matches!(
        Notifier::spawn(Some(cfg("ftp://h/", KEY, t))),
        Err(NotifyError::InvalidUrl(_))
    ));
    assert!(matches!(
        Notifier::spawn(Some(cfg("http://h/", b"", t))),
        Err(NotifyError::EmptyKey)
    ));
    assert!(matches!(
        Notifier::spawn(Some(cfg("http://h/", KEY, Duration::ZERO))),
        Err(NotifyError::ZeroTimeout)
    ));
    // No runtime here: an error, not a panic.
    assert!(matches!(
        Notifier::spawn(Some(cfg("http://h/", KEY, t))),
        Err(NotifyError::NoRuntime)
    ));
}

#[test]
fn debug_never_shows_the_key_or_url() {
    let cfg = WebhookConfig {
        url: "http://h/hook?token=s3cret".into(),
        hmac_key: b"k3y".to_vec(),
        timeout: Duration::from_secs(1),
    };
    let shown = format!("{cfg:?}");
    assert!(
        !shown.contains("s3cret") && !shown.contains("107, 51, 121"),
        "{shown}"
    );
}

#[test]
fn backoff_doubles_with_jitter_and_is_capped() {
    let base = Duration::from_millis(500);
    let cap = Duration::from_secs(60);
    for retry in 1..=20u32 {
        let full = base.saturating_mul(1u32 << (retry - 1).min(31)).min(cap);
        let lo = backoff_delay(retry, base, cap, 0);
        let hi = backoff_delay(retry, base, cap, u64::MAX);
        assert_eq!(lo, full / 2, "retry {retry}");
        assert!(hi >= lo && hi <= full, "retry {retry}: {hi:?} vs {full:?}");
        for entropy in [1, 12_345, 0xdead_beef_cafe] {
            let d = backoff_delay(retry, base, cap, entropy);
            assert!(d >= lo && d <= full);
        }
    }
    assert_eq!(backoff_delay(1, base, cap, 0), Duration::from_millis(250));
    assert_eq!(backoff_delay(40, base, cap, 0), Duration::from_secs(30));
    assert_eq!(backoff_delay(1000, base, cap, u64::MAX).max(cap), cap);
}

#[test]
fn signature_matches_the_documented_recipe() {
    // Fixed vector from outside this code, so a receiver implementation can be
    // checked against it too:
    // printf '%s.%s' 1700000000 '{}' | openssl dgst -sha256 -hmac key
    let key = hmac::Key::new(hmac::HMAC_SHA256, b"key");
    assert_eq!(
        sign(&key, 1_700_000_000, b"{}"),
        "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
    );
}

#[test]
fn event_header_cannot_inject() {
    let ep = Endpoint::parse("https://h/").unwrap();
    let req = build_request(&ep, "x\r\nX-Evil: 1", "00", 1, "sha256=00", b"{}").unwrap();
    assert_eq!(
        req.headers()
            .get("x-spiffe-broker-event")
            .and_then(|v| v.to_str().ok()),
        Some("x__X-Evil: 1")
    );
    assert!(req.headers().get("x-evil").is_none());
    assert_eq!(req.uri().to_string(), "https://h/");
    assert_eq!(req.body(), b"{}");
}

/// Over https, through the platform's trust store: a receiver whose certificate no
/// trusted CA signed gets nothing, and the failure names only scheme, host and port.
#[tokio::test]
async fn https_receivers_are_authenticated() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (handshakes_tx, mut handshakes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let ok = acceptor.accept(tcp).await.is_ok();
            let _ = handshakes_tx.send(ok);
        }
    });
    let cfg = WebhookConfig {
        url: format!("https://{addr}/hooks?token=s3cret"),
        ..config(addr)
    };
    let tuning = Tuning {
        max_attempts: 2,
        ..fast()
    };
    let notifier = Notifier::spawn_tuned(Some(cfg), tuning).unwrap();
    notifier.notify(sample("ar-10"));
    wait_until(&notifier, |n, _| n.failed() == 1).await;
    assert_eq!(notifier.delivered(), 0);
    // The TLS handshakes were attempted and refused by the broker's side.
    assert_eq!(handshakes.recv().await, Some(false));
}
