//! What `/proc` says about a process: CPU time (`/proc/PID/stat`, user +
//! system, all threads) and resident memory (`/proc/PID/status`), plus
//! raising this process's open-file limit.

use std::io;
use std::time::Duration;

/// User plus system CPU time of a process, all threads included.
///
/// # Errors
///
/// The process does not exist or `/proc` is unreadable.
pub fn cpu_time(pid: u32) -> io::Result<Duration> {
    parse_cpu_time(
        &std::fs::read_to_string(format!("/proc/{pid}/stat"))?,
        clock_ticks(),
    )
}

/// CPU time of this process.
///
/// # Errors
///
/// `/proc` is unreadable.
pub fn own_cpu_time() -> io::Result<Duration> {
    cpu_time(std::process::id())
}

/// Resident set size in bytes (`VmRSS`).
///
/// # Errors
///
/// The process does not exist or `/proc` is unreadable.
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_rss(&status).ok_or_else(|| io::Error::other("no VmRSS line"))
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

fn parse_cpu_time(stat: &str, ticks_per_s: u64) -> io::Result<Duration> {
    // The command name may hold spaces and parentheses; fields follow the
    // last ')'. utime and stime are fields 14 and 15 of the whole line.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("malformed stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("malformed stat"))
    };
    let ticks = field(11)? + field(12)?;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / ticks_per_s))
}

fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Raises the soft open-file limit to the hard limit; returns the new
/// soft limit.
///
/// # Errors
///
/// The limit cannot be read or set.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// CPU time of a process between two moments.
#[derive(Clone, Copy, Debug)]
pub struct CpuMeter {
    pid: u32,
    start: Duration,
}

impl CpuMeter {
    /// Starts measuring `pid`.
    ///
    /// # Errors
    ///
    /// The process cannot be read.
    pub fn start(pid: u32) -> io::Result<Self> {
        Ok(Self {
            pid,
            start: cpu_time(pid)?,
        })
    }

    /// CPU time spent since [`CpuMeter::start`].
    ///
    /// # Errors
    ///
    /// The process cannot be read any more.
    pub fn elapsed(&self) -> io::Result<Duration> {
        Ok(cpu_time(self.pid)?.saturating_sub(self.start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let stat = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(parse_cpu_time(stat, 100).unwrap(), Duration::from_secs(3));
    }

    #[test]
    fn parses_rss() {
        let status = "Name:\twrs\nVmRSS:\t   10240 kB\nThreads:\t2\n";
        assert_eq!(parse_rss(status), Some(10240 * 1024));
    }

    #[test]
    fn reads_this_process() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        own_cpu_time().unwrap();
    }
}
