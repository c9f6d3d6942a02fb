//! Ctrl-C and SIGTERM for the lab programs (`mesh-lab`, `mesh-bench`): they only set a flag, so
//! that the program stops at the next step and its lab is still removed on the way out.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// From now on, SIGINT (Ctrl-C) and SIGTERM (`kill`, `timeout`) set the flag [`interrupted`]
/// reads instead of ending the process, so that it removes what it made before it ends.
pub fn catch_interrupt() {
    extern "C" fn on_interrupt(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::Relaxed);
    }
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, on_interrupt as *const () as libc::sighandler_t);
        }
    }
}

/// Whether SIGINT or SIGTERM came since [`catch_interrupt`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}
