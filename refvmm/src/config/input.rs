//! Reading configuration text from a file, a pipe, a FIFO or standard
//! input: bounded in size, and stopped by a signal while it waits.

/// The largest configuration refvmm reads.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Reads a configuration from `path`, which may be a pipe or a FIFO: at
/// most [`MAX_CONFIG_BYTES`], and a SIGINT or SIGTERM while it waits for
/// input stops the read (`Interrupted`).
pub(super) fn read_config_text(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::Ordering;

    // Non-blocking, so that opening a FIFO with no writer yet returns and
    // the wait below can see a signal.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if crate::events::STOP.load(Ordering::Relaxed) {
            return Err(Error::new(
                ErrorKind::Interrupted,
                "stopped by a signal while waiting for the configuration",
            ));
        }
        match file.read(&mut chunk) {
            Ok(0) => {
                // End of a file, or a FIFO whose writer closed it. A FIFO
                // that never had a writer also reads 0: wait for one.
                let is_fifo = file
                    .metadata()
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
                if !is_fifo || !bytes.is_empty() || fifo_had_writer(&file) {
                    break;
                }
                wait_readable(&file);
            }
            Ok(n) => {
                if bytes.len() + n > MAX_CONFIG_BYTES {
                    return Err(Error::new(
                        ErrorKind::InvalidData,
                        format!("larger than the {MAX_CONFIG_BYTES}-byte limit of a configuration"),
                    ));
                }
                bytes.extend_from_slice(&chunk[..n]);
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => wait_readable(&file),
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    String::from_utf8(bytes).map_err(|_| Error::new(ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Whether a writer has opened the FIFO and gone (poll says POLLHUP).
fn fifo_had_writer(file: &std::fs::File) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(file, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
        && fds[0].revents().contains(PollFlags::HUP)
}

/// Waits up to 100 ms for `file` to become readable (or hung up); a signal
/// ends the wait early.
fn wait_readable(file: &std::fs::File) {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(file, PollFlags::IN)];
    let timeout = Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    let _ = poll(&mut fds, Some(&timeout));
}
