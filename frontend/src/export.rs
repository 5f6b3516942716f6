//! The Export tab: merge the top bar's model and checkpoint into a Hugging Face folder
//! (sharded safetensors) or a GGUF file, or quantize a full model with GPTQ over calibration
//! texts (progress in layers), with the list of written files.

use leptos::prelude::*;
use leptos::task::spawn_local;
use protocol::run::Created;
use serde_json::Value;

use crate::client::send;
use crate::form::{choices, Field, Form, Select};
use crate::i18n::use_i18n;
use crate::runview::{LogTail, Progress};
use crate::use_ctx;
use protocol::args::{Choice, ExportFormat, GgufType, InferDtype};

const EXPORT_DEFAULTS: &[(&str, &str)] = &[
    ("export_size", "5"),
    ("export_format", "safetensors"),
    ("export_gguf_type", "f16"),
    ("infer_dtype", "auto"),
    ("export_dir", ""),
    ("export_quantization_bit", "none"),
    ("export_quantization_dataset", "demo_pt"),
    ("export_quantization_nsamples", "128"),
    ("export_quantization_maxlen", "1024"),
];

/// The calibration keys, sent only with a quantization bit.
const GPTQ_KEYS: &[&str] = &[
    "export_quantization_bit",
    "export_quantization_dataset",
    "export_quantization_nsamples",
    "export_quantization_maxlen",
];

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

#[component]
pub fn ExportTab() -> impl IntoView {
    let i = use_i18n();
    let ctx = use_ctx();
    let form = Form::new("export", EXPORT_DEFAULTS);
    let view_ = ctx.export;
    let message = RwSignal::new(None::<String>);
    let busy = Signal::derive(move || view_.is_active());
    let gguf = Signal::derive(move || form.get("export_format") != ExportFormat::Gguf.as_str());
    // GPTQ quantizes a full model: not with adapters selected (LlamaBoard disables it), not
    // into GGUF.
    let no_gptq = Signal::derive(move || {
        !ctx.top.get("checkpoint").is_empty()
            || form.get("export_format") == ExportFormat::Gguf.as_str()
    });
    let no_calibration =
        Signal::derive(move || no_gptq.get() || form.get("export_quantization_bit") == "none");
    let on_export = move |_| {
        form.clear_errors();
        ctx.top.clear_errors();
        message.set(None);
        let mut body = ctx.top_args();
        let mut own = form.to_json();
        if form.get_untracked("export_format") != ExportFormat::Gguf.as_str() {
            own.remove("export_gguf_type");
        }
        if no_calibration.get_untracked() {
            for k in GPTQ_KEYS {
                own.remove(*k);
            }
        }
        body.extend(own);
        spawn_local(async move {
            match send::<_, Created>("POST", "/api/export", &body).await {
                Ok(c) => view_.attach(c.id),
                Err(e) => message.set(ctx.place_error(&e, &[form])),
            }
        });
    };
    let files = move || -> Vec<(String, u64)> {
        view_
            .result
            .get()
            .get("files")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|f| {
                        (
                            f.get("path")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                            f.get("size").and_then(Value::as_u64).unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    view! {
        <div class="grid">
            <Field form key="export_size" label="export_size" kind="number" min="1" max="100"/>
            <Select form key="export_format" label="export_format" options={choices::<ExportFormat>()}/>
            <Select form key="export_gguf_type" label="export_gguf_type" options={choices::<GgufType>()} disabled=gguf/>
            <Select form key="infer_dtype" label="export_dtype" options={choices::<InferDtype>()}/>
            <Field form key="export_dir" label="export_dir" placeholder="export_<time>"/>
            <Select form key="export_quantization_bit" label="export_quantization_bit"
                options=vec![("none", "none"), ("8", ""), ("4", ""), ("3", ""), ("2", "")] disabled=no_gptq/>
            <Field form key="export_quantization_dataset" label="export_quantization_dataset" disabled=no_calibration/>
            <Field form key="export_quantization_nsamples" label="export_quantization_nsamples" kind="number" min="1" disabled=no_calibration/>
            <Field form key="export_quantization_maxlen" label="export_quantization_maxlen" kind="number" min="1" disabled=no_calibration/>
        </div>
        <div class="actions">
            <button class="primary" data-testid="export-start" disabled=busy on:click=on_export>{i.t("export")}</button>
        </div>
        {move || message.get().map(|m| view! { <p class="message" role="status">{m}</p> })}
        <Progress view=view_/>
        {move || {
            let list = files();
            (!list.is_empty()).then(|| view! {
                <h4>{i.t("exported")}" "{i.t("exported_files")}</h4>
                <table data-testid="export-files">
                    <thead><tr><th>{i.t("file")}</th><th>{i.t("size")}</th></tr></thead>
                    <tbody>{list.into_iter().map(|(p, s)| view! { <tr><td class="pre">{p}</td><td>{size(s)}</td></tr> }).collect_view()}</tbody>
                </table>
            })
        }}
        <LogTail view=view_/>
    }
    .into_any()
}
