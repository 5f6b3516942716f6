//! Reads a dataset's files into JSON records: `.json` (array or JSON Lines), `.jsonl`, `.csv`,
//! `.txt` (one `text` record per line) and `.parquet`, one file or every file of a folder.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

use super::dataset_info::{DatasetAttr, LoadFrom};

/// One raw record and where it came from.
#[derive(Debug, Clone)]
pub struct Record {
    pub file: Arc<str>,
    /// 1-based: the record's index in a JSON array or CSV/Parquet file, its line in JSON Lines and text.
    pub row: usize,
    pub value: Map<String, Value>,
}

const ALLOWED: &str = "arrow,csv,json,jsonl,parquet,txt";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FileType {
    Json,
    Csv,
    Text,
    Parquet,
}

fn file_type(path: &Path) -> Result<FileType> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    Ok(match ext {
        "json" | "jsonl" => FileType::Json,
        "csv" => FileType::Csv,
        "txt" => FileType::Text,
        "parquet" => FileType::Parquet,
        "arrow" => bail!(
            "{}: Arrow files are not supported yet; convert it to Parquet or JSON Lines",
            path.display()
        ),
        _ => bail!("{}: Allowed file types: {ALLOWED}.", path.display()),
    })
}

/// The files of a `file_name` entry, checked to share one type.
pub fn dataset_files(attr: &DatasetAttr, dataset_dir: &Path) -> Result<Vec<PathBuf>> {
    let name = match &attr.load_from {
        LoadFrom::File(name) => name,
        LoadFrom::HfHub(id) | LoadFrom::MsHub(id) | LoadFrom::OmHub(id) => bail!(
            "dataset `{}` is on a hub (`{id}`); this tool reads local files only: download it and point `file_name` in dataset_info.json at the file",
            attr.name
        ),
        LoadFrom::Script(s) => bail!("dataset `{}` uses a loading script (`{s}`), which is not supported; convert it to JSON Lines", attr.name),
        LoadFrom::CloudFile(s) => bail!("dataset `{}` is a cloud file (`{s}`); download it and use `file_name`", attr.name),
    };
    let local = dataset_dir.join(name);
    let mut files = if local.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&local)
            .with_context(|| format!("cannot list {}", local.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    } else if local.is_file() {
        vec![local.clone()]
    } else {
        bail!(
            "File {} not found (dataset `{}`).",
            local.display(),
            attr.name
        );
    };
    if files.is_empty() {
        bail!(
            "{}: the folder of dataset `{}` has no files",
            local.display(),
            attr.name
        );
    }
    let first = file_type(&files[0])?;
    for f in &files {
        if file_type(f)? != first {
            bail!(
                "{}: File types should be identical (dataset `{}`).",
                f.display(),
                attr.name
            );
        }
    }
    files.dedup();
    Ok(files)
}

pub fn load_records(attr: &DatasetAttr, dataset_dir: &Path) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for path in dataset_files(attr, dataset_dir)? {
        let file: Arc<str> = Arc::from(path.display().to_string());
        match file_type(&path)? {
            FileType::Json => read_json(&path, &file, &mut out)?,
            FileType::Csv => read_csv(&path, &file, &mut out)?,
            FileType::Text => read_text(&path, &file, &mut out)?,
            FileType::Parquet => read_parquet(&path, &file, &mut out)?,
        }
    }
    Ok(out)
}

fn object(value: Value, file: &Arc<str>, row: usize) -> Result<Record> {
    match value {
        Value::Object(value) => Ok(Record {
            file: file.clone(),
            row,
            value,
        }),
        other => bail!(
            "{file} record {row}: expected a JSON object, got {}",
            kind(&other)
        ),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn read_json(path: &Path, file: &Arc<str>, out: &mut Vec<Record>) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let rows: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "{}: invalid JSON at line {}, column {}: {e}",
                path.display(),
                e.line(),
                e.column()
            )
        })?;
        for (i, v) in rows.into_iter().enumerate() {
            out.push(object(v, file, i + 1)?);
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| {
                anyhow!(
                    "{}: invalid JSON at line {}, column {}: {e}",
                    path.display(),
                    i + 1,
                    e.column()
                )
            })?;
            out.push(object(v, file, i + 1)?);
        }
    }
    Ok(())
}

fn read_csv(path: &Path, file: &Arc<str>, out: &mut Vec<Record>) -> Result<()> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let headers = reader
        .headers()
        .map_err(|e| anyhow!("{}: bad CSV header: {e}", path.display()))?
        .clone();
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.map_err(|e| anyhow!("{}: bad CSV record {}: {e}", path.display(), i + 1))?;
        let value = headers
            .iter()
            .zip(rec.iter())
            .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
            .collect();
        out.push(Record {
            file: file.clone(),
            row: i + 1,
            value,
        });
    }
    Ok(())
}

