//! Where LLaMA-Factory's reference files are (its demo data and example YAMLs): the folder named
//! by `LLAMAFACTORY_SHARED`, else `../shared` beside the repository. Only the comparisons against
//! LLaMA-Factory need it. Without it such a test is skipped with one line saying so — except
//! under CI (`CI=true`), where a missing reference folder fails the test.

use std::path::{Path, PathBuf};

/// `<shared>/<rel>` when it exists; `None` (after saying what is skipped) when it does not.
pub fn shared_file(rel: &str, test: &str) -> Option<PathBuf> {
    let root = std::env::var_os("LLAMAFACTORY_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let path = root.join(rel);
    if path.exists() {
        return Some(path);
    }
    let msg = format!(
        "{test}: LLaMA-Factory's reference file {} is missing; set LLAMAFACTORY_SHARED to the folder that holds `compat/`",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg} (required under CI)");
    }
    eprintln!("skipped: {msg}");
    None
}
