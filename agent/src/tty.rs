//! Terminals for containers and exec sessions: receiving the console that
//! runc hands over on `--console-socket` (runc's docs/terminals.md: it
//! connects, sends the pseudoterminal's master end as `SCM_RIGHTS`, and
//! closes), and setting a terminal's window size.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::libc;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

nix::ioctl_write_ptr_bad!(set_window_size, libc::TIOCSWINSZ, libc::winsize);

/// Reads the console master that runc sends on `stream`.
pub fn receive_console(stream: &UnixStream) -> io::Result<OwnedFd> {
    // runc sends the terminal's name as the message body.
    let mut name = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut received = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            received.extend(fds);
        }
    }
    let mut fds = received
        .into_iter()
        // SAFETY: the kernel just installed these descriptors for us and
        // nothing else owns them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    fds.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the runtime sent no terminal on the console socket",
        )
    })
}

/// Sets the window size of the terminal whose master (or slave) is `fd`;
/// the kernel signals SIGWINCH to its foreground process group.
pub fn resize(fd: BorrowedFd<'_>, width: u16, height: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `size` is a valid winsize that outlives the call, and `fd`
    // is an open descriptor.
    unsafe { set_window_size(fd.as_raw_fd(), &size) }
        .map(|_| ())
        .map_err(io::Error::from)
}

/// A new pseudoterminal: (master, slave), both close-on-exec.
pub fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    let pty = nix::pty::openpty(None, None).map_err(io::Error::from)?;
    for fd in [pty.master.as_fd(), pty.slave.as_fd()] {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(io::Error::from)?;
    }
    Ok((pty.master, pty.slave))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pty_takes_a_window_size() {
        let (master, slave) = open_pty().unwrap();
        resize(master.as_fd(), 120, 40).unwrap();
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: a valid out-pointer to a winsize and an open descriptor.
        let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
        assert_eq!(rc, 0);
        assert_eq!((size.ws_col, size.ws_row), (120, 40));
    }

    #[test]
    fn receives_a_descriptor() {
        let (a, b) = UnixStream::pair().unwrap();
        let (master, _slave) = open_pty().unwrap();
        let fds = [master.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(b"/dev/pts/x")];
        nix::sys::socket::sendmsg::<()>(a.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
            .unwrap();
        let got = receive_console(&b).unwrap();
        resize(got.as_fd(), 10, 10).unwrap();
    }
}
