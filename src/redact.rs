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
/// bodies, which may echo the request back. See [`Scrubber`] for the encoded forms.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    Scrubber::new(secrets).scrub(text)
}

/// Secrets shorter than this are not scrubbed: replacing every "ab" in a text would destroy it
/// and protect nothing.
const MIN_SCRUBBED_LEN: usize = 4;

/// The secrets of one exchange, in every form an endpoint that echoes its request may send them
/// back: as sent, form-urlencoded (`+` for space), percent-encoded (upper and lower case hex),
/// JSON-escaped, Base64 (standard and URL-safe), and the Base64 `user:password` of an HTTP Basic
/// header. Scrub whole texts before cutting them: a cut secret is no longer recognised.
#[derive(Debug, Clone, Default)]
pub struct Scrubber {
    /// (form, fingerprint of the secret), longest first so that a longer form is replaced
    /// before a shorter one inside it.
    forms: Vec<(String, String)>,
}

impl Scrubber {
    pub fn new(secrets: &[&str]) -> Self {
        let mut scrubber = Self::default();
        for s in secrets {
            scrubber.add(s);
        }
        scrubber
    }

    /// Adds one secret in all its forms.
    pub fn add(&mut self, secret: &str) {
        if secret.len() < MIN_SCRUBBED_LEN {
            return;
        }
        use base64::Engine as _;
        let fp = fingerprint(secret);
        let form_encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let percent_upper: String = secret
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let json = serde_json::to_string(secret).unwrap_or_default();
        let json = json.trim_matches('"');
        let forms = [
            secret.to_string(),
            form_encoded,
            percent_lower(&percent_upper),
            percent_upper,
            json.to_string(),
            json.replace('/', "\\/"),
            base64::engine::general_purpose::STANDARD.encode(secret),
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(secret),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
        ];
        for form in forms {
            self.push(form, &fp);
        }
    }

    /// Adds the Base64 `user:password` of an HTTP Basic header (and the password itself).
    pub fn add_basic(&mut self, user: &str, password: &str) {
        use base64::Engine as _;
        self.add(password);
        if password.len() >= MIN_SCRUBBED_LEN {
            let header = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            self.push(header, &fingerprint(password));
        }
    }

    fn push(&mut self, form: String, fp: &str) {
        if form.len() >= MIN_SCRUBBED_LEN && !self.forms.iter().any(|(f, _)| *f == form) {
            let at = self.forms.partition_point(|(f, _)| f.len() >= form.len());
            self.forms.insert(at, (form, fp.to_string()));
        }
    }

    /// `text` with every form of every secret replaced by the secret's fingerprint.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (form, fp) in &self.forms {
            if out.contains(form.as_str()) {
                out = out.replace(form.as_str(), fp);
            }
        }
        out
    }

    /// [`Self::scrub`], then [`clean_text`]: for provider text on its way to a log, a terminal,
    /// the database or a hook.
    pub fn clean(&self, text: &str, max_chars: usize) -> String {
        clean_text(&self.scrub(text), max_chars)
    }
}

/// Percent-encoding with lower-case hex digits (`%2f`), which some servers echo.
fn percent_lower(upper: &str) -> String {
    let mut out = String::with_capacity(upper.len());
    let mut chars = upper.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '%' {
            out.extend(chars.by_ref().take(2).map(|h| h.to_ascii_lowercase()));
        }
    }
    out
}

/// Text that came from the network (a provider's error, a redirect's parameters) made safe for a
/// terminal, a log, the database and a process environment: every control character (escape
/// sequences, NUL, newlines) and every Unicode format character (bidirectional overrides) becomes
/// a space, and at most `max_chars` characters are kept, with "…" when cut.
pub fn clean_text(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 4));
    for (i, c) in text.chars().enumerate() {
        if i == max_chars {
            out.push('…');
            break;
        }
        let format_char =
            matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
        out.push(if c.is_control() || format_char { ' ' } else { c });
    }
    out.trim().to_string()
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
    fn every_encoded_form_of_a_secret_is_scrubbed() {
        let secret = "s3cr3t/with+odd=chars&more";
        let mut scrubber = Scrubber::new(&[secret]);
        scrubber.add_basic("client-id", "basic-pass-123");
        use base64::Engine as _;
        let encoded = [
            secret.to_string(),
            url::form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>(),
            "s3cr3t%2Fwith%2Bodd%3Dchars%26more".to_string(),
            "s3cr3t%2fwith%2bodd%3dchars%26more".to_string(),
            serde_json::to_string(secret).unwrap(),
            "s3cr3t\\/with+odd=chars&more".to_string(),
            base64::engine::general_purpose::STANDARD.encode(secret),
            base64::engine::general_purpose::STANDARD.encode("client-id:basic-pass-123"),
        ];
        for form in encoded {
            let text = format!("echo: [{form}] end");
            let out = scrubber.scrub(&text);
            assert!(!out.contains(&form), "{form} survived: {out}");
            assert!(out.contains("fp:"), "{out}");
        }
    }

    #[test]
    fn clean_text_removes_controls_and_bounds_length() {
        assert_eq!(clean_text("a\u{1b}[2Jb\0c\nd\u{202e}e", 100), "a [2Jb c d e");
        assert_eq!(clean_text(&"x".repeat(10), 4), "xxxx…");
    }

    #[test]
    fn scrub_replaces_echoed_secrets() {
        let out = scrub("bad token abcdef123 given", &["abcdef123"]);
        assert_eq!(out, format!("bad token {} given", fingerprint("abcdef123")));
    }
}
