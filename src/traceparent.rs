//! W3C Trace Context (`traceparent: 00-<trace-id>-<parent-id>-<flags>`): the trace a
//! request belongs to. The API edge takes it from the caller, or starts a trace, and keeps
//! it for the request's task; the ledger entry records its trace id, the JSON logs and
//! the exported spans carry it, so an auditor goes from an entry to its trace.

use ring::rand::{SecureRandom as _, SystemRandom};

/// A request's trace: its id, and the caller's span this request continues (if any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// The caller's span (8 bytes), when the caller sent a `traceparent`.
    pub parent_span_id: Option<[u8; 8]>,
    /// The caller's sampled flag (a fresh trace is sampled).
    pub sampled: bool,
}

tokio::task_local! {
    /// The trace of the request the current task serves.
    static CURRENT: TraceContext;
}

impl TraceContext {
    /// Parses a `traceparent` header value (version 00; unknown higher versions are read
    /// by their first four fields, as the spec asks). `None` if malformed or all-zero ids.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let mut parts = header.split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex_of = |s: &str, n: usize| {
            (s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then(|| hex::decode(s).ok())
            .flatten()
        };
        let version = hex_of(version, 2)?;
        if version == [0xff] || (version == [0] && parts.next().is_some()) {
            return None;
        }
        let trace_id: [u8; 16] = hex_of(trace, 32)?.try_into().ok()?;
        let parent: [u8; 8] = hex_of(parent, 16)?.try_into().ok()?;
        let flags = hex_of(flags, 2)?;
        if trace_id == [0; 16] || parent == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_span_id: Some(parent),
            sampled: flags[0] & 1 == 1,
        })
    }

    /// A new trace (no caller span), sampled.
    pub fn fresh() -> Self {
        let mut trace_id = [0u8; 16];
        while trace_id == [0; 16] {
            let _ = SystemRandom::new().fill(&mut trace_id);
        }
        Self {
            trace_id,
            parent_span_id: None,
            sampled: true,
        }
    }

    /// The caller's trace from `traceparent`, else a fresh one.
    pub fn from_header(header: Option<&str>) -> Self {
        header.and_then(Self::parse).unwrap_or_else(Self::fresh)
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// Runs `f` with this trace as the task's current one.
    pub async fn scope<F: std::future::Future>(self, f: F) -> F::Output {
        CURRENT.scope(self, f).await
    }

    /// The current task's trace, if it serves a request.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(|c| *c).ok()
    }
}

/// A random span id (8 bytes, never zero).
pub fn span_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    while id == [0; 8] {
        let _ = SystemRandom::new().fill(&mut id);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_read_by_the_book() {
        let t = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("the spec's example");
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_span_id, Some(*b"\x00\xf0\x67\xaa\x0b\xa9\x02\xb7"));
        assert!(t.sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version may add fields after the four it shares with 00.
        assert!(TraceContext::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what"
        )
        .is_some());
        let fresh = TraceContext::from_header(Some("garbage"));
        assert_ne!(fresh.trace_id, [0; 16]);
        assert_eq!(fresh.parent_span_id, None);
    }
}
