//! Bundle endpoint URLs as the federation spec constrains them: `https`
//! only, no userinfo, and redirect targets resolved against the URL they
//! came from and held to the same rules.

use std::fmt;

use hyper::Uri;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{0:?} is not a valid URL: {1}")]
    Invalid(String, String),
    #[error("{0:?} must use the https scheme")]
    NotHttps(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?} carries userinfo (user@host); bundle endpoint URLs must not")]
    Userinfo(String),
    #[error("{0:?} has a fragment (#...); bundle endpoint URLs must not")]
    Fragment(String),
    #[error("{url:?} has port {port:?}; a port must be a number from 1 to 65535")]
    BadPort { url: String, port: String },
}

/// A checked bundle endpoint URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    text: String,
    /// Without IPv6 brackets: what DNS, TCP and TLS want.
    host: String,
    port: u16,
    /// For the `Host` header: host (bracketed if IPv6) and any explicit port.
    authority: String,
    /// The request target: path (at least "/") and query.
    target: String,
}

impl EndpointUrl {
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        if text.contains('#') {
            return Err(UrlError::Fragment(text.to_owned()));
        }
        let uri: Uri = text.parse().map_err(|e: hyper::http::uri::InvalidUri| {
            UrlError::Invalid(text.to_owned(), e.to_string())
        })?;
        match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => {}
            _ => return Err(UrlError::NotHttps(text.to_owned())),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| UrlError::NoHost(text.to_owned()))?;
        if authority.as_str().contains('@') {
            return Err(UrlError::Userinfo(text.to_owned()));
        }
        let host = authority.host();
        let bare_host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if bare_host.is_empty() {
            return Err(UrlError::NoHost(text.to_owned()));
        }
        // `port_u16` is None for a port that is not a u16 as well as for no
        // port at all, and 443 is no place to send a request meant for
        // another port the operator mistyped.
        let explicit = authority
            .as_str()
            .strip_prefix(host)
            .and_then(|rest| rest.strip_prefix(':'));
        let port = match explicit {
            None => 443,
            Some(port) => match port.parse::<u16>() {
                Ok(n) if n != 0 && port.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => {
                    return Err(UrlError::BadPort {
                        url: text.to_owned(),
                        port: port.to_owned(),
                    });
                }
            },
        };
        let target = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/");
        let target = if target.starts_with('/') {
            target.to_owned()
        } else {
            format!("/{target}")
        };
        Ok(Self {
            text: text.to_owned(),
            host: bare_host.to_ascii_lowercase(),
            port,
            authority: authority.as_str().to_owned(),
            target,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// Resolves a redirect's `Location` against this URL: an absolute URL,
    /// a scheme-relative `//host/...`, an absolute path, or a path relative
    /// to this one's directory. The result must itself be a valid endpoint
    /// URL (so a redirect to `http://` is refused).
    pub fn resolve(&self, location: &str) -> Result<EndpointUrl, UrlError> {
        let location = location.trim();
        let lower = location.to_ascii_lowercase();
        if lower.starts_with("https://") || lower.starts_with("http://") || lower.contains("://") {
            return EndpointUrl::parse(location);
        }
        if let Some(rest) = location.strip_prefix("//") {
            return EndpointUrl::parse(&format!("https://{rest}"));
        }
        let path = if location.starts_with('/') {
            location.to_owned()
        } else {
            let path_only = self.target.split('?').next().unwrap_or("/");
            let dir = path_only.rsplit_once('/').map_or("", |(dir, _)| dir);
            format!("{dir}/{location}")
        };
        EndpointUrl::parse(&format!("https://{}{path}", self.authority))
    }
}

impl fmt::Display for EndpointUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_https_urls() {
        let u = EndpointUrl::parse("https://Bundle.Example.org:8443/td/bundle?x=1").unwrap();
        assert_eq!(u.host(), "bundle.example.org");
        assert_eq!(u.port(), 8443);
        assert_eq!(u.authority(), "Bundle.Example.org:8443");
        assert_eq!(u.target(), "/td/bundle?x=1");

        let u = EndpointUrl::parse("https://127.0.0.1").unwrap();
        assert_eq!((u.host(), u.port(), u.target()), ("127.0.0.1", 443, "/"));

        let u = EndpointUrl::parse("https://[::1]:9/").unwrap();
        assert_eq!((u.host(), u.port(), u.authority()), ("::1", 9, "[::1]:9"));
    }

    #[test]
    fn rejects_what_the_spec_forbids() {
        assert!(matches!(
            EndpointUrl::parse("http://a.example/"),
            Err(UrlError::NotHttps(_))
        ));
        assert!(matches!(
            EndpointUrl::parse("https://user:pw@a.example/"),
            Err(UrlError::Userinfo(_))
        ));
        assert!(matches!(
            EndpointUrl::parse("https://a.example/#frag"),
            Err(UrlError::Fragment(_))
        ));
        assert!(matches!(
            EndpointUrl::parse("/just/a/path"),
            Err(UrlError::NotHttps(_))
        ));
        assert!(EndpointUrl::parse("https://").is_err());
    }

    #[test]
    fn rejects_a_port_that_is_no_tcp_port() {
        for (url, port) in [
            ("https://127.0.0.1:99998/", "99998"),
            ("https://a.example:65536/", "65536"),
            ("https://a.example:0/", "0"),
            ("https://a.example:/", ""),
            ("https://[::1]:70000/", "70000"),
            ("https://a.example:+443/", "+443"),
        ] {
            match EndpointUrl::parse(url) {
                Err(UrlError::BadPort { port: got, .. }) => assert_eq!(got, port, "{url}"),
                Err(other) => {
                    // The URI parser may refuse some of these itself; what
                    // matters is that none is fetched from port 443.
                    assert!(!matches!(other, UrlError::BadPort { .. }), "{url}: {other}");
                }
                Ok(parsed) => panic!("{url} parsed, port {}", parsed.port()),
            }
        }
        let err = EndpointUrl::parse("https://127.0.0.1:99998/").unwrap_err();
        assert!(err.to_string().contains("\"99998\""), "{err}");
        let u = EndpointUrl::parse("https://a.example:65535/").unwrap();
        assert_eq!(u.port(), 65535);
        let u = EndpointUrl::parse("https://a.example:0443/").unwrap();
        assert_eq!(u.port(), 443);
        assert!(EndpointUrl::parse("https://a b/").is_err());
    }

    #[test]
    fn resolves_redirect_locations() {
        let base = EndpointUrl::parse("https://a.example:8443/dir/bundle?x=1").unwrap();
        let abs = base.resolve("https://cdn.example/b.json").unwrap();
        assert_eq!(
            (abs.host(), abs.port(), abs.target()),
            ("cdn.example", 443, "/b.json")
        );
        let path = base.resolve("/other").unwrap();
        assert_eq!(
            (path.host(), path.port(), path.target()),
            ("a.example", 8443, "/other")
        );
        let rel = base.resolve("next.json").unwrap();
        assert_eq!(rel.target(), "/dir/next.json");
        let scheme_rel = base.resolve("//b.example/x").unwrap();
        assert_eq!(
            (scheme_rel.host(), scheme_rel.target()),
            ("b.example", "/x")
        );
        assert!(matches!(
            base.resolve("http://a.example/plain"),
            Err(UrlError::NotHttps(_))
        ));
        assert!(matches!(
            base.resolve("ftp://a.example/x"),
            Err(UrlError::NotHttps(_))
        ));
    }
}
