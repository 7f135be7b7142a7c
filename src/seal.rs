//! Encryption at rest, backend-neutral: where the key comes from, what a key id is, and sealing
//! and opening one stored value. A store backend calls [`Sealer::seal`] on every secret it writes
//! and [`Sealer::open`] on every secret it reads, and nothing else here knows SQL.
//!
//! - **Cipher**: AES-256-GCM-SIV from `aws-lc-rs`, which is already compiled in as rustls' crypto
//!   provider (no second cryptography library). GCM-SIV takes random 96-bit nonces safely: a
//!   repeated nonce reveals only that two identical values were sealed under identical associated
//!   data, it does not break authenticity as it would with plain GCM. The cipher is set up once
//!   per key ([`Key::from_bytes`]); sealing a token is one AES pass over a few hundred bytes.
//! - **Binding**: the associated data is (credential name, column, generation), so a value copied
//!   to another row, another column or an older generation fails to open.
//! - **Format**: `s1 <key id> <base64url(nonce ‖ ciphertext ‖ tag)>`. Stored tokens are validated
//!   to be printable ASCII without spaces, so no plaintext token can look like a sealed value; a
//!   value without the prefix is plaintext (a store written before a key was configured).
//! - **Key id**: the first 4 bytes of SHA-256 over a label and the key, in hex: names the key a
//!   value needs without revealing anything usable about it.

use crate::config::Environment;
use crate::redact::Secret;
use aws_lc_rs::aead::{AES_256_GCM_SIV, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The text a key file (and a systemd credential) holds: this prefix, then the key in base64url.
const KEY_PREFIX: &str = "tokend-key:v1:";
const KEY_LEN: usize = 32;
const SEALED_PREFIX: &str = "s1 ";
const TAG_LEN: usize = 16;
/// Longest key file read: a key is 57 bytes; anything much longer is not a key.
const MAX_KEY_FILE: u64 = 4096;

/// Where the key is read from: `[daemon] key_credential`, `key_file` or `key_env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/<name>` (`LoadCredentialEncrypted=`).
    Credential(String),
    /// A file of mode 0600 owned by tokend's user.
    File(PathBuf),
    /// An environment variable holding the key text (development).
    Env(String),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Credential(name) => write!(f, "key_credential \"{name}\""),
            KeySource::File(path) => write!(f, "key_file {}", path.display()),
            KeySource::Env(var) => write!(f, "key_env {var}"),
        }
    }
}

/// Names the key a value was sealed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 4]);

impl KeyId {
    pub fn parse(hex: &str) -> Option<KeyId> {
        if hex.len() != 8 {
            return None;
        }
        let mut id = [0u8; 4];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(KeyId(id))
    }

    /// The id as a number, for a 32-bit slot such as SQLite's `application_id`.
    pub fn as_u32(self) -> u32 {
        u32::from_be_bytes(self.0)
    }

