//! The server's disk misbehaves: `gsync serve` on a database file whose
//! `pwrite` fails with ENOSPC, or whose `fsync` or `pread` fails with EIO
//! (injected with Debian's `fiu-run`), while a runner drains an outbox
//! through it; then the server is SIGKILLed (the round repeated until a
//! fault took effect) and started again on the same file with a sound
//! disk. The claims: the server neither panics nor stops answering (a
//! failed write is a 5xx the runner retries, `/healthz` stays up); a start
//! that meets a fault ends with one clear error line; nothing the server
//! acknowledged is lost and nothing is applied twice (the invariants of
//! DESIGN §11 against the applied log); the file passes its integrity
//! check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    assert_no_panic, check_invariants, final_drain, require_tool, server_on, Runner, RunnerOpts,
    Workload, TENANT, TOKEN,
};
use guardian_server::Faults;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

const LONG: Duration = Duration::from_secs(120);

/// A `gsync serve` child on a database file, under `fiu-run`.
struct Serve {
    child: Child,
    url: String,
    stderr: Arc<Mutex<String>>,
}

/// What a start that did not reach "listening on" printed on stderr.
struct FailedStart(String);

/// Starts `gsync serve` on `db` under `fiu-run`: with `fiu_command` run
/// before it starts, or, for [`Onset::Listening`], with nothing enabled
/// yet and `fiu-ctrl` listening on named pipes at `ctrl`.
async fn start(
    db: &Path,
    onset: Onset,
    fiu_command: &str,
    ctrl: &Path,
) -> Result<Serve, FailedStart> {
    let mut command = Command::new("fiu-run");
    command.arg("-x");
    match onset {
        Onset::Listening => command.arg("-f").arg(ctrl),
        Onset::ExistingFile | Onset::NoFile => command.args(["-f", "", "-c", fiu_command]),
    };
    let mut child = command
        .arg(env!("CARGO_BIN_EXE_gsync"))
        .args(["serve", "--listen", "127.0.0.1:0", "--applied-log", "--db"])
        .arg(db)
        .args(["--token", &format!("{TENANT}:{TOKEN}")])
        .env("RUST_LOG", "error")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start gsync serve under fiu-run");
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stderr.take().unwrap();
    let sink = stderr.clone();
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf).await {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("gsync serve neither listened nor ended within 30 s")
        .unwrap();
    match line
        .as_deref()
        .and_then(|l| l.strip_prefix("listening on "))
    {
        Some(url) => Ok(Serve {
            url: url.trim().to_owned(),
            child,
            stderr,
        }),
        None => {
            let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .expect("a failed start did not exit")
                .unwrap();
            assert_eq!(status.code(), Some(1), "failed start: {status:?}");
            // The reader ends at the end of the exited process's stderr.
            tokio::time::timeout(Duration::from_secs(30), reader)
                .await
                .expect("stderr of a failed start still open after 30 s")
                .unwrap();
            let text = stderr.lock().unwrap().clone();
            Err(FailedStart(text))
        }
    }
}

/// Where the faults begin.
#[derive(Clone, Copy, PartialEq)]
enum Onset {
    /// At the start, on a file the server made before.
    ExistingFile,
    /// At the start, with no file yet: a start that failed half-way must
    /// leave a file the next start takes as its own.
    NoFile,
    /// Once the server listens (`fiu-ctrl`), on a file it made before: for
    /// faults a start meets too often to get through, such as reads.
    Listening,
}

/// The files of one test, in its temporary directory.
struct Files {
    /// The server's database.
    db: PathBuf,
    /// The runner's outbox.
    outbox: PathBuf,
    /// Where `fiu-ctrl` finds the server's named pipes.
    ctrl: PathBuf,
}

impl Files {
    fn in_dir(dir: &Path) -> Self {
        Self {
            db: dir.join("server.db"),
            outbox: dir.join("outbox.db"),
            ctrl: dir.join("fiu"),
        }
    }
}

/// At most this many rounds (a fresh server process on the failing disk,
/// one batch drained, SIGKILL) are run to see the fault take effect. A
/// fresh process starts with a cold page cache; on a small file a warm one
/// can serve a whole batch without a single read.
const ROUNDS: usize = 12;

