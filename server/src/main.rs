//! `llamafactory`: one binary for the CLI, the trainer worker and the web UI.

// The page's view types nest deeply.
#![recursion_limit = "256"]

mod api;
mod cli;
mod db;
mod runs;
mod web;
mod workdir_lock;

// Tokenization and autograd allocate many small buffers; mimalloc halves the time glibc spends there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", without_backtraces(&format!("{e:#}")));
            std::process::ExitCode::from(1)
        }
    }
}

/// An error chain for people: the stack frames some library errors carry (candle's, when
/// `RUST_BACKTRACE` is set) are dropped, and so is the "disabled backtrace" they print when not.
fn without_backtraces(text: &str) -> String {
    let frame = |l: &str| {
        let t = l.trim_start();
        let numbered = t
            .split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        (l.starts_with(' ') && numbered)
            || (l.starts_with("   ") && t.starts_with("at "))
            || t == "disabled backtrace"
            || t == "unsupported backtrace"
            || t == "stack backtrace:"
    };
    text.lines()
        .filter(|l| !frame(l))
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn backtraces_are_not_shown_to_users() {
        let raw = "loading: shape mismatch in matmul, lhs: [2, 0], rhs: [0, 8]\n   0: candle_core::error::Error::bt\n             at /src/error.rs:264:25\n   1: trainer::model::adapter\ndisabled backtrace";
        assert_eq!(
            super::without_backtraces(raw),
            "loading: shape mismatch in matmul, lhs: [2, 0], rhs: [0, 8]"
        );
    }
}
