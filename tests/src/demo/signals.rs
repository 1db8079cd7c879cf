//! Ctrl-C (SIGINT), SIGTERM and SIGHUP end the demo the ordinary way: the handler only raises a
//! flag, and the demo, which looks at it between steps, returns [`Interrupted`] so that the
//! lab's and the gateway's `Drop` remove namespaces, daemon and pins. A third signal gives up
//! on the cleanup and exits at once, for a cleanup that hangs; the next run removes what is
//! left (its namespaces are named after a pid that is then gone).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SIGNALS: AtomicU32 = AtomicU32::new(0);

/// The exit status of a program ended by SIGINT, which shells and CI expect.
pub const EXIT_INTERRUPTED: u8 = 130;

/// The demo stopped because it was asked to.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

extern "C" fn on_signal(_: libc::c_int) {
    if SIGNALS.fetch_add(1, Ordering::SeqCst) >= 2 {
        // SAFETY: _exit(2) is async-signal-safe.
        unsafe { libc::_exit(i32::from(EXIT_INTERRUPTED)) };
    }
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP. SA_RESTART keeps the blocking calls of
/// other threads (reads, waits) from failing with EINTR.
pub fn install() -> std::io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only does an atomic add (and
        // _exit), which are async-signal-safe.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether a signal has arrived.
pub fn interrupted() -> bool {
    SIGNALS.load(Ordering::SeqCst) > 0
}

/// `Err(Interrupted)` once a signal has arrived.
pub fn check() -> Result<(), Interrupted> {
    if interrupted() { Err(Interrupted) } else { Ok(()) }
}

/// Sleeps for `duration`, returning early with `Err(Interrupted)` when a signal arrives.
pub fn sleep(duration: Duration) -> Result<(), Interrupted> {
    let until = Instant::now() + duration;
    loop {
        check()?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}
