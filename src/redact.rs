//! Secrets and tokens never reach logs, errors or panics in full. [`Secret`] wraps a value whose
//! `Debug`/`Display` print only a fingerprint; [`fingerprint`] is that short, stable, one-way tag,
//! enough to tell two tokens apart in a log without being able to use either.

use sha2::{Digest, Sha256};
use std::fmt;

/// `fp:` followed by the first 8 hex digits of SHA-256 of the value.
pub fn fingerprint(value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("fp:{hex}")
}

/// A secret string (client secret, API key, token) that prints as its fingerprint.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The real value, for building a request. Never format the result into a log or error.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.fingerprint())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// Replaces every occurrence of each secret in `text` by its fingerprint — for provider error
/// bodies, which may echo the request back.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(s, &fingerprint(s));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_prints_only_fingerprint() {
        let s = Secret::new("super-secret-value");
        let shown = format!("{s} {s:?}");
        assert!(!shown.contains("super-secret-value"), "{shown}");
        assert!(shown.contains(&fingerprint("super-secret-value")));
        assert_eq!(fingerprint("a").len(), 11);
        assert_ne!(fingerprint("a"), fingerprint("b"));
    }

    #[test]
    fn scrub_replaces_echoed_secrets() {
        let out = scrub("bad token abcdef123 given", &["abcdef123"]);
        assert_eq!(out, format!("bad token {} given", fingerprint("abcdef123")));
    }
}
