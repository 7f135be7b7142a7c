//! systemd's `LoadCredential=ID:/path/to/socket`: when it starts a unit, the service manager
//! binds its end to the abstract address `\0<random>/unit/<unit>/<ID>`, connects, and reads the
//! credential to EOF. tokend reads that address with `getpeername`, takes `<ID>` as the
//! credential's name, checks `<unit>` against the credential's `units`, writes the current token
//! in its `credential_format` and closes. Anything else is closed with nothing written, and
//! logged.
//!
//! An abstract address is not protected: any process can bind one that names any unit. So only
//! root (the system's service manager) is served; the socket file is 0600 besides.

use super::listen::accept_bounded;
use super::peer::Peer;
use super::{Policy, StorePool, glob_matches};
use crate::clock::now_secs;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

/// A reader that does not take the token within this is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(listener: UnixListener, policy: Arc<RwLock<Arc<Policy>>>, stores: Arc<StorePool>) {
    accept_bounded(listener, "credential socket", move |stream, permit| {
        let (policy, stores) = (policy.clone(), stores.clone());
        async move {
            let _permit = permit;
            let policy = policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            serve_one(stream, &policy, &stores).await;
        }
    })
    .await;
}

/// What the service manager's address says: the unit being started and the credential ID.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub unit: &'a str,
    pub id: &'a str,
}

/// Parses `<random>/unit/<unit>/<id>` (the abstract name without its leading NUL).
pub fn parse_address(name: &[u8]) -> Option<Request<'_>> {
    let text = std::str::from_utf8(name).ok()?;
    let mut parts = text.split('/');
    let (random, kind, unit, id) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let plain = |s: &str| !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic());
    let ok = parts.next().is_none()
        && !random.is_empty()
        && random.bytes().all(|b| b.is_ascii_hexdigit())
        && kind == "unit"
        && plain(unit)
        && plain(id);
    ok.then_some(Request { unit, id })
}

async fn serve_one(mut stream: UnixStream, policy: &Policy, stores: &Arc<StorePool>) {
    let peer = Peer::of(&stream).ok();
    let address = stream.peer_addr().ok();
    let name = address.as_ref().and_then(|a| a.as_abstract_name());
    let shown = name.map(|n| String::from_utf8_lossy(n).escape_debug().to_string());
    let (uid, pid) = (peer.as_ref().map(|p| p.uid), peer.as_ref().and_then(|p| p.pid));
    let refuse = |why: &str| {
        tracing::warn!(
            uid,
            pid,
            address = shown.as_deref().unwrap_or("(not abstract)"),
            "credential socket: {why}; closed with nothing written"
        );
    };
    if uid != Some(0) {
        return refuse("the caller is not root (the service manager)");
    }
    let Some(request) = name.and_then(parse_address) else {
        return refuse("the caller's address is not systemd's <random>/unit/<unit>/<id>");
    };
    let Some((_, access)) = policy.credentials.get(request.id) else {
        return refuse("no credential of that name");
    };
    if !access.units.iter().any(|pattern| glob_matches(pattern, request.unit)) {
        return refuse("the unit is not in the credential's units");
    }
    let key = request.id.to_string();
    let state = match stores.read(move |store| store.get(&key)).await {
        Ok(Some(state)) => state,
        Ok(None) => return refuse("no token is stored for it"),
        Err(e) => {
            tracing::error!(credential = request.id, "credential socket: {e}");
            return refuse("the store cannot be read");
        }
    };
    if state.status.is_dead() {
        return refuse("the credential needs re-authorization");
    }
    if state.expires_at.is_some_and(|at| at <= now_secs()) {
        return refuse("its token has expired");
    }
    let bytes = match crate::sink::render(access.credential_format, &state) {
        Ok(bytes) => bytes,
        Err(e) => return refuse(&e),
    };
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    match written {
        Ok(Ok(())) => tracing::info!(
            credential = request.id,
            unit = request.unit,
            generation = state.generation,
            "credential socket: token handed to the unit"
        ),
        Ok(Err(e)) => {
            tracing::warn!(credential = request.id, unit = request.unit, "credential socket: write failed: {e}")
        }
        Err(_) => tracing::warn!(
            credential = request.id,
            unit = request.unit,
            "credential socket: the reader stalled; dropped"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_addresses() {
        assert_eq!(
            parse_address(b"c0ffee00c0ffee00/unit/report-job.service/my-nation"),
            Some(Request { unit: "report-job.service", id: "my-nation" })
        );
        for bad in [
            &b"c0ffee/unit/report-job.service"[..],
            b"c0ffee/unit/a.service/id/extra",
            b"c0ffee/user/a.service/id",
            b"/unit/a.service/id",
            b"xyz/unit/a.service/id",
            b"c0ffee/unit//id",
            b"c0ffee/unit/a.service/",
            b"c0ffee/unit/a service/id",
            b"c0ffee/unit/a.service/\xff",
        ] {
            assert_eq!(parse_address(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
