//! The writer thread and group commit over the outbox's one read-write
//! SQLite connection.
//!
//! Async callers send jobs (closures run against the connection) over a
//! channel and await a oneshot reply. A caller whose job would be a group
//! of one anyway (a blocking caller: an FFI binding's thread, a sync app;
//! or an enqueue on a runtime with other workers while commits are fast) runs
//! it on its own thread instead, under the same connection lock, sparing
//! the two cross-thread wake-ups of the hand-off; otherwise it joins the
//! writer's group like everyone else.
//!
//! The thread takes the first job, then everything else already queued
//! (waiting briefly for more when the previous group had several callers),
//! and runs them all in ONE `BEGIN IMMEDIATE` transaction, each as soon as
//! it arrives and inside its own savepoint, so a refused job leaves no
//! trace (a lone caller needs none: its refusal rolls the transaction
//! back). It replies to each caller only after `COMMIT` has returned.
//! Concurrent enqueuers thus share one fsync, and no op is acknowledged
//! before it is durable.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::error::{JobError, OutboxError, StorageError};
use crate::clock::SharedClock;
use guardian_sqlite::wal_prefill::WalPrefill;

/// Settings the jobs read; fixed for the outbox's life.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) clock: SharedClock,
    pub(crate) max_payload_bytes: usize,
    pub(crate) coalesce: bool,
    /// The file's namespace for new op ids (see `op_ids`).
    pub(crate) op_id_ns: u64,
    /// Lowest position a new op may take: one past every position this
    /// process gave an op, committed or not. A commit whose outcome is
    /// unknown named its op's id to the caller, who looks for it: a later
    /// op must never hold that id.
    pub(crate) seq_floor: std::sync::atomic::AtomicI64,
}

impl Ctx {
    pub(crate) fn now(&self) -> i64 {
        self.clock.now_millis()
    }
}

type Done = Box<dyn FnOnce(Result<(), StorageError>) + Send>;
/// A job; `None` means "do not run, the transaction could not begin".
type Job = Box<dyn FnOnce(Option<(&Connection, &Ctx)>) -> (bool, Done) + Send>;

enum Msg {
    /// A job, and the ticket it was sent under, if any.
    Job(Job, Option<Ticket>),
    /// Run the after-commit work (a WAL fill step) that a commit on an
    /// async caller's thread left to the writer.
    Maintain,
    Close(oneshot::Sender<()>),
}

/// Most jobs committed together; bounds the latency of the first one.
const MAX_GROUP: usize = 4096;

/// Handle to the writer thread; clones share it.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

/// What the writer thread and blocking callers share.
#[derive(Debug)]
struct Shared {
    /// The connection, held by whoever runs a group (the writer thread, or
    /// a blocking caller committing alone); `None` once closed.
    db: Mutex<Option<Db>>,
    ctx: Ctx,
    /// Jobs sent to the writer thread and not yet taken by it.
    queued: AtomicUsize,
    /// Callers in the last group committed: the lone rule of both paths.
    last_group: AtomicUsize,
    /// Where blocking callers wait for their replies.
    board: Arc<ReplyBoard>,
    /// A lone async caller may commit on its own thread (see
    /// [`Writer::call_inline`]).
    inline: bool,
    /// Moving average of a lone commit's duration in µs, by whoever ran it.
    lone_commit_us: AtomicU64,
    /// The connection's busy timeout, restored after an inline `BEGIN`.
    busy_timeout: Duration,
    /// Holds a commit on cue, for tests of what happens meanwhile.
    #[cfg(test)]
    hold: hold::Hold,
}

impl Shared {
    /// The lone rule of both paths: nothing queued, and the last group was
    /// a single caller.
    fn alone(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0 && self.last_group.load(Ordering::Acquire) <= 1
    }

    /// Closes the connection (waiting for the lock), however it was left;
    /// an open transaction is rolled back by the close.
    fn close_now(&self) {
        *self.db.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.board.announce();
    }

    /// The connection lock if nobody holds it; never waits.
    fn try_db(&self) -> Option<std::sync::MutexGuard<'_, Option<Db>>> {
        match self.db.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Runs `job` in `group` (a group of one, on this thread), ends it and
    /// records it as the last group, with its duration since `started`.
    fn commit_lone(&self, mut group: Group<'_>, job: Job, started: Instant) {
        group.run(job);
        group.finish();
        self.lone_commit_took(started.elapsed());
        self.last_group.store(1, Ordering::Release);
    }

    /// Folds a lone commit's duration into the moving average (weight 1/8).
    fn lone_commit_took(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let old = self.lone_commit_us.load(Ordering::Relaxed);
        let new = old - old / 8 + us / 8;
        self.lone_commit_us.store(new, Ordering::Relaxed);
    }
}

/// Where blocking callers wait for the writer thread's replies: one condvar
/// for all of them, so answering a group of N blocking callers costs the
/// writer one wake-up call (`notify_all`, one futex syscall) instead of N
/// (measured ~36 µs for 8 callers on the benchmark VM, a tenth of a
/// group's cycle). Each caller has its own result slot; a wake-up that
/// finds its slot empty waits again.
#[derive(Debug, Default)]
struct ReplyBoard {
    lock: Mutex<()>,
    posted: Condvar,
    /// Replies were filled since the last `notify_all`.
    unannounced: AtomicBool,
}

type Slot<T, E> = Arc<Mutex<Option<Result<T, E>>>>;

impl ReplyBoard {
    /// Wakes every waiting caller if replies were filled; called once per
    /// group, after all of its replies.
    fn announce(&self) {
        if self.unannounced.swap(false, Ordering::AcqRel) {
            // Taking the lock orders this after a waiter's check of its
            // slot: it is either already waiting, or will see the reply.
            drop(self.lock.lock().unwrap_or_else(PoisonError::into_inner));
            self.posted.notify_all();
        }
    }