/// Drains batches through servers on a failing disk until one refused a
/// mutation, SIGKILLing each, and checks everything against the same file
/// served from a sound disk.
async fn drain_through_a_failing_disk(fiu_command: &str, tag: &str, onset: Onset) {
    require_tool("fiu-run", "fiu-utils");
    let dir = tempfile::tempdir().unwrap();
    let files = Files::in_dir(dir.path());
    if onset != Onset::NoFile {
        let sound = server_on(&files.db, "127.0.0.1:0", Faults::default()).await;
        sound.shutdown().await;
    }
    let mut work = Workload::open(&files.outbox, tag).await;
    let mut refused = 0;
    for round in 1..=ROUNDS {
        work.simple(30, 3).await;
        refused += drain_one_batch(&files, fiu_command, tag, onset).await;
        if refused > 0 {
            eprintln!("{tag}: the fault took effect in round {round}");
            break;
        }
    }
    assert!(
        refused > 0,
        "{tag}: no fault was injected in {ROUNDS} rounds ({fiu_command})"
    );
    // The same file on a sound disk: whatever the runner still holds goes
    // through, and everything adds up.
    let server = server_on(&files.db, "127.0.0.1:0", Faults::default()).await;
    final_drain(&files.outbox, &server.url()).await;
    let verdict = check_invariants(&server, &work).await;
    eprintln!(
        "{tag}: {} ops applied once each to {} entities",
        verdict.applied, verdict.entities
    );
}

/// One round: starts a server on `files.db` under faults, drains the
/// outbox through it, SIGKILLs it and checks the file. Returns how many
/// mutations the server refused.
async fn drain_one_batch(files: &Files, fiu_command: &str, tag: &str, onset: Onset) -> usize {
    // A start under faults may itself meet one; it must say so in one line.
    let mut failed_starts = 0;
    let mut serve = loop {
        match start(&files.db, onset, fiu_command, &files.ctrl).await {
            Ok(serve) => break serve,
            Err(FailedStart(stderr)) => {
                assert_no_panic(&stderr);
                let errors: Vec<&str> = stderr
                    .lines()
                    .filter(|l| l.starts_with("gsync: "))
                    .collect();
                assert_eq!(errors.len(), 1, "{tag}: a failed start printed {stderr}");
                failed_starts += 1;
                assert!(failed_starts < 60, "{tag}: 60 starts failed: {stderr}");
            }
        }
    };
    if onset == Onset::Listening {
        let pid = serve.child.id().unwrap().to_string();
        let enabled = Command::new("fiu-ctrl")
            .arg("-f")
            .arg(&files.ctrl)
            .args(["-c", fiu_command, &pid])
            .status()
            .await
            .unwrap();
        assert!(enabled.success(), "{tag}: fiu-ctrl failed: {enabled:?}");
    }
    // The runner retries quickly and never gives an op up: every failure
    // here is the server's disk, and the claim is that none loses data.
    let opts = RunnerOpts::default().args([
        "--retry-base",
        "5ms",
        "--retry-cap",
        "50ms",
        "--max-attempts",
        "100000",
        "--breaker-cooldown",
        "50ms",
    ]);
    let mut r = Runner::spawn(tag, &files.outbox, &serve.url, &opts);
    let http = reqwest::Client::new();
    // The server stays up while its disk fails: `/healthz` answers all
    // along, until the drain ends.
    let deadline = tokio::time::Instant::now() + LONG;
    while r.is_running() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{tag}: the drain did not end in {LONG:?}"
        );
        let health = http
            .get(format!("{}/healthz", serve.url))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("the server stopped answering");
        assert_eq!(health.status(), 200, "{tag}: /healthz under faults");
        r.wait_more(r.event_count(), Duration::from_millis(200))
            .await;
    }
    let status = r.wait_exit(Duration::from_secs(10)).await;
    assert_no_panic(&r.stderr());
    let retried = r.named("op_retried").len();
    let refused = serve
        .stderr
        .lock()
        .unwrap()
        .lines()
        .filter(|l| l.contains("mutation failed"))
        .count();
    eprintln!(
        "{tag}: {failed_starts} failed starts; runner {status:?}, {retried} retries; \
         {refused} mutations refused by the server"
    );
    assert_no_panic(&serve.stderr.lock().unwrap());
    // Crash: no clean stop, no checkpoint.
    let pid = i32::try_from(serve.child.id().unwrap()).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    serve.child.wait().await.unwrap();
    let check = rusqlite::Connection::open(&files.db)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |row| row.get::<_, String>(0))
        .unwrap();
    assert_eq!(check, "ok", "{tag}: the server's file after the faults");
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_on_the_servers_writes_loses_and_duplicates_nothing() {
    drain_through_a_failing_disk(
        "enable_random name=posix/io/rw/pwrite,probability=0.03,failinfo=28",
        "server-enospc",
        Onset::ExistingFile,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_on_the_servers_fsync_loses_and_duplicates_nothing() {
    drain_through_a_failing_disk(
        "enable_random name=posix/io/sync/fsync,probability=0.2,failinfo=5",
        "server-fsync",
        Onset::NoFile,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_on_the_servers_reads_loses_and_duplicates_nothing() {
    drain_through_a_failing_disk(
        "enable_random name=posix/io/rw/pread,probability=0.5,failinfo=5",
        "server-pread",
        Onset::Listening,
    )
    .await;
}
