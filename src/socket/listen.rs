//! Binding a socket file: a stale one left by a dead process is replaced, a live one (someone
//! answers a connect) is refused, anything that is not a socket is left alone. The file is
//! removed again when the daemon stops, if it is still ours.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The socket file while the daemon serves it; removed on drop unless replaced meanwhile.
pub struct SocketFile {
    path: PathBuf,
    inode: (u64, u64),
    pub gid: u32,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub fn bind(path: &Path, mode: u32) -> Result<(UnixListener, SocketFile), String> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot inspect {shown}: {e}")),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(format!(
                "{shown} is {}, not a socket; refusing to replace it",
                crate::untrusted::kind_of(&meta)
            ));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(format!("{shown} is served by another running process; refusing to take it over")),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %shown, "replacing a stale socket left by a process that is gone");
                std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket {shown}: {e}"))?;
            }
            Err(e) => return Err(format!("cannot tell whether {shown} is in use ({e}); refusing to replace it")),
        },
    }
    let listener =
        std::os::unix::net::UnixListener::bind(path).map_err(|e| format!("cannot bind the socket {shown}: {e}"))?;
    // Callers are checked by their kernel credentials whatever the mode; the mode keeps others
    // from even connecting.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {shown}: {e}"))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("cannot inspect {shown}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| format!("{shown}: {e}"))?;
    let listener = UnixListener::from_std(listener).map_err(|e| format!("{shown}: {e}"))?;
    Ok((listener, SocketFile { path: path.to_path_buf(), inode: (meta.dev(), meta.ino()), gid: meta.gid() }))
}

/// Accepts connections forever, each handed to `serve` with its permit; beyond
/// [`super::MAX_CONNECTIONS`] at once a connection is closed as soon as it is accepted.
pub async fn accept_bounded<F, Fut>(listener: UnixListener, what: &'static str, serve: F)
where
    F: Fn(UnixStream, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(super::MAX_CONNECTIONS));
    let mut refused: u64 = 0;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, mostly: wait for some to be closed rather than spin.
                tracing::warn!("{what}: cannot accept a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(serve(stream, permit));
            }
            Err(_) => {
                refused += 1;
                // One line per power of two: a flood does not flood the journal.
                if refused.is_power_of_two() {
                    tracing::warn!(
                        refused,
                        limit = super::MAX_CONNECTIONS,
                        "{what}: too many connections; closing new ones at once"
                    );
                }
                drop(stream);
            }
        }
    }
}
