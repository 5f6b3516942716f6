//! `dataset_info.json`: every attribute LLaMA-Factory's `DatasetAttr` reads, with its defaults.
//! As in LLaMA-Factory, giving `columns` (or `tags`) at all resets the columns (tags) not named
//! there to none.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

pub const DATA_CONFIG: &str = "dataset_info.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Formatting {
    Alpaca,
    Sharegpt,
    Openai,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadFrom {
    File(String),
    HfHub(String),
    MsHub(String),
    OmHub(String),
    Script(String),
    CloudFile(String),
}

#[derive(Debug, Clone)]
pub struct DatasetAttr {
    pub name: String,
    pub load_from: LoadFrom,
    pub formatting: Formatting,
    pub ranking: bool,
    pub subset: Option<String>,
    pub split: String,
    pub folder: Option<String>,
    pub num_samples: Option<usize>,
    pub tags_list: Vec<String>,
    // columns
    pub system: Option<String>,
    pub tools: Option<String>,
    pub images: Option<String>,
    pub videos: Option<String>,
    pub audios: Option<String>,
    pub chosen: Option<String>,
    pub rejected: Option<String>,
    pub kto_tag: Option<String>,
    pub prompt: Option<String>,
    pub query: Option<String>,
    pub response: Option<String>,
    pub history: Option<String>,
    pub messages: Option<String>,
    // sharegpt tags
    pub role_tag: Option<String>,
    pub content_tag: Option<String>,
    pub user_tag: Option<String>,
    pub assistant_tag: Option<String>,
    pub observation_tag: Option<String>,
    pub function_tag: Option<String>,
    pub system_tag: Option<String>,
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

impl DatasetAttr {
    fn new(name: &str, load_from: LoadFrom) -> Self {
        Self {
            name: name.to_string(),
            load_from,
            formatting: Formatting::Alpaca,
            ranking: false,
            subset: None,
            split: "train".into(),
            folder: None,
            num_samples: None,
            tags_list: Vec::new(),
            system: None,
            tools: None,
            images: None,
            videos: None,
            audios: None,
            chosen: None,
            rejected: None,
            kto_tag: None,
            prompt: s("instruction"),
            query: s("input"),
            response: s("output"),
            history: None,
            messages: s("conversations"),
            role_tag: s("from"),
            content_tag: s("value"),
            user_tag: s("human"),
            assistant_tag: s("gpt"),
            observation_tag: s("observation"),
            function_tag: s("function_call"),
            system_tag: s("system"),
        }
    }

    /// Whether this is a KTO (unpaired feedback) dataset.
    pub fn is_kto(&self) -> bool {
        self.kto_tag.is_some()
    }

    pub(crate) fn from_entry(name: &str, entry: &Map<String, Value>, file: &Path) -> Result<Self> {
        let at = |key: &str| format!("{}: dataset `{name}`: attribute `{key}`", file.display());
        let string = |key: &str| -> Result<Option<String>> {
            match entry.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => bail!("{} must be a string, got {other}", at(key)),
            }
        };
        let load_from = if let Some(url) = string("hf_hub_url")? {
            let ms = string("ms_hub_url")?;
            let om = string("om_hub_url")?;
            match (
                std::env::var("USE_MODELSCOPE_HUB").is_ok_and(|v| v == "1"),
                ms,
                om,
            ) {
                (true, Some(ms), _) => LoadFrom::MsHub(ms),
                (_, _, Some(om)) if std::env::var("USE_OPENMIND_HUB").is_ok_and(|v| v == "1") => {
                    LoadFrom::OmHub(om)
                }
                _ => LoadFrom::HfHub(url),
            }
        } else if let Some(ms) = string("ms_hub_url")? {
            LoadFrom::MsHub(ms)
        } else if let Some(om) = string("om_hub_url")? {
            LoadFrom::OmHub(om)
        } else if let Some(script) = string("script_url")? {
            LoadFrom::Script(script)
        } else if let Some(cloud) = string("cloud_file_name")? {
            LoadFrom::CloudFile(cloud)
        } else if let Some(file_name) = string("file_name")? {
            LoadFrom::File(file_name)
        } else {
            bail!(
                "{}: dataset `{name}` names no source: give `file_name` (a file or folder under the dataset dir) or `hf_hub_url`",
                file.display()
            );
        };
        let mut attr = Self::new(name, load_from);
        attr.formatting = match string("formatting")?.as_deref() {
            None | Some("alpaca") => Formatting::Alpaca,
            Some("sharegpt") => Formatting::Sharegpt,
            Some("openai") => Formatting::Openai,
            Some(other) => bail!(
                "{} has value `{other}`, expected alpaca, sharegpt or openai",
                at("formatting")
            ),
        };
        attr.ranking = match entry.get("ranking") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => bail!("{} must be true or false, got {other}", at("ranking")),
        };
        attr.subset = string("subset")?;
        attr.split = string("split")?.unwrap_or_else(|| "train".into());
        attr.folder = string("folder")?;
        attr.num_samples = match entry.get("num_samples") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                anyhow!(
                    "{} must be a non-negative integer, got {v}",
                    at("num_samples")
                )
            })? as usize),
        };
        if let Some(tags) = entry.get("tags") {
            attr.tags_list = match tags {
                Value::Array(items) => items
                    .iter()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect(),
                Value::String(t) => vec![t.clone()],
                _ => Vec::new(),
            };
        }
        // `tags` is overloaded: sharegpt role tags (an object) or descriptive tags (a list).
        let columns = entry.get("columns");
        if let Some(columns) = columns {
            let columns = columns
                .as_object()
                .ok_or_else(|| anyhow!("{} must be an object", at("columns")))?;
            let get = |k: &str| -> Result<Option<String>> {
                match columns.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(other) => bail!(
                        "{} must be a column name string, got {other}",
                        at(&format!("columns.{k}"))
                    ),
                }
            };
            attr.prompt = get("prompt")?;
            attr.query = get("query")?;
            attr.response = get("response")?;
            attr.history = get("history")?;
            attr.messages = get("messages")?;
            attr.system = get("system")?;
            attr.tools = get("tools")?;
            attr.images = get("images")?;
            attr.videos = get("videos")?;
            attr.audios = get("audios")?;
            attr.chosen = get("chosen")?;
            attr.rejected = get("rejected")?;
            attr.kto_tag = get("kto_tag")?;
        }
        if let Some(Value::Object(tags)) = entry.get("tags") {
            let get = |k: &str| -> Result<Option<String>> {
                match tags.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(other) => {
                        bail!("{} must be a string, got {other}", at(&format!("tags.{k}")))
                    }
                }
            };
            attr.role_tag = get("role_tag")?;
            attr.content_tag = get("content_tag")?;
            attr.user_tag = get("user_tag")?;
            attr.assistant_tag = get("assistant_tag")?;
            attr.observation_tag = get("observation_tag")?;
            attr.function_tag = get("function_tag")?;
            attr.system_tag = get("system_tag")?;
            attr.tags_list.clear();
        }
        Ok(attr)
    }
}

