//! The safe core behind the C ABI (and the Python binding): one engine, its
//! own tokio runtime, its runner task, its event subscription and its
//! tokens. Every method may be called from any thread that is not one of the
//! engine's runtime worker threads (the token callback's blocking thread is
//! fine: it may block).

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use futures::future::BoxFuture;
use guardian_sync::engine::{SyncEngine, SyncEvent};
use guardian_sync::op::OpId;
use guardian_sync::outbox::{Enqueued, EnqueuedTransaction, OutboxOptions};
use guardian_sync::transport::{check_token, HttpTransportConfig, TokenError, TokenProvider};
use serde_json::{json, Value};
use tokio::runtime::Runtime;
use tokio::sync::{broadcast, oneshot, watch};

use crate::config::{Config, FilterJson, OpJson};
use crate::error::{Code, FfiError};

/// How long `close` waits for the runner to release the lock.
const CLOSE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Most worker threads an engine's runtime may have: far more than its work
/// needs; a number near `usize::MAX` overflowed the runtime's builder.
const MAX_WORKER_THREADS: usize = 256;

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every guarded value here is replaced whole; a panic cannot leave one
    // half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Asks the app for a token; `refresh` is true after the server refused the
/// last one. Runs on a blocking thread of the engine's runtime.
pub type TokenCallback = Arc<dyn Fn(bool) -> Result<String, String> + Send + Sync>;

/// Receives each event as JSON, on the engine's event thread.
pub type EventCallback = Box<dyn Fn(&str) + Send>;

/// Tokens from the app: a fixed one it can replace, or a callback.
struct AppTokens {
    token: Mutex<Option<String>>,
    /// The callback and the count of its calls under way.
    callback: Mutex<Option<(TokenCallback, Arc<Calls>)>>,
}

thread_local! {
    /// The engine (its `AppTokens`' address) whose token callback this
    /// thread is running; 0 when none.
    static IN_TOKEN_CALLBACK: Cell<usize> = const { Cell::new(0) };
}

/// Marks this thread as running `owner`'s token callback until dropped (a
/// panicking callback included: the blocking thread is reused).
struct InTokenCallback;

impl InTokenCallback {
    fn enter(owner: usize) -> Self {
        IN_TOKEN_CALLBACK.with(|c| c.set(owner));
        Self
    }
}

impl Drop for InTokenCallback {
    fn drop(&mut self) {
        IN_TOKEN_CALLBACK.with(|c| c.set(0));
    }
}

/// Calls of one registered token callback under way. The app may free the
/// callback's data once the callback is replaced or the engine closed, so
/// both wait until none is running.
#[derive(Debug, Default)]
struct Calls {
    running: Mutex<usize>,
    idle: Condvar,
}

impl Calls {
    fn wait_idle(&self) {
        let mut running = locked(&self.running);
        while *running > 0 {
            running = self
                .idle
                .wait(running)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// One call under way; counted from before it is handed to a thread until
/// it returns (or is dropped unrun).
struct Call(Arc<Calls>);

impl Drop for Call {
    fn drop(&mut self) {
        let mut running = locked(&self.0.running);
        *running = running.saturating_sub(1);
        if *running == 0 {
            self.0.idle.notify_all();
        }
    }
}

impl std::fmt::Debug for AppTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.write_str("AppTokens(***)")
    }
}

impl AppTokens {
    /// This engine's mark in [`IN_TOKEN_CALLBACK`].
    fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// True on a thread while it runs this engine's token callback.
    fn in_callback(&self) -> bool {
        IN_TOKEN_CALLBACK.with(Cell::get) == self.id()
    }

