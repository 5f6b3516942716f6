//! Types that cross process and network boundaries: the run arguments (LLaMA-Factory's flat
//! argument namespace, the same keys as the training YAML) and their closed choices, the worker's
//! progress events and the web server's API types.

pub mod args;
pub mod events;
pub mod options;
pub mod run;

pub use args::TrainArgs;
pub use events::WorkerEvent;

/// `s` percent-encoded for a URL query value (the browser and the server build the same links).
pub fn query_enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
