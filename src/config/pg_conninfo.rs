//! The connection-string parameters the broker handles itself, split out before the rest
//! goes to the `postgres` crate.
//!
//! The crate knows `sslmode` only as `disable`, `prefer` or `require`, and refuses
//! `sslrootcert` as an unknown option; libpq's `verify-ca` and `verify-full` are what an
//! operator writes to authenticate the server. So the broker reads `sslmode` and
//! `sslrootcert` itself, from either form of connection string (URL query or key=value
//! pairs), and hands the crate the string without them. Both tokenizers follow the crate's
//! own (the same quoting, escapes and percent-decoding), so what is left parses exactly as
//! it would have. Errors name parameters, never values: the string may hold a password.

/// Parameters read here and removed from the string the `postgres` crate parses.
const HANDLED: &[&str] = &["sslmode", "sslrootcert"];

/// A connection string with the broker's parameters taken out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Split {
    /// The string without [`HANDLED`] parameters, for `postgres::Config::from_str`.
    pub rest: String,
    /// `sslmode`, as written (the last one wins, as in libpq).
    pub sslmode: Option<String>,
    /// `sslrootcert`: a PEM file, or `system`.
    pub sslrootcert: Option<String>,
}

/// Splits `url` (URL or key=value form).
pub(crate) fn split(url: &str) -> Result<Split, String> {
    let mut split = Split {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
    };
    let mut take = |key: &str, value: String| match key {
        "sslmode" => split.sslmode = Some(value),
        _ => split.sslrootcert = Some(value),
    };
    let rest = if ["postgres://", "postgresql://"]
        .iter()
        .any(|p| url.starts_with(p))
    {
        split_url(url, &mut take)?
    } else {
        split_pairs(url, &mut take)?
    };
    split.rest = rest;
    Ok(split)
}

/// URL form: the query starts at the first `?` after the credentials (the crate reads
/// the credentials up to the first `@`); parameters are `&`-separated, percent-encoded.
fn split_url(url: &str, take: &mut impl FnMut(&str, String)) -> Result<String, String> {
    let after_creds = url.find('@').map_or(0, |at| at + 1);
    let Some(q) = url[after_creds..].find('?').map(|q| after_creds + q) else {
        return Ok(url.to_owned());
    };
    let mut kept = Vec::new();
    for param in url[q + 1..].split('&') {
        let Some((raw_key, raw_value)) = param.split_once('=') else {
            // The crate reports it ("unterminated parameter").
            kept.push(param);
            continue;
        };
        let key = percent_decode(raw_key).map_err(|e| format!("parameter name: {e}"))?;
        if HANDLED.contains(&key.as_str()) {
            let value = percent_decode(raw_value).map_err(|e| format!("{key}: {e}"))?;
            take(&key, value);
        } else {
            kept.push(param);
        }
    }
    let mut rest = url[..q].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok(rest)
}

/// Key=value form: `key = value` pairs separated by whitespace; a value is quoted with
/// `'…'` or bare, and `\` escapes the next character in either.
fn split_pairs(s: &str, take: &mut impl FnMut(&str, String)) -> Result<String, String> {
    let mut kept: Vec<&str> = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        while chars
            .next_if(|(_, c)| !c.is_whitespace() && *c != '=')
            .is_some()
        {}
        let key_end = chars.peek().map_or(s.len(), |(i, _)| *i);
        let key = &s[start..key_end];
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            // Not a pair: the crate reports it; keep the text as it was.
            kept.push(&s[start..]);
            break;
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let mut closed = !quoted;
        while let Some(&(_, c)) = chars.peek() {
            if quoted && c == '\'' {
                chars.next();
                closed = true;
                break;
            }
            if !quoted && c.is_whitespace() {
                break;
            }
            chars.next();
            if c == '\\' {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            } else {
                value.push(c);
            }
        }
        if !closed {
            return Err(format!("{key}: unterminated quoted value"));
        }
        let end = chars.peek().map_or(s.len(), |(i, _)| *i);
        if HANDLED.contains(&key) {
            take(key, value);
        } else {
            kept.push(&s[start..end]);
        }
    }
    Ok(kept.join(" "))
}

/// `%XX` escapes decoded, the result UTF-8 (as the crate's URL parser does).
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(u8::try_from(v).unwrap_or(0));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 after percent-decoding".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(s: &str) -> (String, Option<String>, Option<String>) {
        let s = split(s).expect("splits");
        (s.rest, s.sslmode, s.sslrootcert)
    }

    #[test]
    fn url_parameters_are_split_out() {
        assert_eq!(
            parts("postgres://u:p%40w@db:5432/ledger?sslmode=verify-full&sslrootcert=%2Fca%20dir%2Fca.pem&connect_timeout=3"),
            (
                "postgres://u:p%40w@db:5432/ledger?connect_timeout=3".to_owned(),
                Some("verify-full".to_owned()),
                Some("/ca dir/ca.pem".to_owned())
            )
        );
        assert_eq!(
            parts("postgresql://db/ledger?sslmode=require"),
            (
                "postgresql://db/ledger".to_owned(),
                Some("require".to_owned()),
                None
            )
        );
        // A `?` in the password is part of the credentials, as the crate reads them.
        assert_eq!(
            parts("postgres://u:a?b@db/ledger").0,
            "postgres://u:a?b@db/ledger"
        );
        assert_eq!(
            parts("postgres://db/ledger"),
            ("postgres://db/ledger".to_owned(), None, None)
        );
    }

    #[test]
    fn key_value_parameters_are_split_out() {
        assert_eq!(
            parts("host=db  sslmode = verify-ca password='a b\\'c' sslrootcert='/etc/pg ca/root.crt' dbname=x"),
            (
                "host=db password='a b\\'c' dbname=x".to_owned(),
                Some("verify-ca".to_owned()),
                Some("/etc/pg ca/root.crt".to_owned())
            )
        );
        assert_eq!(
            parts("host=db sslrootcert=/a\\ b sslmode=disable"),
            (
                "host=db".to_owned(),
                Some("disable".to_owned()),
                Some("/a b".to_owned())
            )
        );
        let e = split("host=db password=s3cret sslrootcert='/x").expect_err("unterminated");
        assert!(e.contains("sslrootcert") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn what_is_left_parses_as_before() {
        for s in [
            "host=db port=5433 user=broker password='se cr\\'et' dbname=ledger",
            "postgres://broker:s3cret@db:5433/ledger?connect_timeout=2&application_name=x",
        ] {
            let before: ::postgres::Config = s.parse().expect("parses");
            let after: ::postgres::Config = split(s).expect("splits").rest.parse().expect("parses");
            assert_eq!(format!("{before:?}"), format!("{after:?}"));
        }
    }
}