    fn wait_for<T, E>(&self, slot: &Slot<T, E>) -> Result<T, E> {
        let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = slot.lock().unwrap_or_else(PoisonError::into_inner).take() {
                return r;
            }
            guard = self
                .posted
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A blocking caller's reply: filled once, by the writer (or on its own
/// thread for a lone commit); if the job is dropped unanswered (the writer
/// thread died), the caller gets `closed` instead of waiting forever.
struct BlockingReply<T, E: JobError> {
    slot: Slot<T, E>,
    board: Arc<ReplyBoard>,
    delivered: bool,
}

impl<T, E: JobError> BlockingReply<T, E> {
    fn deliver(mut self, r: Result<T, E>) {
        self.post(r);
        self.delivered = true;
    }

    fn post(&self, r: Result<T, E>) {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
        self.board.unannounced.store(true, Ordering::Release);
    }
}

impl<T, E: JobError> Drop for BlockingReply<T, E> {
    fn drop(&mut self) {
        if !self.delivered {
            self.post(Err(E::closed()));
            self.board.announce();
        }
    }
}

#[derive(Debug)]
struct Db {
    conn: Connection,
    prefill: Option<WalPrefill>,
    /// Released only after the connection is closed (fields drop in
    /// order): SQLite's close still writes the file and removes its WAL.
    _writers: Option<super::writers::Writers>,
}

impl Db {
    /// Runs after every commit (group or lone).
    fn committed(&mut self) {
        if let Some(p) = self.prefill.as_mut() {
            p.after_commit(&self.conn);
        }
    }
}

/// What to do when a job committed and its caller is no longer there to
/// hear it (see [`Writer::call_unheard`]).
pub(crate) type Unheard = Box<dyn FnOnce() + Send>;

/// Runs the hook, unless the other side already took it. A hook that
/// panics is contained: on the writer thread it would leave the rest of
/// its group unanswered.
fn run_unheard(hook: Option<&Arc<Mutex<Option<Unheard>>>>) {
    let taken = hook.and_then(|h| h.lock().unwrap_or_else(PoisonError::into_inner).take());
    if let Some(hook) = taken {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook)).is_err() {
            tracing::error!("a hook for a write committed unheard panicked");
        }
    }
}

/// A caller waiting for its reply. Dropped with a committed result in the
/// reply channel, unread, it runs the unheard hook: the writer, whose send
/// succeeded, did not.
struct Waiting<T, E> {
    rx: oneshot::Receiver<Result<T, E>>,
    hook: Option<Arc<Mutex<Option<Unheard>>>>,
    /// The job's ticket, told once its result is read or never will be.
    ticket: Option<Ticket>,
}

impl<T, E> Drop for Waiting<T, E> {
    fn drop(&mut self) {
        if self.hook.is_some() {
            // Closed first: a reply sent from now on fails, and the writer
            // runs the hook; one sent before is read here.
            self.rx.close();
            if matches!(self.rx.try_recv(), Ok(Ok(_))) {
                run_unheard(self.hook.as_ref());
            }
        }
        if let Some(t) = &self.ticket {
            t.heard();
        }
    }
}

/// Lets a caller take back the writes it queued: a runner that stops while
/// its attempt for the lock waits on an outbox another connection keeps
/// busy. The writer begins a job sent under the ticket only by marking it
/// running, and the caller marks it heard once the result is read; so a
/// withdrawal either finds nothing running and nothing unread, and no job
/// under the ticket commits from then on, or finds one that does and
/// must be awaited. One call at a time under a ticket.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ticket(Arc<AtomicU8>);

const OPEN: u8 = 0;
const RUNNING: u8 = 1;
/// Withdrawn while a job ran: `WITHDRAWN` once its result is heard.
const WITHDRAWING: u8 = 2;
const WITHDRAWN: u8 = 3;

