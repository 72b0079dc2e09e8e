//! Per-call sandbox limits and the bookkeeping that enforces them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Limits for one guest call, set per tenant by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestLimits {
    /// Linear memory of the guest (capped by `RuntimeConfig::max_memory_bytes`).
    pub memory_bytes: usize,
    /// Time spent running guest code (not waiting for the engine) per call.
    pub cpu_time: Duration,
    /// The whole call, from instantiation to response, waiting included.
    pub wall_clock: Duration,
    /// Sessions the call may hold at once.
    pub max_sessions: u32,
    /// Host handles (models and sessions) the call may hold at once.
    pub max_handles: u32,
    /// Largest string or list a guest may pass into one host call.
    pub max_host_data_bytes: usize,
    /// Text the call may stream to its caller in all.
    pub max_output_bytes: usize,
    /// Instances this tenant may run at once.
    pub max_instances: u32,
}

impl Default for GuestLimits {
    fn default() -> Self {
        GuestLimits {
            memory_bytes: 256 << 20,
            cpu_time: Duration::from_secs(5),
            wall_clock: Duration::from_secs(300),
            max_sessions: 64,
            max_handles: 1024,
            max_host_data_bytes: 16 << 20,
            max_output_bytes: 64 << 20,
            max_instances: 16,
        }
    }
}

/// Which limit ended a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    Memory,
    CpuTime,
    WallClock,
    Stack,
    Sessions,
    Handles,
    HostData,
    Output,
    Instances,
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitKind::Memory => "memory",
            LimitKind::CpuTime => "CPU time",
            LimitKind::WallClock => "wall-clock",
            LimitKind::Stack => "stack",
            LimitKind::Sessions => "sessions",
            LimitKind::Handles => "host handles",
            LimitKind::HostData => "host-call data size",
            LimitKind::Output => "output size",
            LimitKind::Instances => "instances",
        })
    }
}

/// A limit hit recorded in the store, so that the trap it causes is reported as that limit.
#[derive(Debug, Clone)]
pub struct LimitHit {
    pub kind: LimitKind,
    pub detail: String,
}

/// The trap raised when a limit is hit inside a host call or a resource limiter.
#[derive(Debug)]
pub struct LimitTrap(pub LimitHit);

impl std::fmt::Display for LimitTrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} limit reached: {}", self.0.kind, self.0.detail)
    }
}

impl std::error::Error for LimitTrap {}

/// Guest CPU time: wall time while the call's future is being polled (the guest's code and the
/// host calls it makes on the executor), plus the time of host work run for it on the host-work
/// threads ([`CpuMeter::charge`]). Time the call spends waiting (for the engine, a timer such as
/// a WASI `sleep`, a yield to other tasks, a host-work thread) is not counted.
#[derive(Debug, Clone)]
pub struct CpuMeter(Arc<Mutex<CpuState>>);

#[derive(Debug)]
struct CpuState {
    used: Duration,
    running_since: Option<Instant>,
}

impl CpuMeter {
    pub fn new() -> Self {
        CpuMeter(Arc::new(Mutex::new(CpuState {
            used: Duration::ZERO,
            running_since: None,
        })))
    }

    /// The guest starts (or resumes) running.
    pub fn resume(&self) {
        let mut s = self.0.lock().expect("cpu meter");
        if s.running_since.is_none() {
            s.running_since = Some(Instant::now());
        }
    }

    /// The guest stops running (awaits the engine, yields, or returns).
    pub fn pause(&self) {
        let mut s = self.0.lock().expect("cpu meter");
        if let Some(t) = s.running_since.take() {
            s.used += t.elapsed();
        }
    }

    /// Adds time spent on the call's behalf elsewhere (host work on another thread).
    pub fn charge(&self, d: Duration) {
        self.0.lock().expect("cpu meter").used += d;
    }

    pub fn used(&self) -> Duration {
        let s = self.0.lock().expect("cpu meter");
        s.used + s.running_since.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// Caps linear memory and tables below what the pool allows.
pub struct Limiter {
    pub memory_bytes: usize,
    pub hit: Option<LimitHit>,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            let hit = LimitHit {
                kind: LimitKind::Memory,
                detail: format!(
                    "linear memory would grow from {} to {} bytes; the limit is {}",
                    current, desired, self.memory_bytes
                ),
            };
            self.hit = Some(hit.clone());
            return Err(wasmtime::Error::new(LimitTrap(hit)));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}