/// A parsed `dataset_info.json` of one dataset dir.
pub struct DatasetInfo {
    pub dir: PathBuf,
    pub file: PathBuf,
    pub entries: Map<String, Value>,
}

impl DatasetInfo {
    pub fn load(dataset_dir: &Path) -> Result<Self> {
        let file = dataset_dir.join(DATA_CONFIG);
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot open {} (is `dataset_dir` right?)", file.display()))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: invalid JSON: {e}", file.display()))?;
        let Value::Object(entries) = value else {
            bail!(
                "{}: expected an object mapping dataset names to their attributes",
                file.display()
            );
        };
        Ok(Self {
            dir: dataset_dir.to_path_buf(),
            file,
            entries,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn attr(&self, name: &str) -> Result<DatasetAttr> {
        let Some(entry) = self.entries.get(name) else {
            let hint = crate::config::closest(name, self.names())
                .map(|n| format!("; did you mean `{n}`?"))
                .unwrap_or_default();
            bail!("Undefined dataset {name} in {}{hint}", self.file.display());
        };
        let entry = entry.as_object().ok_or_else(|| {
            anyhow!(
                "{}: dataset `{name}` must be an object",
                self.file.display()
            )
        })?;
        DatasetAttr::from_entry(name, entry, &self.file)
    }

    /// All entries that parse, with their attributes; for listing in the UI.
    pub fn all(&self) -> Vec<DatasetAttr> {
        self.names().filter_map(|n| self.attr(n).ok()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(json: &str) -> (tempfile::TempDir, DatasetInfo) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DATA_CONFIG), json).unwrap();
        let info = DatasetInfo::load(dir.path()).unwrap();
        (dir, info)
    }

    #[test]
    fn columns_and_tags_reset_unnamed_ones_like_llamafactory() {
        let (_d, info) = info(
            r#"{"a": {"file_name": "a.json"},
                "g": {"file_name": "g.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}},
                "m": {"file_name": "m.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
                "k": {"hf_hub_url": "org/k", "num_samples": 5, "ranking": true, "split": "test", "subset": "en", "folder": "f", "tags": ["x"]}}"#,
        );
        let a = info.attr("a").unwrap();
        assert_eq!(a.prompt.as_deref(), Some("instruction"));
        assert_eq!(a.load_from, LoadFrom::File("a.json".into()));
        let g = info.attr("g").unwrap();
        assert_eq!(g.formatting, Formatting::Sharegpt);
        assert_eq!(g.prompt, None);
        assert_eq!(g.tools.as_deref(), Some("tools"));
        let m = info.attr("m").unwrap();
        assert_eq!(m.role_tag.as_deref(), Some("role"));
        assert_eq!(m.system_tag, None);
        assert_eq!(m.observation_tag, None);
        let k = info.attr("k").unwrap();
        assert_eq!(k.load_from, LoadFrom::HfHub("org/k".into()));
        assert_eq!(
            (k.num_samples, k.ranking, k.split.as_str()),
            (Some(5), true, "test")
        );
        assert_eq!(k.tags_list, vec!["x"]);
    }

    #[test]
    fn unknown_dataset_and_bad_attributes_are_named() {
        let (_d, info) = info(
            r#"{"alpaca_en": {"file_name": "a.json"}, "bad": {"file_name": "b.json", "formatting": "xml"}}"#,
        );
        let e = info.attr("alpaca_eng").unwrap_err().to_string();
        assert!(
            e.contains("Undefined dataset alpaca_eng") && e.contains("did you mean `alpaca_en`"),
            "{e}"
        );
        let e = info.attr("bad").unwrap_err().to_string();
        assert!(
            e.contains("dataset `bad`: attribute `formatting` has value `xml`"),
            "{e}"
        );
    }
}