impl Ticket {
    /// Withdraws every job under the ticket not yet begun, and every later
    /// one. True when none is running or unheard: nothing of the caller's
    /// commits from now on, and it may drop its calls. False when one is:
    /// it will be answered, and its caller must await that answer.
    pub(crate) fn withdraw(&self) -> bool {
        loop {
            match self
                .0
                .compare_exchange(OPEN, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) | Err(WITHDRAWN) => return true,
                Err(RUNNING) => {
                    let marked = self.0.compare_exchange(
                        RUNNING,
                        WITHDRAWING,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    // Heard meanwhile (back to open): try again.
                    if marked.is_ok() {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    fn withdrawn(&self) -> bool {
        self.0.load(Ordering::Acquire) >= WITHDRAWING
    }

    /// The writer begins a job under the ticket; false if it is withdrawn.
    fn start(&self) -> bool {
        self.0
            .compare_exchange(OPEN, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The running job's result is read, or never will be.
    fn heard(&self) {
        let back = self
            .0
            .compare_exchange(RUNNING, OPEN, Ordering::AcqRel, Ordering::Acquire);
        if back == Err(WITHDRAWING) {
            self.0.store(WITHDRAWN, Ordering::Release);
        }
    }
}

/// Wraps `f` as a job whose outcome, once its group has committed (or
/// failed to), goes to `reply`.
fn job<T, E, F, R>(f: F, reply: R) -> Job
where
    T: Send + 'static,
    E: JobError,
    F: FnOnce(&Connection, &Ctx) -> Result<T, E> + Send + 'static,
    R: FnOnce(Result<T, E>) + Send + 'static,
{
    Box::new(move |env| {
        let result = match env {
            Some((conn, ctx)) => f(conn, ctx),
            None => Err(E::closed()),
        };
        let ok = result.is_ok();
        let done: Done = Box::new(move |commit| {
            reply(match commit {
                Ok(()) => result,
                Err(e) => Err(E::storage(e)),
            });
        });
        (ok, done)
    })
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Job(..) => "Job",
            Msg::Maintain => "Maintain",
            Msg::Close(_) => "Close",
        })
    }
}

impl Writer {
    /// Starts the thread; the connection lives until the outbox is closed
    /// or dropped. `prefill`, if given, preallocates the WAL once it grows.
    /// `busy_timeout` is the one `conn` was opened with, restored after an
    /// inline `BEGIN` (which runs without one).
    pub(crate) fn spawn(
        conn: Connection,
        ctx: Ctx,
        prefill: Option<WalPrefill>,
        inline: bool,
        busy_timeout: Duration,
        writers: Option<super::writers::Writers>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            db: Mutex::new(Some(Db {
                conn,
                prefill,
                _writers: writers,
            })),
            ctx,
            queued: AtomicUsize::new(0),
            last_group: AtomicUsize::new(1),
            board: Arc::default(),
            inline,
            lone_commit_us: AtomicU64::new(0),
            busy_timeout,
            #[cfg(test)]
            hold: hold::Hold::default(),
        });
        let (tx, rx) = mpsc::channel();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("guardian-outbox-writer".into())
            .spawn(move || {
                let _closer = CloseOnExit(&thread_shared);
                run(&thread_shared, &rx);
            })?;
        Ok(Self { tx, shared })
    }

    /// Hands a job to the writer thread.
    fn send(&self, job: Job, ticket: Option<Ticket>) -> bool {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(Msg::Job(job, ticket)).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Runs `f` in a coming group commit with no caller to answer: a write
    /// that must be made although whoever needed it is gone (undoing one
    /// whose result was never heard). A failure, or a closed outbox, is
    /// logged as `what` failing.
    pub(crate) fn run_detached<F>(&self, what: &'static str, f: F)
    where
        F: FnOnce(&Connection, &Ctx) -> Result<(), OutboxError> + Send + 'static,
    {
        let job = job(f, move |r: Result<(), OutboxError>| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "{what} failed");
            }
        });
        if !self.send(job, None) {
            tracing::warn!("{what} failed: the outbox is closed");
        }
    }

    /// Holds the writer thread's next group commit (only one with a job
    /// that has an unheard hook, if `hooked_only`), its jobs run, until `go`
    /// fires (or is dropped); `reached` fires when it is held.
    #[cfg(test)]
    pub(crate) fn hold_next_commit(&self, hooked_only: bool) -> HeldCommit {
        self.shared.hold.next_commit(hooked_only)
    }

    /// Fires when a job under a ticket next finds the database busy, as it
    /// begins to wait.
    #[cfg(test)]
    pub(crate) fn when_busy(&self) -> oneshot::Receiver<()> {
        self.shared.hold.next_busy()
    }

    /// Runs `f` in the next group commit and returns its result once committed.
    pub(crate) async fn call<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: JobError,
        F: FnOnce(&Connection, &Ctx) -> Result<T, E> + Send + 'static,
    {
        self.call_unheard(f, None, None).await
    }

    /// [`call`](Self::call); and if the job commits but its caller stopped
    /// waiting once the job had begun (so the result is never heard),
    /// `unheard` runs instead, once: on the writer thread, or wherever the
    /// caller's future is dropped with the result already in hand. Under a
    /// `ticket`, the job is not begun once the ticket is withdrawn, and a
    /// wait for another connection's write lock ends when it is.
    pub(crate) async fn call_unheard<T, E, F>(
        &self,
        f: F,
        unheard: Option<Unheard>,
        ticket: Option<&Ticket>,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: JobError,
        F: FnOnce(&Connection, &Ctx) -> Result<T, E> + Send + 'static,
    {
        // Withdrawn already: not even queued, where it could wait behind
        // another caller's wait for a busy database.
        if ticket.is_some_and(Ticket::withdrawn) {
            return Err(E::closed());
        }
        let (reply, rx) = oneshot::channel::<Result<T, E>>();
        let hook = unheard.map(|h| Arc::new(Mutex::new(Some(h))));
        let writer_hook = hook.clone();
        let writer_ticket = ticket.cloned();
        let job: Job = Box::new(move |env| {
            if writer_ticket.as_ref().is_some_and(|t| !t.start()) {
                return (false, Box::new(drop) as Done);
            }
            // A caller that gave up before the job's turn (a drain aborted
            // at a stop, an enqueue under a timeout) is not written for:
            // nothing it would have done with the result can happen now.
            // Checked after the start, so a caller gone meanwhile either
            // finds the job running or leaves it to be skipped here.
            if reply.is_closed() {
                if let Some(t) = &writer_ticket {
                    t.heard();
                }
                return (false, Box::new(drop) as Done);
            }
            #[cfg(test)]
            if writer_hook.is_some() {
                hold::hooked();
            }
            job(f, move |r| {
                if let Err(Ok(_)) = reply.send(r) {
                    run_unheard(writer_hook.as_ref());
                }
            })(env)
        });
        if !self.send(job, ticket.cloned()) {
            return Err(E::closed());
        }
        let mut waiting = Waiting {
            rx,
            hook,
            ticket: ticket.cloned(),
        };
        let r = (&mut waiting.rx).await;
        waiting.hook = None;
        r.unwrap_or_else(|_| Err(E::closed()))
    }

    /// [`call`](Self::call), but a lone job may run on the calling thread: when
    /// the writer has nothing queued, the last group was a single caller,
    /// the caller is on a multi-threaded tokio runtime with more than one
    /// worker (the others keep running tasks), lone commits have averaged
    /// under [`INLINE_MAX_US`] and no WAL fill is under way, the job runs and
    /// commits here, blocking this worker thread for that one commit instead of
    /// paying the hand-off to the writer thread and back. Otherwise, as
    /// `call`.
    pub(crate) async fn call_inline<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: JobError,
        F: FnOnce(&Connection, &Ctx) -> Result<T, E> + Send + 'static,
    {
        match self.try_inline(f) {
            Ok(result) => result,
            Err(f) => self.call(f).await,
        }
    }

    /// Runs `f` as a lone commit on this thread if [`call_inline`]'s
    /// conditions hold; gives it back otherwise.
    fn try_inline<T, E, F>(&self, f: F) -> Result<Result<T, E>, F>
    where
        T: Send + 'static,
        E: JobError,
        F: FnOnce(&Connection, &Ctx) -> Result<T, E> + Send + 'static,
    {
        let sh = &*self.shared;
        let fast = sh.lone_commit_us.load(Ordering::Relaxed) < INLINE_MAX_US;
        // Blocking a worker leaves the runtime its other workers only if it
        // has some: one worker, like a current-thread runtime, would stall.
        let on_workers = || {
            tokio::runtime::Handle::try_current().is_ok_and(|h| {
                h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                    && h.metrics().num_workers() > 1
            })
        };
        if !(sh.inline && fast && sh.alone() && on_workers()) {
            return Err(f);
        }
        let Some(mut guard) = sh.try_db() else {
            return Err(f);
        };
        let Some(db) = guard.as_mut() else {
            return Ok(Err(E::closed()));
        };
        if db.prefill.as_ref().is_some_and(WalPrefill::filling) {
            return Err(f);
        }
        let started = Instant::now();
        // Another connection (another process) may hold the write lock:
        // waiting for it here would block this worker for up to the busy
        // timeout, so a busy database goes to the writer thread, which waits.
        if begin_without_waiting(&db.conn, sh.busy_timeout).is_err() {
            return Err(f);
        }
        let slot: Slot<T, E> = Arc::new(Mutex::new(None));
        let reply = slot.clone();
        let job = job(f, move |r| {
            *reply.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
        });
        sh.commit_lone(Group::begun(&db.conn, &sh.ctx), job, started);
        // A fill step is the writer thread's to run, not this worker's.
        let fill = db.prefill.as_mut().is_some_and(WalPrefill::due);
        drop(guard);
        if fill {
            let _ = self.tx.send(Msg::Maintain);
        }
        let result = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        Ok(result.unwrap_or_else(|| Err(E::closed())))
    }

    /// [`call`](Self::call) for a thread that may block. When the writer
    /// has nothing queued, no group is forming and the last group was a
    /// single caller, the job is a group of one anyway: it runs here, under
    /// the connection lock, and commits (its fsync included) on this thread.
    /// Otherwise it joins the writer thread's group and this thread waits.
    /// Must not be called on an async executor's thread.
    pub(crate) fn call_blocking<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: JobError,
        F: FnOnce(&Connection, &Ctx) -> Result<T, E> + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(None));
        let reply = BlockingReply {
            slot: slot.clone(),
            board: self.shared.board.clone(),
            delivered: false,
        };
        let job = job(f, move |r| reply.deliver(r));
        let sh = &*self.shared;
        let guard = if sh.alone() { sh.try_db() } else { None };
        match guard {
            Some(mut guard) => {
                match guard.as_mut() {
                    Some(db) => {
                        let started = Instant::now();
                        sh.commit_lone(Group::new(&db.conn, &sh.ctx, false), job, started);
                        db.committed();
                    }
                    None => return Err(E::closed()),
                }
                drop(guard);
            }
            None => {
                if !self.send(job, None) {
                    return Err(E::closed());
                }
            }
        }
        sh.board.wait_for(&slot)
    }

