//! Running the commands a test needs, and ending the processes a test or
//! the demo started, by PID, bounded in time.

use std::{
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

/// SIGTERM, then up to `grace` for the process to exit; SIGKILL after that.
/// Returns the exit status, or `None` when it had to be killed.
pub fn terminate(child: &mut Child, grace: Duration) -> std::io::Result<Option<ExitStatus>> {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(None)
}

/// Runs `command` to completion; its stdout. Panics with its stderr when it
/// fails (a test's setup or check went wrong).
pub fn stdout_of(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