    pub fn from_u32(n: u32) -> KeyId {
        KeyId(n.to_be_bytes())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Which stored secret a value is: part of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    AccessToken,
    RefreshToken,
    /// A rescue file: the answer whose commit failed.
    Rescue,
}

impl Column {
    pub fn as_str(self) -> &'static str {
        match self {
            Column::AccessToken => "access_token",
            Column::RefreshToken => "refresh_token",
            Column::Rescue => "rescue",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{source_name}: {message}")]
    Key { source_name: String, message: String },
    #[error(
        "credential \"{name}\" {column}: the value is encrypted (key id {id}) but no key is configured; set key_credential, key_file or key_env in [daemon]"
    )]
    NoKey { name: String, column: &'static str, id: KeyId },
    #[error(
        "credential \"{name}\" {column}: sealed with key id {id}, which is not the configured key ({configured}); wrong key, or a rotation to {id} is unfinished"
    )]
    UnknownKey { name: String, column: &'static str, id: KeyId, configured: String },
    #[error(
        "credential \"{name}\" {column} (generation {generation}): does not decrypt with key {id} ({configured}): the value was damaged, truncated, or copied from another row, column or generation"
    )]
    Damaged { name: String, column: &'static str, generation: i64, id: KeyId, configured: String },
    /// The store as a whole does not fit the key (its recorded key id, values of unknown keys).
    #[error("{0}")]
    Store(String),
    #[error("cannot store credential \"{name}\" {column}: this command reads the store without its key")]
    Locked { name: String, column: &'static str },
    #[error("cannot seal credential \"{name}\" {column}: the cipher failed")]
    Seal { name: String, column: &'static str },
}

/// One key, its cipher set up once.
pub struct Key {
    id: KeyId,
    cipher: RandomizedNonceKey,
    /// Where it came from, for error messages.
    source: String,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({} from {})", self.id, self.source)
    }
}

impl Key {
    pub fn from_bytes(bytes: &[u8; KEY_LEN], source: impl Into<String>) -> Key {
        let digest = Sha256::new().chain_update(b"tokend key id\0").chain_update(bytes).finalize();
        let id = KeyId([digest[0], digest[1], digest[2], digest[3]]);
        // A 32-byte key is exactly what AES-256-GCM-SIV takes: this cannot fail.
        let cipher = RandomizedNonceKey::new(&AES_256_GCM_SIV, bytes).expect("a 32-byte AES-256 key");
        Key { id, cipher, source: source.into() }
    }

    /// Parses the text of a key file or credential (`tokend-key:v1:…`, trailing newline allowed).
    pub fn from_text(text: &str, source: impl Into<String>) -> Result<Key, SealError> {
        let source = source.into();
        let bad = |message: &str| SealError::Key { source_name: source.clone(), message: message.to_string() };
        let body = text.trim_end_matches(['\n', '\r']).strip_prefix(KEY_PREFIX).ok_or_else(|| {
            bad("not a tokend key (expected one line \"tokend-key:v1:…\" as `tokend key init` writes)")
        })?;
        let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| bad("the key is not valid base64url"))?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|_| bad("the key is not 32 bytes long"))?;
        Ok(Key::from_bytes(&bytes, source))
    }

    /// A new random key, as the text a key file holds.
    pub fn generate_text() -> String {
        let mut bytes = [0u8; KEY_LEN];
        // aws-lc's generator, seeded from the OS; a key cannot be made without randomness.
        aws_lc_rs::rand::fill(&mut bytes).expect("random bytes for a key");
        format!("{KEY_PREFIX}{}\n", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Reads the key from `source`: a key file must be 0600 (nothing for group or others) and
    /// owned by this process's user.
    pub fn load(source: &KeySource, env: &dyn Environment) -> Result<Key, SealError> {
        let name = source.to_string();
        let fail = |message: String| SealError::Key { source_name: name.clone(), message };
        let text = match source {
            KeySource::Env(var) => env.var(var).ok_or_else(|| fail("the environment variable is not set".into()))?,
            KeySource::File(path) => read_key_file(path, true).map_err(fail)?,
            KeySource::Credential(cred) => {
                if cred.is_empty() || cred.contains('/') {
                    return Err(fail("must be a bare credential name, without '/'".into()));
                }
                let dir = env.var("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    fail(format!(
                        "$CREDENTIALS_DIRECTORY is not set: run under systemd with LoadCredentialEncrypted={cred}:… \
                         (or run this command with `systemd-run --pipe --wait -p LoadCredentialEncrypted={cred}:/etc/credstore.encrypted/{cred} tokend …`)"
                    ))
                })?;
                // systemd makes the credential directory private to the service: no mode check.
                read_key_file(&Path::new(&dir).join(cred), false).map_err(fail)?
            }
        };
        Key::from_text(&text, name)
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

fn read_key_file(path: &Path, check_access: bool) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if check_access {
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{} has mode {mode:04o}: other users could read the key; `chmod 600 {}`",
                path.display(),
                path.display()
            ));
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(format!(
                "{} is owned by uid {}, not by tokend's user (uid {me}); `chown` it to the user tokend runs as",
                path.display(),
                meta.uid()
            ));
        }
    }
    let mut text = String::new();
    file.take(MAX_KEY_FILE).read_to_string(&mut text).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text)
}

