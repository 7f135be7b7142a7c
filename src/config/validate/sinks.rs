//! A sink as written → [`SinkConfig`]: path, format, a mode that never lets other users in nor the
//! group write, and a group that exists.

use super::*;
use crate::config::raw::{RawMode, RawSink};

impl Validator<'_> {
    pub(super) fn sink(&mut self, cred_place: &str, index: usize, raw: RawSink) -> Option<SinkConfig> {
        let place = format!("{cred_place}: sink #{}", index + 1);
        let Some(path) = raw.path else {
            self.report(&place, Some("path"), "is missing");
            return None;
        };
        if path.as_os_str().is_empty() || path.file_name().is_none() {
            self.report(&place, Some("path"), format!("\"{}\" does not name a file", path.display()));
            return None;
        }
        let format = match raw.format.as_deref() {
            None | Some("raw") => SinkFormat::Raw,
            Some("json") => SinkFormat::Json,
            Some("env") => SinkFormat::Env,
            Some(other) => {
                self.report(
                    &place,
                    Some("format"),
                    format!("\"{other}\" is not a sink format; expected raw, json or env"),
                );
                return None;
            }
        };
        let mode = match raw.mode {
            None => DEFAULT_SINK_MODE,
            Some(RawMode::Int(n)) => match u32::try_from(n) {
                Ok(m) if m <= 0o777 => m,
                _ => {
                    self.report(
                        &place,
                        Some("mode"),
                        format!("{n} is not a file mode; write it in octal, as \"0640\" or 0o640"),
                    );
                    return None;
                }
            },
            Some(RawMode::Text(t)) => match u32::from_str_radix(t.trim_start_matches("0o"), 8) {
                Ok(m) if m <= 0o777 => m,
                _ => {
                    self.report(&place, Some("mode"), format!("\"{t}\" is not an octal file mode like \"0640\""));
                    return None;
                }
            },
        };
        if mode & 0o007 != 0 {
            self.report(
                &place,
                Some("mode"),
                format!("{mode:04o} lets every local user at the token; grant a group instead (e.g. 0640)"),
            );
            return None;
        }
        if mode & 0o020 != 0 {
            self.report(
                &place,
                Some("mode"),
                format!("{mode:04o} lets the group replace the token readers trust; readers need 0640 at most"),
            );
            return None;
        }
        if mode & 0o400 == 0 {
            self.report(&place, Some("mode"), format!("{mode:04o} does not let the owner read the file"));
            return None;
        }
        let group = match raw.group {
            None => None,
            Some(name) => match nix::unistd::Group::from_name(&name) {
                Ok(Some(g)) => Some((name, g.gid.as_raw())),
                Ok(None) => {
                    self.report(&place, Some("group"), format!("no group named \"{name}\" on this system"));
                    return None;
                }
                Err(e) => {
                    self.report(&place, Some("group"), format!("cannot look up group \"{name}\": {e}"));
                    return None;
                }
            },
        };
        Some(SinkConfig { path: self.resolve(&path), format, mode, group })
    }
}
