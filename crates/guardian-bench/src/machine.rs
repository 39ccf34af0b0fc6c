//! What machine a table was measured on, read from `/proc` (Linux).

use std::fmt;

/// Cores, CPU model, kernel and load: printed above every table so figures
/// from different machines are never compared blindly.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub nproc: usize,
    /// `model name` of the first CPU in `/proc/cpuinfo`.
    pub cpu_model: String,
    /// `/proc/sys/kernel/osrelease`.
    pub kernel: String,
    /// Total memory from `/proc/meminfo`, in MiB.
    pub mem_mib: u64,
}

impl Machine {
    /// Reads the machine description; unknown parts read "unknown".
    pub fn detect() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            cpu_model: cpu_model(&read("/proc/cpuinfo")).unwrap_or_else(|| "unknown".into()),
            kernel: Some(read("/proc/sys/kernel/osrelease").trim().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "unknown".into()),
            mem_mib: mem_total_kib(&read("/proc/meminfo")).unwrap_or(0) / 1024,
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} logical CPUs ({}), {} MiB RAM, Linux {}",
            self.nproc, self.cpu_model, self.mem_mib, self.kernel
        )
    }
}

/// The first `model name` in a `/proc/cpuinfo` text.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

/// `MemTotal` in KiB from a `/proc/meminfo` text.
pub fn mem_total_kib(meminfo: &str) -> Option<u64> {
    status_kib(meminfo, "MemTotal")
}

/// A `Key:   1234 kB` field of `/proc/meminfo` or `/proc/<pid>/status`, in KiB.
pub fn status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The 1-minute load average from `/proc/loadavg`.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Peak resident set size (`VmHWM`) of a live process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kib(&status, "VmHWM")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_texts() {
        let cpuinfo =
            "processor\t: 0\nvendor_id\t: X\nmodel name\t: Fancy CPU @ 2.0GHz\nflags\t: a\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("Fancy CPU @ 2.0GHz"));
        assert_eq!(cpu_model("nothing"), None);
        let status = "Name:\tgsync\nVmPeak:\t  100 kB\nVmHWM:\t   2048 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(2048));
        assert_eq!(status_kib(status, "VmRSS"), None);
        assert_eq!(
            mem_total_kib("MemTotal:       24000000 kB\n"),
            Some(24_000_000)
        );
    }

    #[test]
    fn detects_this_machine() {
        let m = Machine::detect();
        assert!(m.nproc >= 1);
        assert!(m.to_string().contains("logical CPUs"));
        assert!(peak_rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }
}
