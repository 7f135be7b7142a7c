//! The caller's side of the API, for `tokend token`: one request per connection
//! (`Connection: close`), the answer read to EOF, bounded in size and time.

use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest answer read; a token answer is a few kilobytes.
const MAX_ANSWER_BYTES: u64 = 1024 * 1024;

#[derive(Debug)]
pub enum ClientError {
    /// Nobody serves the socket (no file, or a stale one): read the store instead.
    NoDaemon,
    Failed(String),
}

/// `GET path` on the API at `socket`; returns the status and body.
pub async fn get(socket: &Path, path: &str, within: Duration) -> Result<(u16, Vec<u8>), ClientError> {
    let mut stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Err(ClientError::NoDaemon);
        }
        Err(e) => return Err(ClientError::Failed(format!("cannot connect to {}: {e}", socket.display()))),
    };
    let exchange = async {
        let request = format!("GET {path} HTTP/1.1\r\nHost: tokend\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        (&mut stream).take(MAX_ANSWER_BYTES).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(within, exchange)
        .await
        .map_err(|_| ClientError::Failed(format!("{} did not answer within {} s", socket.display(), within.as_secs())))?
        .map_err(|e| ClientError::Failed(format!("{}: {e}", socket.display())))?;
    parse_answer(&answer).ok_or_else(|| ClientError::Failed(format!("{}: not an HTTP answer", socket.display())))
}

fn parse_answer(answer: &[u8]) -> Option<(u16, Vec<u8>)> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..split]).ok()?;
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, answer[split + 4..].to_vec()))
}
