//! Builds tests/c/driver.c with the system C compiler against the committed
//! header and the cdylib, and runs it against the reference server: once
//! natively, once under valgrind (no leak, no invalid access).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "c-driver-secret";

/// The directory holding the cdylib. `cargo test` leaves it beside the test
/// binary, in `deps/`, built with the workspace's features; a plain `cargo
/// build` puts it one level up. Building it here only when neither has it
/// keeps a second build of the dependencies (other features, gigabytes)
/// out of a workspace test run.
fn lib_dir() -> PathBuf {
    const LIB: &str = "libguardian_sync_ffi.so";
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    if deps.join(LIB).exists() {
        return deps;
    }
    let dir = deps.parent().unwrap().to_path_buf();
    if !dir.join(LIB).exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "guardian-sync-ffi", "--lib"])
            .status()
            .unwrap();
        assert!(status.success(), "cargo build -p guardian-sync-ffi failed");
    }
    assert!(dir.join(LIB).exists(), "no {LIB} in {}", dir.display());
    dir
}

fn compile(out_dir: &Path) -> PathBuf {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let exe = out_dir.join("driver");
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-O0"])
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("tests/c/driver.c"))
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lguardian_sync_ffi", "-lpthread"])
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// A URL where nothing listens: a port that was free a moment ago.
fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

/// Waits for a child with a deadline; kills it (SIGKILL) past the deadline.
fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the C driver did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the driver (behind `wrapper`, if any) against a fresh server.
fn run_driver(wrapper: &[&str], slowdown: u32, limit: Duration) -> Output {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(
            guardian_server::ServerBuilder::new()
                .token("tenant-c", TOKEN)
                .bind("127.0.0.1:0"),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(dir.path());
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let child = cmd
        .arg(server.url())
        .arg(TOKEN)
        .arg(dead_url())
        .arg(dir.path())
        .arg(slowdown.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(child, limit);
    rt.block_on(server.shutdown());
    out
}

#[test]
fn c_program_drives_the_whole_api() {
    let out = run_driver(&[], 1, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "driver failed ({:?})\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have_valgrind() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn c_program_under_valgrind_has_no_leak_and_no_invalid_access() {
    if !have_valgrind() {
        // CI installs valgrind (.ci/run); elsewhere its absence is reported.
        assert!(
            std::env::var_os("CI").is_none(),
            "valgrind is required in CI"
        );
        eprintln!("skipped: valgrind is not installed");
        return;
    }
    // Runtime threads may leave "still reachable" blocks at exit; definite
    // and indirect leaks and every invalid access are errors (exit 99).
    let out = run_driver(
        &[
            "valgrind",
            "--leak-check=full",
            "--show-leak-kinds=definite,indirect",
            "--errors-for-leak-kinds=definite,indirect",
            "--error-exitcode=99",
            "--quiet",
        ],
        10,
        Duration::from_secs(600),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "driver under valgrind failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}