    /// Finishes queued work and closes the connection; every later call,
    /// async or blocking, gets `closed`.
    pub(crate) async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        let answered = self.tx.send(Msg::Close(reply)).is_ok() && rx.await.is_ok();
        if !answered {
            // The writer thread is gone (a job panicked on it): close here,
            // so that no caller's own thread commits after this returns.
            self.shared.close_now();
        }
    }
}

/// Closes the connection when the writer thread ends, however it ends: a
/// panic in a job (in an app's clock, say) unwinds the thread, and the
/// outbox must then refuse every call rather than let callers' own threads
/// keep committing with nobody left to close it.
struct CloseOnExit<'a>(&'a Shared);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the outbox writer thread panicked; the outbox is closed");
        }
        self.0.close_now();
    }
}

/// Lone commits slower than this on average (slow storage) are not run on
/// an async caller's thread: blocking an executor thread that long would
/// stall its other tasks.
const INLINE_MAX_US: u64 = 1_000;

/// Longest wait for more callers to join a group commit.
const GATHER_WAIT: Duration = Duration::from_micros(200);

/// Runs one transaction-control statement (`BEGIN`, `SAVEPOINT`, …) through
/// the statement cache: parsed once per connection, not once per group.
fn control(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Begins a group's transaction, taking the database's write lock.
fn begin(conn: &Connection) -> rusqlite::Result<()> {
    if !conn.is_autocommit() {
        // A job that panicked on a caller's thread left its transaction
        // open; it never committed, so it is undone.
        tracing::error!("outbox transaction left open by a failed caller; rolled back");
        control(conn, "ROLLBACK")?;
    }
    control(conn, "BEGIN IMMEDIATE")
}

/// Longest pause between tries of [`begin_unless_withdrawn`]: how late it
/// may notice a withdrawal.
const WITHDRAWN_POLL: Duration = Duration::from_millis(20);

/// [`begin`], waiting for another connection's write lock as SQLite's busy
/// timeout would, but by polling, so that the wait ends once `ticket` is
/// withdrawn (`None`). SQLite's own busy handler cannot be told to stop.
fn begin_unless_withdrawn(
    conn: &Connection,
    ticket: &Ticket,
    shared: &Shared,
) -> Option<rusqlite::Result<()>> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if ticket.withdrawn() {
            return None;
        }
        match begin_without_waiting(conn, shared.busy_timeout) {
            Err(e) if super::error::is_busy(&e) => {
                let left = shared.busy_timeout.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Some(Err(e));
                }
                #[cfg(test)]
                shared.hold.found_busy();
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(WITHDRAWN_POLL);
            }
            other => return Some(other),
        }
    }
}

/// [`begin`] once, failing at once if another connection holds the write
/// lock; the connection's `busy_timeout` is restored after.
fn begin_without_waiting(conn: &Connection, busy_timeout: Duration) -> rusqlite::Result<()> {
    let _ = conn.busy_timeout(Duration::ZERO);
    let began = begin(conn);
    let _ = conn.busy_timeout(busy_timeout);
    began
}

/// One group commit in progress: the transaction begins with its first
/// job, and each job runs as soon as it arrives (while later callers are
/// still being waited for).
struct Group<'a> {
    conn: &'a Connection,
    ctx: &'a Ctx,
    /// `None` until the first job begins the transaction.
    began: Option<rusqlite::Result<()>>,
    /// Each job in its own savepoint (several callers); a lone job runs
    /// without one and a refusal rolls the whole transaction back.
    savepoints: bool,
    /// The lone job was refused: roll back instead of committing.
    rollback: bool,
    dones: Vec<Done>,
}

impl<'a> Group<'a> {
    fn new(conn: &'a Connection, ctx: &'a Ctx, savepoints: bool) -> Self {
        Self {
            conn,
            ctx,
            began: None,
            savepoints,
            rollback: false,
            dones: Vec::new(),
        }
    }

    /// A lone group whose transaction the caller has already begun.
    fn begun(conn: &'a Connection, ctx: &'a Ctx) -> Self {
        Self {
            began: Some(Ok(())),
            ..Self::new(conn, ctx, false)
        }
    }

    fn run(&mut self, job: Job) {
        let conn = self.conn;
        let began = self.began.get_or_insert_with(|| begin(conn));
        if began.is_err() {
            // Run nothing outside a transaction; report the failure.
            let (_, done) = job(None);
            self.dones.push(done);
            return;
        }
        if !self.savepoints {
            let (ok, done) = job(Some((conn, self.ctx)));
            self.rollback |= !ok;
            self.dones.push(done);
            return;
        }
        let savepoint = control(conn, "SAVEPOINT job");
        let (ok, done) = job(Some((conn, self.ctx)));
        if savepoint.is_ok() {
            if !ok {
                let _ = control(conn, "ROLLBACK TO job");
            }
            let _ = control(conn, "RELEASE job");
        }
        self.dones.push(done);
    }

    /// [`run`](Self::run) for a job sent under `ticket`: if it begins the
    /// group's transaction, a busy database is waited for (up to
    /// the busy timeout) only while the ticket stands. A wait it ends is its
    /// own, not the group's: the next job begins afresh.
    fn run_under(&mut self, job: Job, ticket: &Ticket, shared: &Shared) {
        if self.began.is_none() {
            match begin_unless_withdrawn(self.conn, ticket, shared) {
                Some(began) => self.began = Some(began),
                None => {
                    // Withdrawn: the job sees it and writes nothing.
                    let (_, done) = job(None);
                    done(Ok(()));
                    return;
                }
            }
        }
        self.run(job);
    }