/// The keys a store is opened with: the first seals, every one opens (two during a rotation).
#[derive(Debug)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    pub fn new(current: Key, also_accepted: Vec<Key>) -> Keyring {
        let mut keys = vec![current];
        for key in also_accepted {
            if keys.iter().all(|k| k.id != key.id) {
                keys.push(key);
            }
        }
        Keyring { keys }
    }

    pub fn current(&self) -> &Key {
        &self.keys[0]
    }

    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|k| k.id)
    }

    fn describe(&self) -> String {
        let keys: Vec<String> = self.keys.iter().map(|k| format!("{} id {}", k.source, k.id)).collect();
        keys.join(", ")
    }
}

/// What a store seals with: no key (plaintext, as before encryption existed) or a keyring. Cheap
/// to clone; every connection of a store holds one.
#[derive(Debug, Clone, Default)]
pub struct Sealer {
    ring: Option<Arc<Keyring>>,
    /// For commands that show no token (`tokend list`): sealed values read as empty, and nothing
    /// can be sealed, so nothing can be written in the wrong form.
    locked: bool,
}

/// What a stored value is, read without decrypting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Plain,
    Sealed(KeyId),
}

/// Classifies a stored value by its prefix alone.
pub fn classify(stored: &str) -> Stored {
    match stored.strip_prefix(SEALED_PREFIX).and_then(|rest| rest.get(..8)).and_then(KeyId::parse) {
        Some(id) => Stored::Sealed(id),
        None => Stored::Plain,
    }
}

impl Sealer {
    pub fn plaintext() -> Sealer {
        Sealer { ring: None, locked: false }
    }

    pub fn with(keyring: Keyring) -> Sealer {
        Sealer { ring: Some(Arc::new(keyring)), locked: false }
    }

    /// Reads the store without its key: every sealed value opens as an empty secret, and
    /// sealing fails. For listings, which show names, expiry and status, never a token.
    pub fn locked() -> Sealer {
        Sealer { ring: None, locked: true }
    }

    pub fn keyring(&self) -> Option<&Keyring> {
        self.ring.as_deref()
    }

    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// The text to store for `value`: sealed under the current key, or `value` itself without one.
    pub fn seal(&self, name: &str, column: Column, generation: i64, value: &str) -> Result<String, SealError> {
        if self.locked {
            return Err(SealError::Locked { name: name.to_string(), column: column.as_str() });
        }
        let Some(ring) = &self.ring else { return Ok(value.to_string()) };
        let key = ring.current();
        let mut buffer = Vec::with_capacity(value.len() + TAG_LEN);
        buffer.extend_from_slice(value.as_bytes());
        let nonce = key
            .cipher
            .seal_in_place_append_tag(Aad::from(associated_data(name, column, generation)), &mut buffer)
            .map_err(|_| SealError::Seal { name: name.to_string(), column: column.as_str() })?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + buffer.len());
        sealed.extend_from_slice(nonce.as_ref());
        sealed.extend_from_slice(&buffer);
        Ok(format!("{SEALED_PREFIX}{} {}", key.id, URL_SAFE_NO_PAD.encode(sealed)))
    }

    /// The secret a stored text holds; plaintext passes through (a store not yet encrypted).
    pub fn open(&self, name: &str, column: Column, generation: i64, stored: &str) -> Result<Secret, SealError> {
        let id = match classify(stored) {
            Stored::Plain => return Ok(Secret::new(stored)),
            Stored::Sealed(id) => id,
        };
        let column_name = column.as_str();
        if self.locked {
            return Ok(Secret::new(""));
        }
        let Some(ring) = &self.ring else {
            return Err(SealError::NoKey { name: name.to_string(), column: column_name, id });
        };
        let Some(key) = ring.keys.iter().find(|k| k.id == id) else {
            return Err(SealError::UnknownKey {
                name: name.to_string(),
                column: column_name,
                id,
                configured: ring.describe(),
            });
        };
        let damaged = || SealError::Damaged {
            name: name.to_string(),
            column: column_name,
            generation,
            id,
            configured: key.source.clone(),
        };
        // "s1 " + 8 hex digits + " ": the prefix classify() accepted.
        let body = stored.get(SEALED_PREFIX.len() + 9..).ok_or_else(damaged)?;
        let mut bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| damaged())?;
        if bytes.len() < NONCE_LEN + TAG_LEN {
            return Err(damaged());
        }
        let nonce = Nonce::try_assume_unique_for_key(&bytes[..NONCE_LEN]).map_err(|_| damaged())?;
        let plain = key
            .cipher
            .open_in_place(nonce, Aad::from(associated_data(name, column, generation)), &mut bytes[NONCE_LEN..])
            .map_err(|_| damaged())?;
        let text = std::str::from_utf8(plain).map_err(|_| damaged())?;
        Ok(Secret::new(text))
    }
}

