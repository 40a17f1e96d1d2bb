//! A runner for integration tests that cannot use libtest's harness
//! (`harness = false`: the binary re-executes itself in other roles, or a
//! case needs the whole process).

/// A named case; `Err` says why it cannot run here (missing privilege or
/// kernel feature), which counts as a failure, never as a pass.
pub type Case = (&'static str, fn() -> Result<(), String>);

/// Runs the cases whose names contain a command-line filter (all without
/// one), prints libtest-style lines, and exits non-zero if any failed.
pub fn run_cases(suite: &str, cases: &[Case]) {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut failed = 0;
    for &(name, case) in cases {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        match std::panic::catch_unwind(case) {
            Ok(Ok(())) => println!("test {name} ... ok"),
            Ok(Err(why)) => {
                failed += 1;
                println!("test {name} ... FAILED: cannot run here: {why}");
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED");
            }
        }
    }
    if failed > 0 {
        println!("{failed} {suite} test(s) failed");
        std::process::exit(1);
    }
}