    fn len(&self) -> usize {
        self.dones.len()
    }

    /// Commits (or, for a refused lone job, rolls back) and replies to every
    /// caller, only now.
    fn finish(self) {
        self.end().reply();
    }

    /// Commits (or, for a refused lone job, rolls back); the replies are
    /// the caller's to send, which may be after releasing the connection.
    fn end(self) -> Ended {
        let conn = self.conn;
        let commit = match self.began {
            None => Ok(()),
            Some(Err(e)) => Err(StorageError::from(e)),
            Some(Ok(())) if self.rollback => {
                // The lone job was refused: undo it. Its caller gets its own
                // error; nothing was committed.
                if control(conn, "ROLLBACK").is_err() && !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                Ok(())
            }
            Some(Ok(())) => control(conn, "COMMIT").map_err(|e| {
                let err = StorageError::from(e).at_commit();
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                err
            }),
        };
        if let Err(e) = &commit {
            tracing::error!(error = %e, jobs = self.dones.len(), "outbox commit failed");
        }
        Ended {
            commit,
            dones: self.dones,
        }
    }
}

/// A group whose transaction has ended and whose callers are not yet
/// answered.
struct Ended {
    commit: Result<(), StorageError>,
    dones: Vec<Done>,
}

impl Ended {
    fn reply(self) {
        for done in self.dones {
            done(self.commit.clone());
        }
    }
}

/// Takes the next message without waiting, if one is queued.
fn try_next(rx: &mpsc::Receiver<Msg>) -> Option<Msg> {
    rx.try_recv().ok()
}

/// Longest poll for the next job after a group of several callers.
const POLL_AFTER_GROUP: Duration = Duration::from_micros(100);

/// The next message: after a group of several callers, poll briefly first,
/// yielding the CPU between polls. They were all answered at once and most
/// come back within tens of microseconds; a writer that is polling needs no
/// wake-up (a futex wake and a cross-CPU interrupt, ~20–40 µs on the
/// benchmark VM) for each of them, and yielding instead of spinning leaves
/// the core to the callers that are preparing those jobs (on 2 cores a
/// spinning writer halves their CPU: 8 tasks 18.7k ops/s spinning, 21.2k
/// yielding, same interleaved run). A lone caller is never polled for: on
/// a device that enqueues now and then, the writer sleeps.
fn next_message(rx: &mpsc::Receiver<Msg>, poll: bool) -> Option<Msg> {
    if poll {
        let until = Instant::now() + POLL_AFTER_GROUP;
        while Instant::now() < until {
            match rx.try_recv() {
                Ok(m) => return Some(m),
                Err(mpsc::TryRecvError::Disconnected) => return None,
                Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
            }
        }
    }
    rx.recv().ok()
}

/// Counts a job as taken off the queue.
fn taken(shared: &Shared, msg: Msg) -> Msg {
    if matches!(msg, Msg::Job(..)) {
        shared.queued.fetch_sub(1, Ordering::AcqRel);
    }
    msg
}

fn run(shared: &Shared, rx: &mpsc::Receiver<Msg>) {
    let ctx = &shared.ctx;
    loop {
        let last_group = shared.last_group.load(Ordering::Acquire);
        let Some(first) = next_message(rx, last_group > 1) else {
            break;
        };
        let first = taken(shared, first);
        let mut guard = shared.db.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(db) = guard.as_mut() else {
            // Closed (by an earlier close request): nothing runs any more.
            match first {
                Msg::Job(job, _) => job(None).1(Ok(())),
                Msg::Maintain => {}
                Msg::Close(reply) => {
                    let _ = reply.send(());
                }
            }
            shared.board.announce();
            continue;
        };
        let second = try_next(rx).map(|m| taken(shared, m));
        // A lone caller (nothing else queued, and the previous group had one
        // caller too) runs without a savepoint and never waits.
        let lone = second.is_none() && last_group <= 1;
        let started = Instant::now();
        let mut group = Group::new(&db.conn, ctx, !lone);
        // Runs a job, or keeps a close request's reply channel: every close
        // request taken is answered once the connection is closed.
        // A maintenance request needs no job: `committed` below runs it.
        let run_msg = |msg: Msg, group: &mut Group<'_>| match msg {
            Msg::Job(job, ticket) => {
                match ticket {
                    Some(t) => group.run_under(job, &t, shared),
                    None => group.run(job),
                }
                None
            }
            Msg::Maintain => None,
            Msg::Close(reply) => Some(reply),
        };
        let mut close = Vec::new();
        close.extend(run_msg(first, &mut group));
        if let Some(m) = second {
            close.extend(run_msg(m, &mut group));
        }
        if !lone && close.is_empty() {
            // Take everything already queued. If the previous group had
            // several callers, they are probably about to send again (they
            // were all woken by the last commit at once): wait briefly, up
            // to GATHER_WAIT, until as many have joined, so groups stay full
            // instead of alternating between one caller and the rest. Jobs
            // run as they arrive, so the wait overlaps with their work; it
            // polls, yielding the CPU to those callers (see `next_message`).
            let deadline = Instant::now() + GATHER_WAIT;
            while group.len() < MAX_GROUP && close.is_empty() {
                if let Some(m) = try_next(rx) {
                    close.extend(run_msg(taken(shared, m), &mut group));
                    continue;
                }
                if group.len() >= last_group {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                std::thread::yield_now();
            }
        }
        shared
            .last_group
            .store(group.len().max(1), Ordering::Release);
        let ran = group.len();
        #[cfg(test)]
        shared.hold.before_commit();
        let ended = group.end();
        if lone && ran == 1 {
            shared.lone_commit_took(started.elapsed());
        }
        if !close.is_empty() {
            // Closes the connection; later jobs are answered `closed`.
            *guard = None;
        }
        // The connection is released before the replies: a caller answered
        // here that comes straight back alone finds it free and may commit
        // on its own thread, instead of handing off because the writer was
        // still finishing up.
        drop(guard);
        ended.reply();
        shared.board.announce();
        if !close.is_empty() {
            for reply in close {
                let _ = reply.send(());
            }
            continue;
        }
        // After the replies: no caller waits for a WAL fill step. A caller
        // that took the connection meanwhile runs or requests the step
        // itself, so the writer never waits for it here.
        if let Some(db) = shared.try_db().as_deref_mut().and_then(Option::as_mut) {
            db.committed();
        }
    }
}

/// A held commit's signals: `reached` (it is held) and `go`.
#[cfg(test)]
pub(crate) type HeldCommit = (
    tokio::sync::oneshot::Receiver<()>,
    std::sync::mpsc::Sender<()>,
);