/// `tokend seal v1`, then name, column and generation, each unambiguously delimited (a name
/// cannot contain NUL; the generation is fixed-width).
fn associated_data(name: &str, column: Column, generation: i64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(32 + name.len());
    aad.extend_from_slice(b"tokend seal v1\0");
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(column.as_str().as_bytes());
    aad.push(0);
    aad.extend_from_slice(&generation.to_be_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::with(Keyring::new(Key::from_text(&Key::generate_text(), "test key").unwrap(), vec![]))
    }

    #[test]
    fn round_trip_and_binding() {
        let s = sealer();
        let sealed = s.seal("nb", Column::RefreshToken, 7, "r-secret-token").unwrap();
        assert!(!sealed.contains("r-secret-token"));
        assert_eq!(classify(&sealed), Stored::Sealed(s.keyring().unwrap().current().id()));
        assert_eq!(s.open("nb", Column::RefreshToken, 7, &sealed).unwrap().expose(), "r-secret-token");
        for (name, column, generation) in
            [("nc", Column::RefreshToken, 7), ("nb", Column::AccessToken, 7), ("nb", Column::RefreshToken, 6)]
        {
            let e = s.open(name, column, generation, &sealed).unwrap_err();
            assert!(matches!(e, SealError::Damaged { .. }), "{e}");
        }
        let truncated = &sealed[..sealed.len() - 3];
        assert!(matches!(s.open("nb", Column::RefreshToken, 7, truncated), Err(SealError::Damaged { .. })));
    }

    #[test]
    fn wrong_key_and_no_key_are_named() {
        let sealed = sealer().seal("nb", Column::AccessToken, 1, "a").unwrap();
        let e = sealer().open("nb", Column::AccessToken, 1, &sealed).unwrap_err().to_string();
        assert!(e.contains("not the configured key (test key id"), "{e}");
        let e = Sealer::plaintext().open("nb", Column::AccessToken, 1, &sealed).unwrap_err().to_string();
        assert!(e.contains("no key is configured"), "{e}");
        assert_eq!(Sealer::plaintext().open("nb", Column::AccessToken, 1, "plain").unwrap().expose(), "plain");
        assert_eq!(Sealer::locked().open("nb", Column::AccessToken, 1, &sealed).unwrap().expose(), "");
        assert!(matches!(Sealer::locked().seal("nb", Column::AccessToken, 1, "a"), Err(SealError::Locked { .. })));
    }

    #[test]
    fn key_text_is_checked() {
        assert!(Key::from_text("tokend-key:v1:AAAA", "k").unwrap_err().to_string().contains("not 32 bytes"));
        assert!(Key::from_text("hello", "k").unwrap_err().to_string().starts_with("k: not a tokend key"));
        let text = Key::generate_text();
        assert_eq!(Key::from_text(&text, "a").unwrap().id(), Key::from_text(&text, "b").unwrap().id());
        let id = Key::from_text(&text, "a").unwrap().id();
        assert_eq!(KeyId::parse(&id.to_string()), Some(id));
        assert_eq!(KeyId::from_u32(id.as_u32()), id);
    }
}
