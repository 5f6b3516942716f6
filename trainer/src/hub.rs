//! Where model folders are: a local path, or a Hugging Face hub id resolved through the local
//! hub cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`). Nothing is downloaded.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The hub cache folder, honouring the same environment variables as `huggingface_hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// A model id's snapshot folder in the cache, following `refs/main` like `huggingface_hub`.
pub fn cached_snapshot(cache: &Path, repo_id: &str, revision: &str) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let commit = std::fs::read_to_string(repo.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let snap = repo.join("snapshots").join(commit);
    if snap.is_dir() {
        return Some(snap);
    }
    // A cache without refs (copied by hand): take the only snapshot there is.
    let mut snaps: Vec<_> = std::fs::read_dir(repo.join("snapshots"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    (snaps.len() == 1).then(|| snaps.remove(0))
}

/// Resolves `model_name_or_path` to a folder that holds `config.json` or a tokenizer.
pub fn resolve_model_dir(name_or_path: &str, revision: &str) -> Result<PathBuf> {
    let path = Path::new(name_or_path);
    // A GGUF file (or a folder holding just one): its Hugging Face stand-in in the cache.
    if let Some(file) = crate::model::gguf::gguf_file(path) {
        return crate::model::gguf::materialize(&file);
    }
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        bail!("model path {name_or_path} is a file; give the folder that holds config.json");
    }
    let looks_like_id =
        name_or_path.split('/').count() == 2 && !name_or_path.starts_with(['.', '/']);
    if looks_like_id {
        if let Some(cache) = hub_cache_dir() {
            if let Some(snap) = cached_snapshot(&cache, name_or_path, revision) {
                return Ok(snap);
            }
            bail!(
                "model `{name_or_path}` is neither a local folder nor in the Hugging Face cache ({}); \
                 this tool does not download models: download it once (e.g. `huggingface-cli download {name_or_path}`) \
                 or give the path of a local folder",
                cache.display()
            );
        }
    }
    bail!("model path {name_or_path} does not exist")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_local_dirs_and_cached_ids() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            resolve_model_dir(tmp.path().to_str().unwrap(), "main").unwrap(),
            tmp.path()
        );
        let cache = tmp.path().join("hub");
        let repo = cache.join("models--Qwen--Qwen2.5-0.5B");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(
            cached_snapshot(&cache, "Qwen/Qwen2.5-0.5B", "main").unwrap(),
            repo.join("snapshots/abc123")
        );
        assert!(cached_snapshot(&cache, "Qwen/Other", "main").is_none());
        let e = resolve_model_dir("/no/such/model", "main")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/no/such/model does not exist"), "{e}");
    }
}
