//! No LLaMA-Factory key is silently ignored: each key of `TrainArgs` is either read by the engine
//! (found in its sources outside the argument definitions and the validation rules) or listed in
//! `protocol::args::UNREAD_KEYS`, where a non-default value warns (no effect) or fails naming
//! the key (unsupported).

use std::path::{Path, PathBuf};

use protocol::args::{KeyUse, UNREAD_KEYS};
use protocol::TrainArgs;

fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            && !path.ends_with("config/validate.rs")
        {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

#[test]
fn every_key_is_read_by_the_engine_or_says_what_it_does() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut text = String::new();
    for crate_dir in ["trainer/src", "server/src", "frontend/src"] {
        sources(&root.join(crate_dir), &mut text);
    }
    let unread: Vec<&str> = UNREAD_KEYS.iter().map(|(k, _)| *k).collect();
    let mut silent = Vec::new();
    for key in TrainArgs::keys() {
        let read = text.contains(&format!(".{key}")) || text.contains(&format!("{key}:"));
        if unread.contains(&key.as_str()) {
            assert!(
                !text.contains(&format!("args.{key}")) && !text.contains(&format!("a.{key}")),
                "`{key}` is listed as unread but the engine reads it"
            );
        } else if !read {
            silent.push(key);
        }
    }
    assert!(
        silent.is_empty(),
        "keys accepted but never read (read them, or list them in UNREAD_KEYS): {silent:?}"
    );
}

/// A value of the key's type that differs from its default.
fn other_value(default: &serde_json::Value) -> Vec<String> {
    match default {
        serde_json::Value::Bool(b) => vec![(!b).to_string()],
        serde_json::Value::Number(n) => vec![(n.as_f64().unwrap() + 2.0).to_string()],
        serde_json::Value::String(_) => vec!["something_else".into()],
        _ => vec!["3".into(), "something".into()],
    }
}

#[test]
fn unread_keys_warn_or_fail_by_name() {
    let empty = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    let defaults = serde_json::to_value(TrainArgs::default()).unwrap();
    for (key, u) in UNREAD_KEYS {
        let mut checked = false;
        for v in other_value(&defaults[*key]) {
            let (args, warnings) =
                match trainer::config::load_args(empty.path(), &[format!("{key}={v}")]) {
                    Ok(x) => x,
                    Err(e) => {
                        // A closed choice without the value refuses it by name already.
                        let e = e.to_string();
                        checked |= e.contains(&format!("key `{key}`")) && e.contains("one of");
                        continue; // not a value of this key's type
                    }
                };
            match u {
                KeyUse::NoEffect(_) => assert!(
                    warnings.iter().any(|w| w.contains(&format!("`{key}:"))),
                    "{key}={v}: no warning ({warnings:?})"
                ),
                KeyUse::Unsupported(_) => {
                    let e = trainer::config::validate(&args)
                        .expect_err(&format!("{key}={v} was accepted"));
                    assert_eq!(e.key, *key);
                    assert!(e.message.contains("not supported"), "{e}");
                }
            }
            checked = true;
            break;
        }
        assert!(checked, "{key}: no test value");
    }
}
