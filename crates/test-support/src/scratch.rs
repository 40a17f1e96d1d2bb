//! Scratch directories for integration tests, removed when the test
//! process exits (however many tests used them, pass or fail), so a test
//! run leaves nothing in the temporary folder.

use std::path::PathBuf;
use std::sync::{Mutex, Once};

static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static AT_EXIT: Once = Once::new();

extern "C" fn remove_all() {
    let dirs = match DIRS.lock() {
        Ok(d) => d,
        Err(p) => p.into_inner(),
    };
    for d in dirs.iter() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A fresh, empty directory `<temp>/<prefix>-<name>-<pid>`, removed with
/// its contents when the process exits.
///
/// # Panics
///
/// If the directory cannot be created (a test fixture: nothing to recover).
pub fn dir(prefix: &str, name: &str) -> PathBuf {
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain `extern "C"` function with no captured
        // state; it runs once at normal process exit.
        unsafe { libc::atexit(remove_all) };
    });
    let dir = std::env::temp_dir().join(format!("{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    #[allow(clippy::expect_used)]
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    match DIRS.lock() {
        Ok(mut d) => d.push(dir.clone()),
        Err(p) => p.into_inner().push(dir.clone()),
    }
    dir
}