fn read_text(path: &Path, file: &Arc<str>, out: &mut Vec<Record>) -> Result<()> {
    let reader = BufReader::new(
        File::open(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    for (i, line) in reader.lines().enumerate() {
        let line =
            line.with_context(|| format!("{}: line {} is not UTF-8 text", path.display(), i + 1))?;
        let mut value = Map::new();
        value.insert("text".into(), Value::String(line));
        out.push(Record {
            file: file.clone(),
            row: i + 1,
            value,
        });
    }
    Ok(())
}

fn read_parquet(path: &Path, file: &Arc<str>, out: &mut Vec<Record>) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let reader = SerializedFileReader::new(f)
        .map_err(|e| anyhow!("{}: not a readable Parquet file: {e}", path.display()))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| anyhow!("{}: record {}: {e}", path.display(), i + 1))?;
        out.push(object(row.to_json_value(), file, i + 1)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset_info::DatasetInfo;

    fn setup(files: &[(&str, &str)], info: &str) -> (tempfile::TempDir, DatasetInfo) {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        std::fs::write(dir.path().join("dataset_info.json"), info).unwrap();
        let info = DatasetInfo::load(dir.path()).unwrap();
        (dir, info)
    }

    #[test]
    fn reads_every_format_with_locations() {
        let (dir, info) = setup(
            &[
                ("a.json", r#"[{"instruction": "a"}, {"instruction": "b"}]"#),
                (
                    "b.jsonl",
                    "{\"instruction\": \"a\"}\n\n{\"instruction\": \"c\"}\n",
                ),
                ("c.csv", "instruction,output\nhi,there\n\"x, y\",z\n"),
                ("d.txt", "line one\n\nline three\n"),
                ("folder/1.jsonl", "{\"instruction\": \"1\"}\n"),
                ("folder/2.jsonl", "{\"instruction\": \"2\"}\n"),
            ],
            r#"{"a": {"file_name": "a.json"}, "b": {"file_name": "b.jsonl"}, "c": {"file_name": "c.csv"},
                "d": {"file_name": "d.txt"}, "f": {"file_name": "folder"}}"#,
        );
        let load = |n: &str| load_records(&info.attr(n).unwrap(), dir.path()).unwrap();
        assert_eq!(load("a").len(), 2);
        let b = load("b");
        assert_eq!((b.len(), b[1].row), (2, 3));
        let c = load("c");
        assert_eq!(c[1].value["instruction"], "x, y");
        let d = load("d");
        assert_eq!(d.len(), 3);
        assert_eq!(d[2].value["text"], "line three");
        let f = load("f");
        assert_eq!(f.len(), 2);
        assert!(f[1].file.ends_with("2.jsonl"));
    }

    #[test]
    fn reads_parquet_written_by_pyarrow() {
        let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/data/sample.parquet");
        let (dir, info) = setup(&[], r#"{"p": {"file_name": "sample.parquet"}}"#);
        std::fs::copy(&fixture, dir.path().join("sample.parquet")).unwrap();
        let rows = load_records(&info.attr("p").unwrap(), dir.path()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].value["output"], "2 plus 3 is 5.");
        assert_eq!(rows[1].value["input"], "");
        assert_eq!(rows[1].row, 2);
    }

    #[test]
    fn bad_files_name_path_and_line() {
        let (dir, info) = setup(
            &[
                ("bad.jsonl", "{\"a\": 1}\n{\"a\": \n"),
                ("bad.json", "[{\"a\": 1},\n {\"a\" 2}]"),
                ("x.xml", "<a/>"),
                ("mixed/1.json", "[]"),
                ("mixed/2.csv", "a\n"),
                ("n.json", "[1]"),
            ],
            r#"{"l": {"file_name": "bad.jsonl"}, "j": {"file_name": "bad.json"}, "x": {"file_name": "x.xml"},
                "m": {"file_name": "mixed"}, "missing": {"file_name": "nope.json"}, "n": {"file_name": "n.json"},
                "hub": {"hf_hub_url": "org/data"}}"#,
        );
        let err = |n: &str| {
            load_records(&info.attr(n).unwrap(), dir.path())
                .unwrap_err()
                .to_string()
        };
        let e = err("l");
        assert!(e.contains("bad.jsonl: invalid JSON at line 2"), "{e}");
        let e = err("j");
        assert!(e.contains("bad.json: invalid JSON at line 2"), "{e}");
        assert!(err("x").contains("Allowed file types: arrow,csv,json,jsonl,parquet,txt"));
        assert!(err("m").contains("File types should be identical"));
        assert!(err("missing").contains("nope.json not found"));
        assert!(err("n").contains("n.json record 1: expected a JSON object, got a number"));
        assert!(err("hub").contains("reads local files only"));
    }
}
