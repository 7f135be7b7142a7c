//! Opening files that live where other users can write: sink directories, the trigger directory,
//! the database's side files, rescue files, the metrics textfile's directory. Whoever can write
//! the directory can swap a path for a symlink (to `/dev/zero`, to a file of theirs), a FIFO (an
//! `open` or `read` that never returns) or a huge file between any check and any use. So a path
//! there is never checked first and opened second: it is opened once — without following a link,
//! without blocking, close-on-exec — and everything is decided on the descriptor (`fstat`), with
//! reads bounded by what tokend itself could have written.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Flags for every open in a directory others may write.
pub const HOSTILE_OPEN_FLAGS: i32 = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;

/// What was found at a path, without following it.
#[derive(Debug)]
pub enum Found {
    Missing,
    /// A regular file of at most the bound, its metadata taken from the open descriptor.
    Regular {
        meta: Metadata,
        bytes: Vec<u8>,
    },
    /// Something that is not a regular file of ours to read: a link, FIFO, socket, device,
    /// directory, or a file larger than the bound.
    Other(&'static str),
}

/// Reads the regular file at `path` if it holds at most `max_bytes`; never follows a link, never
/// blocks on a FIFO or device, never reads more than `max_bytes + 1` bytes.
pub fn read_regular(path: &Path, max_bytes: usize) -> std::io::Result<Found> {
    let file = match OpenOptions::new().read(true).custom_flags(HOSTILE_OPEN_FLAGS).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Missing),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(Found::Other("a symbolic link")),
        // O_NONBLOCK on a FIFO without a writer opens fine; ENXIO is a socket or a device node
        // without a driver.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(Found::Other("a socket or device")),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Ok(Found::Other(kind_of(&meta)));
    }
    if meta.len() > max_bytes as u64 {
        return Ok(Found::Other("a file larger than tokend writes there"));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(max_bytes));
    // The file may grow between fstat and read: the bound holds whatever happens.
    file.take(max_bytes as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > max_bytes {
        return Ok(Found::Other("a file larger than tokend writes there"));
    }
    Ok(Found::Regular { meta, bytes })
}

/// What kind of directory entry `meta` (from `lstat` or `fstat`) describes, for log lines.
pub fn kind_of(meta: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device node"
    } else if meta.nlink() > 1 {
        "a file with several hard links"
    } else {
        "a regular file"
    }
}

/// Opens (creating if needed) a small file of tokend's own for writing, as a signal or a lock —
/// never through a link, never blocking on a FIFO planted in its place.
pub fn open_own_file(path: &Path, truncate: bool) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(0o600)
        .custom_flags(HOSTILE_OPEN_FLAGS)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other(format!("{} is {}, not a regular file", path.display(), kind_of(&meta))));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_fifos_and_large_files_are_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(read_regular(&fifo, 64).unwrap(), Found::Other("a FIFO")));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(read_regular(&link, 64).unwrap(), Found::Other("a symbolic link")));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 65]).unwrap();
        assert!(matches!(read_regular(&big, 64).unwrap(), Found::Other(_)));
        std::fs::write(&big, b"token").unwrap();
        assert!(matches!(read_regular(&big, 64).unwrap(), Found::Regular { bytes, .. } if bytes == b"token"));
        assert!(matches!(read_regular(&dir.path().join("none"), 64).unwrap(), Found::Missing));
        assert!(open_own_file(&fifo, true).is_err(), "a FIFO is not opened as a signal file");
        assert!(open_own_file(&link, true).is_err(), "nor is a link");
    }
}
