//! The webhook URL, parsed once at start: scheme, host, port, path, and how to show it.

use std::net::Ipv6Addr;

use super::NotifyError;

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Endpoint {
    /// `https` or `http`.
    pub(super) scheme: &'static str,
    /// `host[:port]` (the port only when not the scheme's default; IPv6 in brackets): the
    /// `Host` header, and the only part of the URL that is ever logged, since the path or
    /// query may carry a receiver's token.
    pub(super) authority: String,
    /// Request target: path and query, starting with `/`.
    pub(super) path: String,
}

impl Endpoint {
    pub(super) fn parse(url: &str) -> Result<Self, NotifyError> {
        let invalid = NotifyError::InvalidUrl;
        let (scheme, default_port, rest): (_, u16, _) =
            if let Some(rest) = strip_prefix_ignore_case(url, "https://") {
                ("https", 443, rest)
            } else if let Some(rest) = strip_prefix_ignore_case(url, "http://") {
                ("http", 80, rest)
            } else {
                return Err(invalid("must start with https:// or http://"));
            };
        let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(split);
        if target.contains('#') {
            return Err(invalid(
                "fragments are not sent to servers; remove the '#...'",
            ));
        }
        // Anything that is not visible ASCII could smuggle a header in via CR/LF, or
        // split the request line at a space.
        if !target.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "the path must be visible ASCII (percent-encode anything else)",
            ));
        }
        let path = match target.chars().next() {
            None => "/".to_owned(),
            Some('?') => format!("/{target}"),
            Some(_) => target.to_owned(),
        };
        if authority.is_empty() {
            return Err(invalid("missing host"));
        }
        if authority.contains('@') {
            return Err(invalid("user-info (user:password@) is not supported"));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (v6, after) = bracketed
                .split_once(']')
                .ok_or(invalid("unterminated IPv6 literal"))?;
            if v6.parse::<Ipv6Addr>().is_err() {
                return Err(invalid("bad IPv6 literal"));
            }
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or(invalid("junk after IPv6 literal"))?,
                ),
            };
            (v6, port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        let is_v6 = authority.starts_with('[');
        if !is_v6
            && !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err(invalid("the host must be a DNS name or an IP address"));
        }
        let port = match port {
            None => default_port,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                match p.parse::<u16>() {
                    Ok(0) | Err(_) => return Err(invalid("the port must be 1-65535")),
                    Ok(n) => n,
                }
            }
            Some(_) => return Err(invalid("the port must be 1-65535")),
        };
        let shown_host = if is_v6 {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let authority = if port == default_port {
            shown_host
        } else {
            format!("{shown_host}:{port}")
        };
        Ok(Self {
            scheme,
            authority,
            path,
        })
    }
}

pub(super) fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}
