//! The open file limit. Service managers and shells give a process a soft RLIMIT_NOFILE of
//! 1024, for the sake of programs that still use select(2), and a much higher hard limit that
//! a process needing more raises its soft limit to by itself. The daemon uses epoll only, and
//! every health check, control connection and metrics connection costs a descriptor.

/// The soft limit before and after [`raise_open_file_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFileLimit {
    pub was: libc::rlim_t,
    pub now: libc::rlim_t,
}

#[derive(Debug, thiserror::Error)]
pub enum RlimitError {
    #[error("reading the open file limit: {0}")]
    Read(std::io::Error),
    #[error("raising the open file limit from {} to the hard limit {}: {source}", show(*.soft), show(*.hard))]
    Raise { soft: libc::rlim_t, hard: libc::rlim_t, source: std::io::Error },
}

/// Sets the soft open file limit to the hard limit (no privilege needed for that).
pub fn raise_open_file_limit() -> Result<OpenFileLimit, RlimitError> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes into the rlimit it is given, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(RlimitError::Read(std::io::Error::last_os_error()));
    }
    let was = limit.rlim_cur;
    if was >= limit.rlim_max {
        return Ok(OpenFileLimit { was, now: was });
    }
    let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit(2) only reads the rlimit it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        let source = std::io::Error::last_os_error();
        return Err(RlimitError::Raise { soft: was, hard: limit.rlim_max, source });
    }
    Ok(OpenFileLimit { was, now: limit.rlim_max })
}

/// A limit as people read it.
pub fn show(limit: libc::rlim_t) -> String {
    if limit == libc::RLIM_INFINITY { "unlimited".to_owned() } else { limit.to_string() }
}
