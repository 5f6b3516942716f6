//! Embeds the browser bundle (`pkg/frontend.js`, `pkg/frontend_bg.wasm`, built by
//! `scripts/build-web.sh` into `<target>/site`, or `LLAMAFACTORY_SITE_DIR`) into the binary,
//! with brotli and gzip copies and an ETag per file, so one `llamafactory` file serves a
//! working LlamaBoard wherever it is copied. Without a bundle the binary is built without one
//! and says so when the web UI starts.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

fn site_dir(out_dir: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("LLAMAFACTORY_SITE_DIR") {
        return PathBuf::from(dir);
    }
    // OUT_DIR is <target>[/<triple>]/<profile>/build/server-<hash>/out.
    let target = out_dir.ancestors().nth(4).unwrap_or(Path::new("target"));
    let candidate = target.join("site");
    if candidate.join("pkg").is_dir() {
        return candidate;
    }
    // A cross build (<target>/<triple>/...), or `cargo install --path server` (a temporary
    // target dir): the repository's own `target/site`.
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    [
        target.parent().map(|p| p.join("site")),
        Some(manifest.join("../target/site")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.join("pkg").is_dir())
    .unwrap_or(candidate)
}

fn brotli(data: &[u8]) -> Vec<u8> {
    // Quality 11 for release-sized bundles; a debug bundle (tens of MB) gets a faster setting.
    let quality = if data.len() < 8 << 20 { 11 } else { 5 };
    let mut out = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut out, 1 << 16, quality, 22);
        w.write_all(data).expect("brotli");
    }
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    w.write_all(data).expect("gzip");
    w.finish().expect("gzip")
}

/// FNV-1a, 64 bits: a stable content hash for ETags.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn main() {
    println!("cargo:rerun-if-env-changed=LLAMAFACTORY_SITE_DIR");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let site = site_dir(&out_dir);
    let pkg = site.join("pkg");
    println!("cargo:rerun-if-changed={}", pkg.display());
    let mut code = String::from("/// The embedded bundle.\n");
    code += "pub static FILES: &[Asset] = &[\n";
    let mut names: Vec<PathBuf> = std::fs::read_dir(&pkg)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    for path in names.iter().filter(|p| p.is_file()) {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let kind = match path.extension().and_then(|e| e.to_str()) {
            Some("js") => "text/javascript; charset=utf-8",
            Some("wasm") => "application/wasm",
            Some("css") => "text/css; charset=utf-8",
            _ => "application/octet-stream",
        };
        let data = std::fs::read(path).expect("read bundle file");
        let file = |ext: &str| out_dir.join(format!("{name}.{ext}"));
        std::fs::write(file("raw"), &data).expect("write");
        std::fs::write(file("br"), brotli(&data)).expect("write");
        std::fs::write(file("gz"), gzip(&data)).expect("write");
        let inc = |ext: &str| format!("include_bytes!({:?})", file(ext));
        writeln!(
            code,
            "    Asset {{ name: {name:?}, kind: {kind:?}, etag: \"\\\"{:016x}\\\"\", raw: {}, br: {}, gz: {} }},",
            fnv(&data),
            inc("raw"),
            inc("br"),
            inc("gz")
        )
        .unwrap();
    }
    code += "];\n";
    // Unchanged contents keep their mtime, so the crate is not rebuilt for nothing.
    let file = out_dir.join("bundle.rs");
    if std::fs::read_to_string(&file).ok().as_deref() != Some(code.as_str()) {
        std::fs::write(&file, code).expect("write bundle.rs");
    }
}
