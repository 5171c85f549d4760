//! The standard `process_*` metrics of this process, read from `/proc` on
//! every scrape: CPU time, resident and virtual memory, open and maximum
//! file descriptors, start time. Where `/proc` is missing (not Linux) the
//! collector reports nothing.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Clock ticks per second of `/proc/*/stat` times. The kernel reports them
/// in USER_HZ, which is 100 on every architecture Linux runs on (the
/// Prometheus Go client assumes the same).
const TICKS_PER_SECOND: f64 = 100.0;

/// What `/proc/self/stat` says, in the units of the metrics.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stat {
    cpu_seconds: f64,
    /// Seconds after boot.
    started_after_boot: f64,
    virtual_bytes: u64,
    resident_pages: u64,
}

/// Parses `/proc/PID/stat`. The command name may hold spaces and
/// parentheses, so fields are counted after the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field n is at index n - 3.
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        cpu_seconds: (field(14)? + field(15)?) as f64 / TICKS_PER_SECOND,
        started_after_boot: field(22)? as f64 / TICKS_PER_SECOND,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// Boot time in seconds since the epoch, from `/proc/stat`.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The page size (resident memory is reported in pages), read once from
/// the auxiliary vector the kernel gave this process; 4 KiB if unreadable.
fn page_size() -> u64 {
    use std::sync::OnceLock;
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        std::fs::read("/proc/self/auxv")
            .ok()
            .and_then(|auxv| page_size_from_auxv(&auxv))
            .unwrap_or(4096)
    })
}

/// `AT_PAGESZ` (6) from a native-endian auxiliary vector of
/// (key, value) pairs of machine words.
fn page_size_from_auxv(auxv: &[u8]) -> Option<u64> {
    const AT_PAGESZ: u64 = 6;
    const WORD: usize = std::mem::size_of::<usize>();
    let word = |chunk: &[u8]| -> u64 {
        let mut bytes = [0u8; WORD];
        bytes.copy_from_slice(chunk);
        usize::from_ne_bytes(bytes) as u64
    };
    auxv.chunks_exact(2 * WORD)
        .map(|pair| (word(&pair[..WORD]), word(&pair[WORD..])))
        .take_while(|&(key, _)| key != 0)
        .find(|&(key, _)| key == AT_PAGESZ)
        .map(|(_, value)| value)
}

/// Collects the `process_*` metrics on every scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl ProcessCollector {
    fn gauge(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: f64,
    ) -> Result<(), std::fmt::Error> {
        let metric = ConstGauge::new(value);
        metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(stat) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .as_deref()
            .and_then(parse_stat)
        {
            let cpu = ConstCounter::new(stat.cpu_seconds);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?)?;
            Self::gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                (stat.resident_pages * page_size()) as f64,
            )?;
            Self::gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stat.virtual_bytes as f64,
            )?;
            if let Some(boot) = std::fs::read_to_string("/proc/stat")
                .ok()
                .as_deref()
                .and_then(parse_boot_time)
            {
                Self::gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since the Unix epoch in seconds",
                    boot as f64 + stat.started_after_boot,
                )?;
            }
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of the entries.
            let open = entries.count().saturating_sub(1);
            Self::gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                open as f64,
            )?;
        }
        if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
            Self::gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                soft as f64,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        // Fields 14/15 (utime, stime), 22 (starttime), 23 (vsize), 24 (rss).
        let stat = "4242 (my (odd) wrs) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 12345 7340032 1500 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                cpu_seconds: 3.0,
                started_after_boot: 123.45,
                virtual_bytes: 7_340_032,
                resident_pages: 1500,
            })
        );
        assert_eq!(parse_stat("4242 (wrs) S 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn reads_boot_time() {
        let text = "cpu  1 2 3\nintr 5\nbtime 1763790000\nprocesses 9\n";
        assert_eq!(parse_boot_time(text), Some(1_763_790_000));
        assert_eq!(parse_boot_time("cpu 1\n"), None);
    }

    #[test]
    fn finds_the_page_size_in_the_auxiliary_vector() {
        let mut auxv = Vec::new();
        for (key, value) in [(3usize, 64usize), (6, 16384), (0, 0)] {
            auxv.extend_from_slice(&key.to_ne_bytes());
            auxv.extend_from_slice(&value.to_ne_bytes());
        }
        assert_eq!(page_size_from_auxv(&auxv), Some(16384));
        assert_eq!(page_size_from_auxv(&auxv[..2 * size_of::<usize>()]), None);
    }

    #[test]
    fn this_process_is_measured() {
        let stat = parse_stat(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert!(stat.resident_pages > 0 && stat.virtual_bytes > 0);
        assert!(page_size() >= 4096 && page_size().is_power_of_two());
    }
}