#[cfg(test)]
mod hold {
    use std::sync::{mpsc, Mutex, PoisonError};
    use std::time::Duration;

    use tokio::sync::oneshot;

    type Armed = (bool, oneshot::Sender<()>, mpsc::Receiver<()>);

    thread_local! {
        /// The group being run on this thread has a job with a hook.
        static HOOKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Marks the group being run as one with a hooked job.
    pub(super) fn hooked() {
        HOOKED.with(|h| h.set(true));
    }

    /// A commit hold, armed for the writer thread's next group commit; and
    /// who to tell when a ticketed job next finds the database busy.
    #[derive(Debug, Default)]
    pub(super) struct Hold {
        armed: Mutex<Option<Armed>>,
        busy: Mutex<Option<oneshot::Sender<()>>>,
    }

    impl Hold {
        pub(super) fn next_commit(&self, hooked_only: bool) -> super::HeldCommit {
            let (reached_tx, reached) = oneshot::channel();
            let (go, go_rx) = mpsc::channel();
            *self.armed.lock().unwrap_or_else(PoisonError::into_inner) =
                Some((hooked_only, reached_tx, go_rx));
            (reached, go)
        }

        pub(super) fn next_busy(&self) -> oneshot::Receiver<()> {
            let (tx, rx) = oneshot::channel();
            *self.busy.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
            rx
        }

        pub(super) fn found_busy(&self) {
            let told = self
                .busy
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(tx) = told {
                let _ = tx.send(());
            }
        }

        /// Bounded: a test that forgets to let go fails instead of hanging.
        pub(super) fn before_commit(&self) {
            let hooked = HOOKED.with(|h| h.replace(false));
            let armed = {
                let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
                if armed.as_ref().is_some_and(|(only, ..)| *only && !hooked) {
                    return;
                }
                armed.take()
            };
            if let Some((_, reached, go)) = armed {
                let _ = reached.send(());
                let _ = go.recv_timeout(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::OutboxError;

    fn ctx() -> Ctx {
        Ctx {
            clock: crate::clock::SystemClock::shared(),
            max_payload_bytes: 0,
            coalesce: false,
            op_id_ns: 0,
            seq_floor: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// The test writers' busy timeout, unlike the connection default (5 s).
    const BUSY: Duration = Duration::from_secs(60);

    /// A writer over a new database with table `t`, after `setup` (SQL).
    fn writer_with(setup: &str, inline: bool) -> (tempfile::TempDir, Writer) {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("w.db")).unwrap();
        conn.busy_timeout(BUSY).unwrap();
        conn.execute_batch(&format!("{setup} CREATE TABLE t (v INTEGER)"))
            .unwrap();
        (
            dir,
            Writer::spawn(conn, ctx(), None, inline, BUSY, None).unwrap(),
        )
    }

    fn writer() -> (tempfile::TempDir, Writer) {
        writer_with("", true)
    }

    /// Jobs committed together are isolated: a refused job leaves no trace,
    /// its neighbours in the same group commit are kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_job_is_rolled_back_alone() {
        let (_dir, w) = writer();
        let w = std::sync::Arc::new(w);
        let mut tasks = Vec::new();
        for i in 0..64i64 {
            let w = w.clone();
            tasks.push(tokio::spawn(async move {
                w.call(move |conn, _| {
                    conn.execute("INSERT INTO t (v) VALUES (?1)", [i])?;
                    if i % 2 == 1 {
                        return Err(OutboxError::LockLost);
                    }
                    Ok(i)
                })
                .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.unwrap();
            assert_eq!(r.is_ok(), i % 2 == 0);
        }
        let rows: Vec<i64> = w
            .call(|conn, _| {
                let mut stmt = conn.prepare("SELECT v FROM t ORDER BY v")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                Ok::<_, OutboxError>(rows.collect::<rusqlite::Result<_>>()?)
            })
            .await
            .unwrap();
        assert_eq!(rows, (0..64).step_by(2).collect::<Vec<_>>());
        w.close().await;
        let after = w.call(|_, _| Ok::<_, OutboxError>(())).await;
        assert_eq!(after.unwrap_err(), OutboxError::Closed);
    }

    /// A blocking caller's lone job runs on its own thread: refused, it is
    /// rolled back and leaves the connection usable; accepted, it is seen by
    /// the writer thread's next job.
    #[test]
    fn a_blocking_lone_job_commits_on_the_calling_thread() {
        let (_dir, w) = writer();
        let caller = std::thread::current().id();
        let refused = w.call_blocking(|conn, _| {
            conn.execute("INSERT INTO t (v) VALUES (1)", [])?;
            Err::<(), _>(OutboxError::LockLost)
        });
        assert_eq!(refused.unwrap_err(), OutboxError::LockLost);
        let ran_on = w
            .call_blocking(|conn, _| {
                conn.execute("INSERT INTO t (v) VALUES (2)", [])?;
                Ok::<_, OutboxError>(std::thread::current().id())
            })
            .unwrap();
        assert_eq!(ran_on, caller, "a lone blocking job runs on its caller");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let rows: Vec<i64> = rt
            .block_on(w.call(|conn, _| {
                let mut stmt = conn.prepare("SELECT v FROM t ORDER BY v")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                Ok::<_, OutboxError>(rows.collect::<rusqlite::Result<_>>()?)
            }))
            .unwrap();
        assert_eq!(rows, [2]);
        rt.block_on(w.close());
        let after = w.call_blocking(|_, _| Ok::<_, OutboxError>(()));
        assert_eq!(after.unwrap_err(), OutboxError::Closed);
    }

    /// Counts its runs: an unheard hook.
    fn counted() -> (Arc<AtomicUsize>, Option<Unheard>) {
        let runs = Arc::new(AtomicUsize::new(0));
        let hook_runs = runs.clone();
        let hook: Unheard = Box::new(move || {
            hook_runs.fetch_add(1, Ordering::SeqCst);
        });
        (runs, Some(hook))
    }

    /// A held job's signals: it has begun; it may go on.
    struct Held {
        begun: mpsc::Receiver<()>,
        go: mpsc::Sender<()>,
    }

    /// A job that says when it has begun, then waits for `go` (or fails if
    /// `refuse`), inserting `v`.
    fn held_job(
        v: i64,
        refuse: bool,
    ) -> (
        Held,
        impl FnOnce(&Connection, &Ctx) -> Result<i64, OutboxError> + Send + 'static,
    ) {
        let (begun_tx, begun) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let f = move |conn: &Connection, _: &Ctx| {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [v])?;
            let _ = begun_tx.send(());
            let _ = go_rx.recv_timeout(Duration::from_secs(30));
            if refuse {
                return Err(OutboxError::LockLost);
            }
            Ok(v)
        };
        (Held { begun, go }, f)
    }

    /// Calls with a held job inserting `v`, leaves once it has begun, then
    /// lets it go on.
    async fn abandon_once_begun(w: &Writer, v: i64, refuse: bool, hook: Option<Unheard>) {
        let (Held { begun, go }, f) = held_job(v, refuse);
        let mut call = Box::pin(w.call_unheard(f, hook, None));
        assert!(futures::poll!(call.as_mut()).is_pending());
        tokio::task::spawn_blocking(move || begun.recv().unwrap())
            .await
            .unwrap();
        drop(call);
        go.send(()).unwrap();
    }

    /// The caller stops waiting once its job has begun: the job commits
    /// and, its result unheard, the hook runs once, on the writer thread.
    /// Refused instead, nothing commits and the hook does not run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_committed_after_its_caller_left_runs_its_unheard_hook() {
        let (_dir, w) = writer_with("", false);
        for (v, refuse) in [(1, false), (2, true)] {
            let (runs, hook) = counted();
            abandon_once_begun(&w, v, refuse, hook).await;
            // The next job queues behind the held one: once it is answered,
            // the held one has committed (or rolled back) and been replied to.
            let seen = values(&w).await;
            assert_eq!(seen.contains(&v), !refuse, "job {v}: {seen:?}");
            assert_eq!(runs.load(Ordering::SeqCst), usize::from(!refuse), "job {v}");
        }
        // A hook that panics on the writer thread leaves the writer working.
        abandon_once_begun(&w, 4, false, Some(Box::new(|| panic!("hook")))).await;
        assert_eq!(values(&w).await, [1, 4], "the writer still answers");
        // Heard: the hook never runs.
        let (runs, hook) = counted();
        let r: Result<i64, OutboxError> = w
            .call_unheard(
                |conn, _| Ok(conn.execute("INSERT INTO t (v) VALUES (3)", [])? as i64),
                hook,
                None,
            )
            .await;
        assert_eq!(r.unwrap(), 1);
        assert_eq!(values(&w).await, [1, 3, 4]);
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        w.close().await;
    }

    /// The result arrives, but the caller's future is dropped before it is
    /// polled again: the hook runs there, once. A caller gone before its
    /// job began gets no commit and no hook.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_dropped_unread_runs_the_hook_and_a_job_never_begun_neither() {
        let (_dir, w) = writer_with("", false);
        let (runs, hook) = counted();
        let mut call = Box::pin(w.call_unheard(
            |conn, _| Ok::<_, OutboxError>(conn.execute("INSERT INTO t (v) VALUES (1)", [])?),
            hook,
            None,
        ));
        // One poll sends the job; the next job's answer means it is done.
        assert!(futures::poll!(call.as_mut()).is_pending());
        assert_eq!(values(&w).await, [1]);
        assert_eq!(runs.load(Ordering::SeqCst), 0, "not until dropped");
        drop(call);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "run by the dropped caller");

        // The writer is held by a first job while the second caller leaves.
        let (Held { begun, go }, f) = held_job(2, false);
        let mut first = Box::pin(w.call_unheard(f, None, None));
        assert!(futures::poll!(first.as_mut()).is_pending());
        tokio::task::spawn_blocking(move || begun.recv().unwrap())
            .await
            .unwrap();
        let (runs, hook) = counted();
        let mut second = Box::pin(w.call_unheard(
            |conn, _| Ok::<_, OutboxError>(conn.execute("INSERT INTO t (v) VALUES (3)", [])?),
            hook,
            None,
        ));
        assert!(futures::poll!(second.as_mut()).is_pending());
        drop(second);
        go.send(()).unwrap();
        assert_eq!(first.await.unwrap(), 2);
        assert_eq!(values(&w).await, [1, 2], "the abandoned job never ran");
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        w.close().await;
    }

    /// A writer whose commits are cheap (no fsync), so that the lone-commit
    /// average stays under `INLINE_MAX_US` on any disk.
    fn fast_writer(inline: bool) -> (tempfile::TempDir, Writer) {
        writer_with("PRAGMA synchronous = OFF;", inline)
    }

    /// Inserts `v` through `call_inline`; says whether the job ran on the
    /// calling thread (it runs in the call's first poll if at all).
    async fn inline_insert(w: &Writer, v: i64) -> Result<bool, OutboxError> {
        let caller = std::thread::current().id();
        w.call_inline(move |conn, _| {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [v])?;
            Ok(std::thread::current().id() == caller)
        })
        .await
    }

    async fn values(w: &Writer) -> Vec<i64> {
        w.call(|conn, _| {
            let mut stmt = conn.prepare("SELECT v FROM t ORDER BY v")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok::<_, OutboxError>(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
        .unwrap()
    }

    /// On a multi-threaded runtime a lone async job commits on its caller's
    /// worker; a refused one is rolled back there. While lone commits are
    /// slow on average the job goes to the writer thread instead, whose own
    /// lone commits bring the average back down.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_async_job_commits_on_its_worker_while_commits_are_fast() {
        let (_dir, w) = fast_writer(true);
        assert!(inline_insert(&w, 1).await.unwrap(), "ran on the caller");
        let caller = std::thread::current().id();
        let refused = w
            .call_inline(move |conn, _| {
                conn.execute("INSERT INTO t (v) VALUES (2)", [])?;
                assert_eq!(std::thread::current().id(), caller);
                Err::<(), _>(OutboxError::LockLost)
            })
            .await;
        assert_eq!(refused.unwrap_err(), OutboxError::LockLost);
        assert_eq!(values(&w).await, [1]);

        w.shared
            .lone_commit_us
            .store(5 * INLINE_MAX_US, Ordering::Relaxed);
        assert!(!inline_insert(&w, 3).await.unwrap(), "slow: handed off");
        let mut v = 4;
        while !inline_insert(&w, v).await.unwrap() {
            v += 1;
            assert!(
                v < 64,
                "the average never came back down: {}",
                w.shared.lone_commit_us.load(Ordering::Relaxed)
            );
        }
        assert!(v > 5, "came back after {} fast commits", v - 3);
        assert_eq!(
            values(&w).await,
            (1..=v).filter(|&x| x != 2).collect::<Vec<_>>()
        );
        w.close().await;
        assert_eq!(inline_insert(&w, 0).await.unwrap_err(), OutboxError::Closed);
    }

    /// A job that panics on its caller's thread leaves the connection
    /// locked (poisoned) in the middle of its transaction: the next group
    /// rolls that transaction back and carries on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_panics_on_its_caller_wedges_nothing() {
        let (_dir, w) = fast_writer(true);
        let w = Arc::new(w);
        let w2 = w.clone();
        let panicked = tokio::spawn(async move {
            w2.call_inline(|conn, _| -> Result<(), OutboxError> {
                conn.execute("INSERT INTO t (v) VALUES (1)", [])?;
                panic!("a job that panics mid-transaction")
            })
            .await
        })
        .await;
        assert!(panicked.unwrap_err().is_panic(), "ran inline and panicked");
        assert!(w.shared.db.is_poisoned());
        assert!(inline_insert(&w, 2).await.unwrap());
        let on_writer = w
            .call(|_, _| {
                let name = std::thread::current().name().map(str::to_owned);
                Ok::<_, OutboxError>(name.as_deref() == Some("guardian-outbox-writer"))
            })
            .await
            .unwrap();
        assert!(on_writer, "the writer thread serves too");
        assert_eq!(values(&w).await, [2]);
    }

    /// While another connection holds the write lock, a lone async job is
    /// handed off at once instead of waiting out the busy timeout on its
    /// worker; the connection keeps its busy timeout.
    #[test]
    fn a_busy_database_is_not_waited_for_on_a_worker() {
        let (dir, w) = writer_with("PRAGMA synchronous = OFF;", true);
        let workers = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let other = Connection::open(dir.path().join("w.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        // The other connection lets go once the job is answered, or after
        // 5 s if it is not: a job still waiting for the lock then gets it,
        // runs here, and fails the assertion below.
        let (answered, heard) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _ = heard.recv_timeout(Duration::from_secs(5));
            other.execute_batch("COMMIT").unwrap();
        });
        let _entered = workers.enter();
        let handed = w.try_inline(|conn, _| {
            conn.execute("INSERT INTO t (v) VALUES (1)", [])?;
            Ok::<_, OutboxError>(())
        });
        let _ = answered.send(());
        holder.join().unwrap();
        assert!(handed.is_err(), "handed off, not waited for");
        let timeout: i64 = workers
            .block_on(w.call(|conn, _| {
                Ok::<_, OutboxError>(conn.pragma_query_value(None, "busy_timeout", |r| r.get(0))?)
            }))
            .unwrap();
        assert_eq!(u128::try_from(timeout).unwrap(), BUSY.as_millis());
    }

    /// Where blocking the thread would stall every task (a current-thread
    /// runtime, or a multi-threaded one with a single worker, as an FFI
    /// host may configure) or the outbox was opened without it, the job is
    /// handed off.
    #[test]
    fn a_lone_async_job_is_handed_off_where_it_may_not_block() {
        let single = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (_dir, w) = fast_writer(true);
        assert!(!single.block_on(inline_insert(&w, 1)).unwrap());
        single.block_on(w.close());

        let one_worker = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let (_dir, w) = fast_writer(true);
        let w = Arc::new(w);
        let task = w.clone();
        let spawned = one_worker.spawn(async move { inline_insert(&task, 1).await });
        let on_the_worker = one_worker.block_on(spawned).unwrap();
        assert!(!on_the_worker.unwrap());
        one_worker.block_on(w.close());

        let workers = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let (_dir, w) = fast_writer(false);
        assert!(!workers.block_on(inline_insert(&w, 1)).unwrap());
        assert_eq!(workers.block_on(values(&w)), [1]);
        workers.block_on(w.close());
    }

    /// A job under a ticket that waits for another connection's write lock
    /// stops waiting once the ticket is withdrawn, and writes nothing; a
    /// job sent behind it begins afresh and commits once the lock is free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_withdrawn_ticket_ends_its_jobs_wait_for_a_busy_database() {
        let (dir, w) = writer();
        let path = dir.path().join("w.db");
        let (locked_tx, locked) = std::sync::mpsc::channel();
        let (free, freed) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let conn = Connection::open(path).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            locked_tx.send(()).unwrap();
            let _ = freed.recv();
            conn.execute_batch("ROLLBACK").unwrap();
        });
        locked.recv().unwrap();
        let insert = |v: i64| {
            move |conn: &Connection, _: &Ctx| {
                Ok::<_, OutboxError>(conn.execute("INSERT INTO t (v) VALUES (?1)", [v])?)
            }
        };
        let ticket = Ticket::default();
        let busy = w.when_busy();
        let mut first = Box::pin(w.call_unheard(insert(1), None, Some(&ticket)));
        assert!(futures::poll!(first.as_mut()).is_pending());
        let behind = w.clone();
        let second = tokio::spawn(async move { behind.call(insert(2)).await });
        // Withdrawn while it waits, not before it began to.
        tokio::time::timeout(Duration::from_secs(30), busy)
            .await
            .expect("the job never found the database busy")
            .unwrap();
        assert!(ticket.withdraw(), "nothing under the ticket ran");
        // Well within the busy timeout (60 s), with the lock still held.
        let given_up = tokio::time::timeout(Duration::from_secs(30), first)
            .await
            .expect("the withdrawn job still waited for the lock");
        assert_eq!(given_up.unwrap_err(), OutboxError::Closed);
        // A later call under it is refused at once, not queued behind the
        // second job's wait.
        let refused = tokio::time::timeout(
            Duration::from_secs(30),
            w.call_unheard(insert(3), None, Some(&ticket)),
        )
        .await
        .expect("a call under a withdrawn ticket was queued");
        assert_eq!(refused.unwrap_err(), OutboxError::Closed);
        free.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(second.await.unwrap().unwrap(), 1);
        assert_eq!(values(&w).await, [2]);
        w.close().await;
    }

    /// A group of one runs without a savepoint: a refused lone job is undone
    /// by rolling the whole transaction back, and the next job still works.
    #[tokio::test]
    async fn a_refused_lone_job_is_rolled_back() {
        let (_dir, w) = writer();
        let refused = w
            .call(|conn, _| {
                conn.execute("INSERT INTO t (v) VALUES (1)", [])?;
                Err::<(), _>(OutboxError::LockLost)
            })
            .await;
        assert_eq!(refused.unwrap_err(), OutboxError::LockLost);
        w.call(|conn, _| {
            conn.execute("INSERT INTO t (v) VALUES (2)", [])?;
            Ok::<_, OutboxError>(())
        })
        .await
        .unwrap();
        let rows: Vec<i64> = w
            .call(|conn, _| {
                let mut stmt = conn.prepare("SELECT v FROM t ORDER BY v")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                Ok::<_, OutboxError>(rows.collect::<rusqlite::Result<_>>()?)
            })
            .await
            .unwrap();
        assert_eq!(rows, [2]);
        w.close().await;
    }
}
