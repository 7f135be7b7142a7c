//! Who is on the other end of a connection, from the kernel (`SO_PEERCRED`, `SO_PEERGROUPS`),
//! and whether that caller may read a credential.

use crate::config::{Reader, SocketAccess};
use std::os::fd::AsRawFd;

/// The caller's credentials as the kernel recorded them at `connect()`. Nothing the caller sends
/// can change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups at `connect()` (`SO_PEERGROUPS`), which is what let the caller open a
    /// 0660 socket through a group it is not primarily in.
    pub groups: Vec<u32>,
}

impl Peer {
    pub fn of(stream: &tokio::net::UnixStream) -> std::io::Result<Peer> {
        let cred = stream.peer_cred()?;
        Ok(Peer { uid: cred.uid(), gid: cred.gid(), pid: cred.pid(), groups: peer_groups(stream)? })
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Root and tokend's own user may read everything: both can read the database itself, so
    /// refusing them would protect nothing. Anyone else needs a matching `readers` entry, or,
    /// without `readers`, membership of the socket's group.
    pub fn may_read(&self, access: &SocketAccess, socket_gid: u32, daemon_uid: u32) -> bool {
        if self.uid == 0 || self.uid == daemon_uid {
            return true;
        }
        match &access.readers {
            None => self.in_group(socket_gid),
            Some(readers) => readers.iter().any(|r| match *r {
                Reader::Uid(uid) => self.uid == uid,
                Reader::Gid(gid) => self.in_group(gid),
            }),
        }
    }
}

/// Linux's limit on supplementary groups (NGROUPS_MAX).
const MAX_GROUPS: usize = 65_536;

/// `getsockopt(SO_PEERGROUPS)`: the buffer is grown to the size the kernel asks for (`ERANGE`).
#[allow(unsafe_code)]
fn peer_groups(stream: &tokio::net::UnixStream) -> std::io::Result<Vec<u32>> {
    let fd = stream.as_raw_fd();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .map_err(|_| std::io::Error::other("too many groups"))?;
        // SAFETY: the pointer and length describe `groups`, which outlives the call; the kernel
        // writes at most `len` bytes and sets `len` to what it wrote (or needs).
        let rc = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
        };
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= MAX_GROUPS {
            groups.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SinkFormat;

    fn access(readers: Option<Vec<Reader>>) -> SocketAccess {
        SocketAccess { readers, units: Vec::new(), credential_format: SinkFormat::Raw }
    }

    #[test]
    fn who_may_read() {
        let peer = Peer { uid: 1001, gid: 1001, pid: Some(7), groups: vec![50] };
        let (socket_gid, daemon_uid) = (50, 999);
        assert!(peer.may_read(&access(None), socket_gid, daemon_uid), "a member of the socket's group");
        assert!(!peer.may_read(&access(None), 51, daemon_uid), "not a member");
        assert!(
            !peer.may_read(&access(Some(vec![Reader::Uid(1002)])), socket_gid, daemon_uid),
            "readers replace the group"
        );
        assert!(peer.may_read(&access(Some(vec![Reader::Uid(1001)])), 51, daemon_uid));
        assert!(peer.may_read(&access(Some(vec![Reader::Gid(50)])), 51, daemon_uid), "a supplementary group");
        assert!(peer.may_read(&access(Some(vec![Reader::Gid(1001)])), 51, daemon_uid), "the primary group");
        let root = Peer { uid: 0, gid: 0, pid: None, groups: vec![] };
        assert!(root.may_read(&access(Some(vec![])), socket_gid, daemon_uid));
        let daemon = Peer { uid: 999, gid: 999, pid: None, groups: vec![] };
        assert!(daemon.may_read(&access(Some(vec![])), socket_gid, daemon_uid));
    }
}
