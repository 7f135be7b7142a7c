//! The local socket API's settings: `[daemon] socket` / `credential_socket`, and each
//! credential's `readers`, `units` and `credential_format`.

use super::*;

/// Longest list of `readers` or `units` for one credential: a rule set, not a user database.
const MAX_RULES: usize = 256;

impl Validator<'_> {
    pub(super) fn sockets(
        &mut self,
        place: &str,
        socket: Option<PathBuf>,
        credential_socket: Option<PathBuf>,
    ) -> (Option<PathBuf>, Option<PathBuf>) {
        let mut path = |field: &str, p: Option<PathBuf>| {
            let p = p?;
            // sun_path holds 108 bytes with its terminating NUL.
            let resolved = self.resolve(&p);
            if p.as_os_str().is_empty() || resolved.file_name().is_none() {
                self.report(place, Some(field), format!("\"{}\" does not name a file", p.display()));
                None
            } else if resolved.as_os_str().len() > 107 {
                self.report(
                    place,
                    Some(field),
                    format!("{} is longer than a Unix socket path may be (107 bytes)", resolved.display()),
                );
                None
            } else {
                Some(resolved)
            }
        };
        let socket = path("socket", socket);
        let credential_socket = path("credential_socket", credential_socket);
        if socket.is_some() && socket == credential_socket {
            self.report(place, Some("credential_socket"), "must not be the same path as socket");
        }
        (socket, credential_socket)
    }

    pub(super) fn access(
        &mut self,
        place: &str,
        readers: Option<Vec<String>>,
        units: Option<Vec<String>>,
        credential_format: Option<String>,
    ) -> Option<SocketAccess> {
        let before = self.problems.len();
        let readers = readers.map(|list| {
            if list.len() > MAX_RULES {
                self.report(place, Some("readers"), format!("has {} entries; at most {MAX_RULES}", list.len()));
            }
            list.iter().take(MAX_RULES).filter_map(|r| self.reader(place, r)).collect::<Vec<_>>()
        });
        let units = units.unwrap_or_default();
        if units.len() > MAX_RULES {
            self.report(place, Some("units"), format!("has {} entries; at most {MAX_RULES}", units.len()));
        }
        for unit in &units {
            let allowed = |c: char| c.is_ascii_alphanumeric() || ":-_.\\@*?".contains(c);
            if unit.is_empty() || unit.len() > 256 || !unit.chars().all(allowed) {
                self.report(
                    place,
                    Some("units"),
                    format!(
                        "\"{}\" is not a unit name or glob (letters, digits, \":-_.\\@\" and the wildcards * and ?)",
                        unit.escape_debug()
                    ),
                );
            }
        }
        let credential_format = match credential_format.as_deref() {
            None | Some("raw") => SinkFormat::Raw,
            Some("json") => SinkFormat::Json,
            Some("env") => SinkFormat::Env,
            Some(other) => {
                self.report(
                    place,
                    Some("credential_format"),
                    format!("\"{}\" is not a format; expected raw, json or env", other.escape_debug()),
                );
                SinkFormat::Raw
            }
        };
        (self.problems.len() == before).then_some(SocketAccess { readers, units, credential_format })
    }

    fn reader(&mut self, place: &str, text: &str) -> Option<Reader> {
        let bad = |what: &str| format!("\"{}\" {what}", text.escape_debug());
        let (kind, value) = text.split_once(':').unwrap_or(("", text));
        let found = match kind {
            "uid" => value.parse().map(Reader::Uid).map_err(|_| bad("is not a uid")),
            "gid" => value.parse().map(Reader::Gid).map_err(|_| bad("is not a gid")),
            "user" => match nix::unistd::User::from_name(value) {
                Ok(Some(user)) => Ok(Reader::Uid(user.uid.as_raw())),
                Ok(None) => Err(format!("no user named \"{}\" on this system", value.escape_debug())),
                Err(e) => Err(format!("cannot look up user \"{}\": {e}", value.escape_debug())),
            },
            "group" => match nix::unistd::Group::from_name(value) {
                Ok(Some(group)) => Ok(Reader::Gid(group.gid.as_raw())),
                Ok(None) => Err(format!("no group named \"{}\" on this system", value.escape_debug())),
                Err(e) => Err(format!("cannot look up group \"{}\": {e}", value.escape_debug())),
            },
            _ => Err(bad("is not a reader; expected \"user:NAME\", \"group:NAME\", \"uid:N\" or \"gid:N\"")),
        };
        found.map_err(|m| self.report(place, Some("readers"), m)).ok()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Reader, SinkFormat, parse_with};
    use std::collections::BTreeMap;
    use std::path::Path;

    fn parse(daemon: &str, credential: &str) -> Result<crate::config::Config, String> {
        let text = format!(
            "[daemon]\n{daemon}\n[[credential]]\nname = \"a\"\nprovider = \"oauth2\"\ntoken_url = \"https://auth.example.com/t\"\nclient_id = \"c\"\n{credential}\n"
        );
        parse_with(Path::new("/etc/tokend/tokend.toml"), &text, &BTreeMap::<String, String>::new())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn socket_settings_resolve_and_default() {
        let c = parse("socket = \"run/t.sock\"\ncredential_socket = \"/run/c.sock\"", "").unwrap();
        assert_eq!(c.daemon.socket.as_deref(), Some(Path::new("/etc/tokend/run/t.sock")));
        assert_eq!(c.daemon.credential_socket.as_deref(), Some(Path::new("/run/c.sock")));
        let a = c.access_of("a");
        assert_eq!((a.readers.as_ref(), a.units.len(), a.credential_format), (None, 0, SinkFormat::Raw));
        let c = parse("", "readers = [\"uid:1001\", \"gid:5\", \"user:root\", \"group:root\"]\nunits = [\"job-*.service\"]\ncredential_format = \"env\"").unwrap();
        let a = c.access_of("a");
        assert_eq!(a.readers, Some(vec![Reader::Uid(1001), Reader::Gid(5), Reader::Uid(0), Reader::Gid(0)]));
        assert_eq!((a.units.as_slice(), a.credential_format), (&["job-*.service".to_string()][..], SinkFormat::Env));
        assert!(c.daemon.socket.is_none(), "off unless set");
    }

    #[test]
    fn bad_socket_settings_name_the_field_and_value() {
        let long = format!("socket = \"/{}\"", "x".repeat(120));
        for (daemon, credential, expected) in [
            (long.as_str(), "", "field \"socket\": /xxx"),
            (
                "socket = \"/run/s\"\ncredential_socket = \"/run/s\"",
                "",
                "field \"credential_socket\": must not be the same path",
            ),
            ("", "readers = [\"www-data\"]", "field \"readers\": \"www-data\" is not a reader"),
            ("", "readers = [\"uid:-1\"]", "field \"readers\": \"uid:-1\" is not a uid"),
            ("", "readers = [\"user:no-such-user-here\"]", "no user named \"no-such-user-here\""),
            ("", "readers = [\"group:no-such-group-here\"]", "no group named \"no-such-group-here\""),
            ("", "units = [\"a b.service\"]", "field \"units\": \"a b.service\" is not a unit name"),
            ("", "credential_format = \"yaml\"", "field \"credential_format\": \"yaml\" is not a format"),
        ] {
            let err = parse(daemon, credential).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
            assert!(err.starts_with("/etc/tokend/tokend.toml: "), "{err}");
        }
    }
}
