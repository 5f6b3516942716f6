//! The Evaluate & Predict tab: run prediction (or evaluation) on datasets, watch its progress,
//! then read the metrics and browse `prompt / predict / label` rows.

use leptos::prelude::*;
use leptos::task::spawn_local;
use protocol::run::{CommandPreview, Created, DatasetEntry, DatasetPage};
use serde_json::Value;

use crate::client::{get, send};
use crate::form::{Check, Field, Form};
use crate::i18n::use_i18n;
use crate::runview::{LogTail, Progress};
use crate::use_ctx;

const EVAL_DEFAULTS: &[(&str, &str)] = &[
    ("dataset_dir", "data"),
    ("dataset", ""),
    ("cutoff_len", "1024"),
    ("max_samples", "100000"),
    ("per_device_eval_batch_size", "2"),
    ("do_predict", "true"),
    ("max_new_tokens", "512"),
    ("top_p", "0.7"),
    ("temperature", "0.95"),
    ("seed", "42"),
    ("output_dir", ""),
];

#[component]
pub fn EvalTab() -> impl IntoView {
    let i = use_i18n();
    let ctx = use_ctx();
    let form = Form::new("eval", EVAL_DEFAULTS);
    let view_ = ctx.eval;
    let message = RwSignal::new(None::<String>);
    let command = RwSignal::new(None::<CommandPreview>);
    let datasets = RwSignal::new(Vec::<DatasetEntry>::new());
    let rows = RwSignal::new(None::<DatasetPage>);
    let busy = Signal::derive(move || view_.is_active());

    crate::watch_datasets(form, datasets, |d| !d.ranking && d.kind != "kto");
    let load_rows = move |offset: u64| {
        let Some(id) = view_.id.get_untracked() else {
            return;
        };
        spawn_local(async move {
            if let Ok(p) = get::<DatasetPage>(&format!(
                "/api/runs/{id}/predictions?offset={offset}&limit=10"
            ))
            .await
            {
                rows.set(Some(p));
            }
        });
    };
    // Predictions appear once the run has finished.
    Effect::new(move |_| {
        if !view_.result.get().is_empty() {
            load_rows(0);
        } else {
            rows.set(None);
        }
    });
    let args = move || {
        let mut m = ctx.top_args();
        let mut own = form.to_json();
        let predict = form.get_untracked("do_predict") == "true";
        own.insert("do_predict".into(), Value::Bool(predict));
        own.insert("do_eval".into(), Value::Bool(!predict));
        if let Some(d) = own.remove("dataset") {
            own.insert("eval_dataset".into(), d);
        }
        m.extend(own);
        m
    };
    let report = move |e: crate::client::ApiErr| message.set(ctx.place_error(&e, &[form]));
    let on_preview = move |_| {
        form.clear_errors();
        let body = args();
        spawn_local(async move {
            match send::<_, CommandPreview>("POST", "/api/preview-command?kind=predict", &body)
                .await
            {
                Ok(c) => command.set(Some(c)),
                Err(e) => report(e),
            }
        });
    };
    let on_start = move |_| {
        form.clear_errors();
        ctx.top.clear_errors();
        message.set(None);
        if form.get_untracked("dataset").is_empty() {
            form.show_error("dataset", i.now("err_no_dataset"));
            return;
        }
        let body = args();
        spawn_local(async move {
            match send::<_, Created>("POST", "/api/predict", &body).await {
                Ok(c) => view_.attach(c.id),
                Err(e) => report(e),
            }
        });
    };
    let on_abort = move |_| view_.abort(message);
    let chosen = move || form.get("dataset");
    view! {
        <div class="grid">
            <Field form key="dataset_dir" label="dataset_dir"/>
            <div class="field" class:invalid=move || form.errors.with(|e| e.contains_key("dataset"))>
                <label for="f-eval-dataset">{i.t("dataset")}</label>
                <select id="f-eval-dataset" prop:value=chosen on:change=move |ev| form.set("dataset", event_target_value(&ev))>
                    <option value="">"—"</option>
                    {move || datasets.get().into_iter().map(|d| {
                        let n = d.name.clone();
                        view! { <option value=d.name.clone() selected=move || chosen() == n>{d.name.clone()}</option> }
                    }).collect_view()}
                </select>
                {move || form.errors.with(|e| e.get("dataset").cloned()).map(|m| view! { <p class="field-error" role="alert">{m}</p> })}
            </div>
            <Field form key="cutoff_len" label="cutoff_len" kind="number" min="4"/>
            <Field form key="max_samples" label="max_samples" kind="number" min="1"/>
            <Field form key="per_device_eval_batch_size" label="batch_size" kind="number" min="1"/>
            <Check form key="do_predict" label="predict"/>
            <Field form key="max_new_tokens" label="max_new_tokens" kind="number" min="8" max="4096"/>
            <Field form key="top_p" label="top_p" kind="number" min="0.01" max="1" step="0.01"/>
            <Field form key="temperature" label="temperature" kind="number" min="0.01" max="1.5" step="0.01"/>
            <Field form key="seed" label="seed" kind="number"/>
            <Field form key="output_dir" label="output_dir" placeholder="eval_<time>"/>
        </div>
        <div class="actions">
            <button on:click=on_preview>{i.t("preview_command")}</button>
            <button class="primary" data-testid="eval-start" disabled=busy on:click=on_start>{i.t("start")}</button>
            <button class="danger" disabled=move || !busy.get() on:click=on_abort>{i.t("abort")}</button>
        </div>
        {move || message.get().map(|m| view! { <p class="message" role="status">{m}</p> })}
        {move || command.get().map(|c| view! { <div class="command"><pre>{c.command.clone()}</pre><pre class="yaml">{c.yaml.clone()}</pre></div> })}
        <Progress view=view_/>
        {move || {
            let r = view_.result.get();
            (!r.is_empty()).then(|| view! {
                <h4>{i.t("metrics")}</h4>
                <table class="metrics" data-testid="eval-metrics">
                    <tbody>{r.into_iter().map(|(k, v)| view! { <tr><td>{k}</td><td>{v.to_string()}</td></tr> }).collect_view()}</tbody>
                </table>
            })
        }}
        {move || rows.get().map(|p| {
            let off = p.offset;
            let total = p.total;
            view! {
                <h4>{i.t("predictions")}" · "{format!("{}–{} / {}", off + 1, (off + p.rows.len() as u64).min(total), total)}</h4>
                <div class="table-wrap">
                    <table data-testid="predictions">
                        <thead><tr><th>{i.t("prompt")}</th><th>{i.t("predict_col")}</th><th>{i.t("label")}</th></tr></thead>
                        <tbody>{p.rows.into_iter().map(|r| {
                            let f = |k: &str| r.get(k).map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())).unwrap_or_default();
                            view! { <tr><td class="pre">{f("prompt")}</td><td class="pre">{f("predict")}</td><td class="pre">{f("label")}</td></tr> }
                        }).collect_view()}</tbody>
                    </table>
                </div>
                <div class="actions">
                    <button disabled=off == 0 on:click=move |_| load_rows(off.saturating_sub(10))>{i.t("prev")}</button>
                    <button disabled={off + 10 >= total} on:click=move |_| load_rows(off + 10)>{i.t("next")}</button>
                </div>
            }
        })}
        <LogTail view=view_/>
    }
    .into_any()
}