    async fn get(&self, refresh: bool) -> Result<String, TokenError> {
        // Counted under the slot's lock: a replacement that swaps the slot
        // afterwards sees this call and waits for it.
        let callback = locked(&self.callback).as_ref().map(|(cb, calls)| {
            *locked(&calls.running) += 1;
            (cb.clone(), Call(calls.clone()))
        });
        if let Some((cb, call)) = callback {
            let owner = self.id();
            // The app's callback may block (a refresh over the network).
            return tokio::task::spawn_blocking(move || {
                let _call = call;
                let _inside = InTokenCallback::enter(owner);
                cb(refresh)
            })
            .await
            .map_err(|_| TokenError("the token callback panicked".into()))?
            .map_err(TokenError);
        }
        locked(&self.token)
            .clone()
            .ok_or_else(|| TokenError("no token set".into()))
    }
}

impl TokenProvider for AppTokens {
    fn token(&self) -> BoxFuture<'_, Result<String, TokenError>> {
        Box::pin(self.get(false))
    }

    fn refresh(&self) -> BoxFuture<'_, Result<String, TokenError>> {
        Box::pin(self.get(true))
    }
}

/// The runner task and the way to stop it.
struct Runner {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// The thread that hands events to the app's callback.
struct CallbackThread {
    stop: watch::Sender<bool>,
    thread: JoinHandle<()>,
}

/// An open engine. Dropping it is `close`.
pub struct Engine {
    /// `None` only while dropping.
    rt: Option<Runtime>,
    engine: SyncEngine,
    tokens: Arc<AppTokens>,
    runner: Mutex<Option<Runner>>,
    /// Why the last runner stopped by itself (lock lost, storage failure).
    runner_error: Arc<Mutex<Option<String>>>,
    /// Subscribed at open, so `next_event` sees every event since. An
    /// async lock: a reader waiting for its lock counts against its own
    /// timeout, not another reader's.
    events: tokio::sync::Mutex<broadcast::Receiver<SyncEvent>>,
    callback: Mutex<Option<CallbackThread>>,
    /// The thread that runs (or ran, until it has ended) the event callback;
    /// never locked across a wait.
    event_thread: Mutex<Option<ThreadId>>,
    /// Serializes the app's calls that replace the event callback.
    setting_callback: Mutex<()>,
    /// Set first thing by [`Engine::shutdown`]: nothing may start a runner
    /// or register a callback any more, and a waiting `next_event` returns.
    closing: watch::Sender<bool>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("owner_id", &self.engine.owner_id())
            .finish_non_exhaustive()
    }
}

/// The JSON of an event, or of the gap left when this subscriber fell behind.
fn event_json(r: Result<SyncEvent, broadcast::error::RecvError>) -> Option<String> {
    let value = match r {
        Ok(e) => serde_json::to_value(&e).ok()?,
        Err(broadcast::error::RecvError::Lagged(missed)) => {
            json!({"event": "lagged", "missed": missed})
        }
        // The sender lives in the engine, which outlives every receiver.
        Err(broadcast::error::RecvError::Closed) => return None,
    };
    Some(value.to_string())
}

fn storage(e: impl std::fmt::Display) -> FfiError {
    FfiError::new(Code::Storage, e.to_string())
}

fn parse_op_id(text: &str) -> Result<OpId, FfiError> {
    OpId::parse_str(text.trim())
        .map_err(|e| FfiError::new(Code::InvalidArgument, format!("invalid op id: {e}")))
}

