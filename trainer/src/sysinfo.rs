//! Facts about this machine read from `/proc` (Linux); `None` elsewhere.

/// The kB figure of the line starting with `key` in a `/proc` file such as `/proc/meminfo`.
pub fn proc_kib(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
