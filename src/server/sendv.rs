//! Writes a response as it is assembled: the encoded head and the record chunks (slices of the
//! batch cache or of a read-ahead window) go out together in `sendmsg` calls of up to
//! `IOV_MAX` buffers, without being copied into one buffer first.
//!
//! Like glommio's own socket writes, each call first tries a non-blocking `sendmsg`; when the
//! socket's buffer is full it writes through the glommio stream, which waits for room on the
//! reactor, and then goes back to vectored writes.

use std::os::fd::RawFd;

use futures::AsyncWriteExt;

/// Buffers per `sendmsg` (Linux's IOV_MAX).
const IOV_MAX: usize = 1024;

/// Writes every byte of `parts`, in order, to the socket `fd` whose write half is `wr`.
pub async fn write_all<W: futures::AsyncWrite + Unpin>(
    wr: &mut W,
    fd: RawFd,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    // The first unwritten byte: parts[i][off].
    let (mut i, mut off) = (0usize, 0usize);
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(parts.len().min(IOV_MAX));
    // Bounded: every pass writes at least one byte or returns an error.
    while i < parts.len() {
        if parts[i].len() == off {
            i += 1;
            off = 0;
            continue;
        }
        iov.clear();
        for (k, p) in parts[i..].iter().enumerate().take(IOV_MAX) {
            let s = if k == 0 { &p[off..] } else { p };
            if !s.is_empty() {
                iov.push(libc::iovec {
                    iov_base: s.as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                });
            }
        }
        // SAFETY: the iovecs point into `parts`, borrowed for the whole call; the message
        // header names no address and no control data.
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len() as _;
            libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        let n = if sent >= 0 {
            sent as usize
        } else {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                // Full: let the reactor wait for room while it writes the next piece.
                std::io::ErrorKind::WouldBlock => wr.write(&parts[i][off..]).await?,
                _ => return Err(e),
            }
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        // Advance past `n` bytes.
        let mut left = n;
        while left > 0 && i < parts.len() {
            let here = parts[i].len() - off;
            if left < here {
                off += left;
                left = 0;
            } else {
                left -= here;
                i += 1;
                off = 0;
            }
        }
    }
    Ok(())
}