impl Engine {
    /// Opens the outbox and builds the engine on a runtime of its own. The
    /// runner is not started.
    pub fn open(config: &Config) -> Result<Self, FfiError> {
        if let Some(token) = &config.token {
            check_token(token).map_err(|e| {
                FfiError::new(Code::InvalidArgument, format!("invalid configuration: {e}"))
            })?;
        }
        let workers = config.worker_threads.unwrap_or(2).max(1);
        if workers > MAX_WORKER_THREADS {
            return Err(FfiError::new(
                Code::InvalidArgument,
                format!("invalid configuration: worker_threads is at most {MAX_WORKER_THREADS}"),
            ));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("guardian-sync")
            .enable_all()
            .build()
            .map_err(|e| FfiError::new(Code::Open, format!("cannot start the runtime: {e}")))?;
        let tokens = Arc::new(AppTokens {
            token: Mutex::new(config.token.clone()),
            callback: Mutex::new(None),
        });
        let mut http = HttpTransportConfig::new(config.server_url.clone());
        if let Some(v) = config.connect_timeout_ms {
            http.connect_timeout = Duration::from_millis(v);
        }
        if let Some(v) = config.request_timeout_ms {
            http.request_timeout = Duration::from_millis(v);
        }
        let mut builder = SyncEngine::builder()
            .outbox_path(&config.outbox_path)
            .outbox_options(OutboxOptions::default().synchronous(config.synchronous()?))
            .http(http)
            .token_provider(tokens.clone())
            .retry(config.retry_policy()?)
            .breaker(config.breaker_config())
            .lock(config.lock_config()?)
            .concurrency(config.concurrency.unwrap_or(8));
        match config.batch_config() {
            None => {}
            Some(b) if b.max_ops == 0 => builder = builder.no_batching(),
            Some(b) => builder = builder.batching(b),
        }
        if let Some(id) = &config.owner_id {
            builder = builder.owner_id(id.clone());
        }
        if let Some(ms) = config.stall_after_ms {
            builder = builder.stall_after(Duration::from_millis(ms));
        }
        let engine = rt.block_on(builder.build())?;
        let events = tokio::sync::Mutex::new(engine.events());
        Ok(Self {
            rt: Some(rt),
            engine,
            tokens,
            runner: Mutex::new(None),
            runner_error: Arc::new(Mutex::new(None)),
            events,
            callback: Mutex::new(None),
            event_thread: Mutex::new(None),
            setting_callback: Mutex::new(()),
            closing: watch::Sender::new(false),
        })
    }

    /// Refuses what would outlive a close under way.
    fn not_closing(&self) -> Result<(), FfiError> {
        if *self.closing.borrow() {
            return Err(FfiError::new(Code::Closed, "the engine is closing"));
        }
        Ok(())
    }

    fn rt(&self) -> Result<&Runtime, FfiError> {
        self.rt
            .as_ref()
            .ok_or_else(|| FfiError::new(Code::Closed, "the engine is closed"))
    }

    /// Durably records an op (returns once it is committed); returns the
    /// id of the op that carries the change.
    pub fn enqueue(&self, op_json: &str) -> Result<Enqueued, FfiError> {
        let op = OpJson::parse(op_json)?.into_new_op();
        Ok(self.engine.enqueue_blocking(op)?)
    }

    /// Durably records a JSON array of ops as one atomic transaction
    /// (returns once it is committed).
    pub fn transaction(&self, ops_json: &str) -> Result<EnqueuedTransaction, FfiError> {
        let ops = OpJson::parse_all(ops_json)?
            .into_iter()
            .map(OpJson::into_new_op)
            .collect();
        Ok(self.engine.transaction_blocking(ops)?)
    }

    /// Starts the runner on the engine's runtime.
    pub fn start(&self) -> Result<(), FfiError> {
        let rt = self.rt()?;
        let mut runner = locked(&self.runner);
        // Checked under the runner's lock, which a close takes after
        // setting the flag: no runner starts behind its back.
        self.not_closing()?;
        if runner.as_ref().is_some_and(|r| !r.task.is_finished()) {
            return Err(FfiError::new(
                Code::AlreadyRunning,
                "the runner is already running",
            ));
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let engine = self.engine.clone();
        let error = self.runner_error.clone();
        *locked(&error) = None;
        let task = rt.spawn(async move {
            let result = engine
                .run(async {
                    // A dropped sender (engine closing) also stops the run.
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = result {
                *locked(&error) = Some(e.to_string());
            }
        });
        *runner = Some(Runner { stop, task });
        Ok(())
    }

    /// Stops the runner: requests in flight are abandoned (re-sent with the
    /// same key later) and the lock is released. Waits up to `timeout`; a
    /// runner still busy then is aborted. Stopping a stopped runner is fine.
    pub fn stop(&self, timeout: Duration) -> Result<(), FfiError> {
        let rt = self.rt()?;
        let Some(runner) = locked(&self.runner).take() else {
            return Ok(());
        };
        let _ = runner.stop.send(());
        let mut task = runner.task;
        let finished = rt.block_on(async { tokio::time::timeout(timeout, &mut task).await });
        if finished.is_err() {
            task.abort();
            return Err(FfiError::new(
                Code::StopTimeout,
                "the runner did not stop in time and was aborted",
            ));
        }
        Ok(())
    }

    /// True while a runner task is alive.
    pub fn running(&self) -> bool {
        locked(&self.runner)
            .as_ref()
            .is_some_and(|r| !r.task.is_finished())
    }

    /// The next event as JSON, waiting up to `timeout`; `None` on timeout.
    /// A close, even from another thread, ends the wait with `CLOSED`.
    pub fn next_event(&self, timeout: Duration) -> Result<Option<String>, FfiError> {
        let rt = self.rt()?;
        let mut closing = self.closing.subscribe();
        let got = rt.block_on(async {
            tokio::select! {
                got = tokio::time::timeout(timeout, async { self.events.lock().await.recv().await }) => Some(got),
                _ = closing.wait_for(|c| *c) => None,
            }
        });
        match got {
            Some(got) => Ok(got.ok().and_then(event_json)),
            None => Err(FfiError::new(Code::Closed, "the engine was closed")),
        }
    }

    /// Hands every event from now on to `callback`, on a thread of its own,
    /// replacing any earlier callback; `None` removes it.
    pub fn set_event_callback(&self, callback: Option<EventCallback>) -> Result<(), FfiError> {
        let rt = self.rt()?;
        if self.on_event_thread() || self.in_token_callback() {
            return Err(FfiError::new(
                Code::WrongThread,
                "the event callback cannot be changed from inside a callback",
            ));
        }
        let _one_at_a_time = locked(&self.setting_callback);
        self.not_closing()?;
        // No lock is held while the old thread finishes its callback: that
        // callback may call into the engine (and is refused here at once).
        let old = locked(&self.callback).take();
        if let Some(old) = old {
            let _ = old.stop.send(true);
            let _ = old.thread.join();
        }
        *locked(&self.event_thread) = None;
        let Some(callback) = callback else {
            return Ok(());
        };
        let (stop, mut stopped) = watch::channel(false);
        let mut rx = self.engine.events();
        let handle = rt.handle().clone();
        // The thread waits until it is known as the event thread, so that
        // its first callback is already refused the setter and close.
        let (known_tx, known) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("guardian-sync-events".into())
            .spawn(move || {
                if known.recv().is_err() {
                    return;
                }
                loop {
                    // The callback runs outside the runtime, so it may call
                    // back into the engine (anything but this setter and close).
                    let next = handle.block_on(async {
                        tokio::select! {
                            _ = stopped.changed() => None,
                            r = rx.recv() => Some(r),
                        }
                    });
                    let Some(r) = next else { break };
                    let Some(json) = event_json(r) else { break };
                    callback(&json);
                }
            })
            .map_err(|e| {
                FfiError::new(Code::Open, format!("cannot start the event thread: {e}"))
            })?;
        *locked(&self.event_thread) = Some(thread.thread().id());
        *locked(&self.callback) = Some(CallbackThread { stop, thread });
        let _ = known_tx.send(());
        Ok(())
    }

    /// Queue depth, runner state and breaker state as JSON.
    pub fn status(&self) -> Result<String, FfiError> {
        let rt = self.rt()?;
        let stats = rt.block_on(self.engine.outbox().stats())?;
        let mut v = serde_json::to_value(&stats).map_err(storage)?;
        if let Value::Object(m) = &mut v {
            m.insert("running".into(), self.running().into());
            m.insert("breaker".into(), self.engine.breaker_state().into());
            m.insert("owner_id".into(), self.engine.owner_id().into());
            m.insert(
                "runner_error".into(),
                locked(&self.runner_error).clone().into(),
            );
        }
        Ok(v.to_string())
    }

    /// The ops matching a filter (JSON; empty for all), as a JSON array.
    pub fn ops(&self, filter_json: &str) -> Result<String, FfiError> {
        let rt = self.rt()?;
        let filter = FilterJson::parse(filter_json)?.into_filter();
        let ops = rt.block_on(self.engine.outbox().list(filter))?;
        serde_json::to_string(&ops).map_err(storage)
    }

    /// Puts a failed op back in the queue, due now.
    pub fn retry(&self, op_id: &str) -> Result<(), FfiError> {
        let id = parse_op_id(op_id)?;
        self.rt()?.block_on(self.engine.outbox().retry_failed(id))?;
        self.engine.resume();
        Ok(())
    }

    /// Puts every failed op back in the queue; returns how many.
    pub fn retry_all(&self) -> Result<u64, FfiError> {
        let n = self
            .rt()?
            .block_on(self.engine.outbox().retry_all_failed())?;
        self.engine.resume();
        Ok(n)
    }

    /// Removes a failed op for good.
    pub fn discard(&self, op_id: &str) -> Result<(), FfiError> {
        let id = parse_op_id(op_id)?;
        self.rt()?.block_on(self.engine.outbox().discard(id))?;
        Ok(())
    }

    /// Removes an op that was never attempted.
    pub fn cancel(&self, op_id: &str) -> Result<(), FfiError> {
        let id = parse_op_id(op_id)?;
        self.rt()?.block_on(self.engine.outbox().cancel(id))?;
        Ok(())
    }

    /// Replaces the bearer token and resumes a runner paused by
    /// `auth_required`; a token no request could carry is refused.
    pub fn set_token(&self, token: &str) -> Result<(), FfiError> {
        check_token(token).map_err(|e| FfiError::new(Code::InvalidArgument, e.to_string()))?;
        *locked(&self.tokens.token) = Some(token.to_owned());
        self.engine.resume();
        Ok(())
    }

    /// Takes tokens from `callback` from now on (`None`: back to the set
    /// token). Returns once no call of the callback it replaces is running,
    /// so the app may then free what that callback uses.
    pub fn set_token_callback(&self, callback: Option<TokenCallback>) -> Result<(), FfiError> {
        if self.in_token_callback() {
            return Err(FfiError::new(
                Code::WrongThread,
                "the token callback cannot be changed from inside the callback",
            ));
        }
        let new = callback.map(|cb| (cb, Arc::new(Calls::default())));
        let old = {
            let mut slot = locked(&self.tokens.callback);
            self.not_closing()?;
            std::mem::replace(&mut *slot, new)
        };
        if let Some((_, calls)) = old {
            calls.wait_idle();
        }
        self.engine.resume();
        Ok(())
    }

    /// True on the thread that runs the event callback.
    pub fn on_event_thread(&self) -> bool {
        *locked(&self.event_thread) == Some(std::thread::current().id())
    }

    /// True on a thread while it runs this engine's token callback: closing
    /// the engine or replacing the callback there would wait for itself.
    pub fn in_token_callback(&self) -> bool {
        self.tokens.in_callback()
    }
}

impl Engine {
    /// Everything `close` does but freeing the engine, through a shared
    /// reference (callbacks may still be calling in until it returns):
    /// stops the runner, the event thread and the token callback (waiting
    /// for a running call of either), and closes the outbox. Nothing may
    /// start or register afterwards. Idempotent.
    pub fn shutdown(&self) {
        self.closing.send_replace(true);
        let _ = self.stop(CLOSE_STOP_TIMEOUT);
        let callback = {
            let _no_setter = locked(&self.setting_callback);
            locked(&self.callback).take()
        };
        if let Some(c) = callback {
            let _ = c.stop.send(true);
            if !self.on_event_thread() {
                let _ = c.thread.join();
            }
        }
        // The app may free the token callback's data once close returns.
        let tokens = locked(&self.tokens.callback).take();
        if let Some((_, calls)) = tokens {
            if !self.tokens.in_callback() {
                calls.wait_idle();
            }
        }
        if let Some(rt) = &self.rt {
            rt.block_on(self.engine.outbox().close());
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}
