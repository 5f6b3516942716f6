//! LlamaBoard: the web UI, rendered on the server and hydrated in the browser. The top bar holds
//! the model choice shared by the Train, Evaluate & Predict, Chat and Export tabs.

#![recursion_limit = "256"]

pub mod chart;
pub mod chat;
pub mod client;
pub mod eval;
pub mod export;
pub mod form;
pub mod i18n;
pub mod runview;
pub mod train;

use leptos::prelude::*;
use leptos::task::spawn_local;
use leptos_meta::*;
use leptos_router::components::{Route, Router, Routes};
use leptos_router::path;
use protocol::args::{Choice, FinetuningType, QuantizationMethod, RopeScalingType};
use protocol::run::{ChatStatus, CheckpointEntry, ModelEntry, Run, RunKind, RunStatus};
use serde_json::{Map, Value};

use client::{enc, get, send, ApiErr};
use form::{Form, Select};
use i18n::{I18n, Lang};
use runview::RunView;

pub fn shell(options: LeptosOptions) -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
                <link rel="icon" href="data:,"/>
                <link rel="stylesheet" href="/style.css"/>
                <HydrationScripts options/>
                <MetaTags/>
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}

#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    view! {
        <Title text="LlamaBoard"/>
        <Router>
            <Routes fallback=|| "Not found">
                <Route path=path!("/") view=Board/>
            </Routes>
        </Router>
    }
}

/// What every tab shares: the top bar's form, the catalog and the run views.
#[derive(Clone, Copy)]
pub struct Ctx {
    pub top: Form,
    pub models: RwSignal<Vec<ModelEntry>>,
    pub templates: RwSignal<Vec<String>>,
    pub checkpoints: RwSignal<Vec<CheckpointEntry>>,
    /// Why the top bar's template is the one it is (shown under it).
    pub template_reason: RwSignal<String>,
    pub train: RunView,
    pub eval: RunView,
    pub export: RunView,
    /// Bumped to make lists (runs, checkpoints) refresh.
    pub refresh: RwSignal<u64>,
}

pub fn use_ctx() -> Ctx {
    expect_context::<Ctx>()
}

impl Ctx {
    /// Takes a model's template (`""` for its own chat template) and the reason.
    fn apply_template(&self, m: &ModelEntry) {
        self.top
            .set("template", m.template.clone().unwrap_or_default());
        self.template_reason.set(m.template_reason.clone());
    }

    /// Makes `path` the top bar's model and its template follow: from the model list, or asked
    /// of the server for a typed path.
    pub fn follow_model(&self, path: String) {
        let ctx = *self;
        ctx.top.set("model_name_or_path", path.clone());
        let known = ctx
            .models
            .get_untracked()
            .into_iter()
            .find(|m| m.path == path);
        match known {
            Some(m) => ctx.apply_template(&m),
            None if !path.trim().is_empty() => spawn_local(async move {
                let url = format!("/api/models/info?model={}", enc(&path));
                match get::<ModelEntry>(&url).await {
                    Ok(m) => ctx.apply_template(&m),
                    Err(_) => ctx.template_reason.set(String::new()),
                }
            }),
            None => {}
        }
        ctx.load_checkpoints();
    }

    /// The top bar as run arguments: the checkpoint picker becomes `adapter_name_or_path` (LoRA)
    /// or replaces the model path (full / freeze); the booster becomes its flags.
    pub fn top_args(&self) -> Map<String, Value> {
        let t = self.top;
        let mut m = Map::new();
        let s = |v: String| Value::String(v);
        let ft = t.get_untracked("finetuning_type");
        m.insert(
            "model_name_or_path".into(),
            s(t.get_untracked("model_name_or_path")),
        );
        m.insert("finetuning_type".into(), s(ft.clone()));
        let ckpt = t.get_untracked("checkpoint");
        if !ckpt.is_empty() {
            if ft == FinetuningType::Lora.as_str() {
                m.insert("adapter_name_or_path".into(), s(ckpt));
            } else {
                m.insert("model_name_or_path".into(), s(ckpt));
            }
        }
        let tpl = t.get_untracked("template");
        if !tpl.is_empty() {
            m.insert("template".into(), s(tpl));
        }
        let bits = t.get_untracked("quantization_bit");
        if bits != "none" && !bits.is_empty() {
            m.insert("quantization_bit".into(), s(bits));
            m.insert(
                "quantization_method".into(),
                s(t.get_untracked("quantization_method")),
            );
        }
        let rope = t.get_untracked("rope_scaling");
        if rope != "none" && !rope.is_empty() {
            m.insert("rope_scaling".into(), s(rope));
        }
        match t.get_untracked("booster").as_str() {
            "flashattn2" => {
                m.insert("flash_attn".into(), s("fa2".into()));
            }
            "unsloth" => {
                m.insert("use_unsloth".into(), Value::Bool(true));
            }
            "liger_kernel" => {
                m.insert("enable_liger_kernel".into(), Value::Bool(true));
            }
            _ => {}
        }
        m
    }

    /// Shows an API error next to its field (in `forms` or the top bar), else returns it for the
    /// tab's message box.
    pub fn place_error(&self, e: &ApiErr, forms: &[Form]) -> Option<String> {
        if let Some(f) = &e.field {
            let field = match f.as_str() {
                "adapter_name_or_path" => "checkpoint",
                "eval_dataset" => "dataset",
                other => other,
            };
            for form in forms.iter().chain(std::iter::once(&self.top)) {
                if form.show_error(field, &e.message) {
                    return None;
                }
            }
        }
        Some(e.message.clone())
    }

    pub fn load_checkpoints(&self) {
        let ctx = *self;
        let model = self.top.get_untracked("model_name_or_path");
        let ft = self.top.get_untracked("finetuning_type");
        if model.is_empty() {
            return;
        }
        spawn_local(async move {
            let url = format!(
                "/api/checkpoints?model={}&finetuning_type={}",
                enc(&model),
                enc(&ft)
            );
            if let Ok(list) = get::<Vec<CheckpointEntry>>(&url).await {
                // A selection the new list lacks (another method's checkpoints) is dropped, as
                // LlamaBoard resets the dropdown when the fine-tuning method changes.
                let chosen = ctx.top.get_untracked("checkpoint");
                let kept: Vec<&str> = chosen
                    .split(',')
                    .filter(|c| list.iter().any(|e| e.path == *c))
                    .collect();
                if kept.join(",") != chosen {
                    ctx.top.set("checkpoint", kept.join(","));
                }
                ctx.checkpoints.set(list);
            }
        });
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Tab {
    Train,
    Eval,
    Chat,
    Export,
}

const TOP_DEFAULTS: &[(&str, &str)] = &[
    ("model_name_or_path", ""),
    ("finetuning_type", "lora"),
    ("checkpoint", ""),
    ("template", "default"),
    ("quantization_bit", "none"),
    ("quantization_method", "bnb"),
    ("rope_scaling", "none"),
    ("booster", "auto"),
];

#[component]
fn Board() -> impl IntoView {
    let lang = RwSignal::new(Lang::En);
    let i = I18n(lang);
    provide_context(i);
    let ctx = Ctx {
        top: Form::new("top", TOP_DEFAULTS),
        models: RwSignal::new(Vec::new()),
        templates: RwSignal::new(Vec::new()),
        checkpoints: RwSignal::new(Vec::new()),
        template_reason: RwSignal::new(String::new()),
        train: RunView::new(),
        eval: RunView::new(),
        export: RunView::new(),
        refresh: RwSignal::new(0),
    };
    provide_context(ctx);
    let tab = RwSignal::new(Tab::Train);
    let hydrated = RwSignal::new(false);

    // Runs only in the browser: load the catalog and settings, re-attach to active jobs.
    Effect::new(move |_| {
        hydrated.set(true);
        spawn_local(async move {
            let settings: Map<String, Value> = get("/api/settings").await.unwrap_or_default();
            if let Some(l) = settings
                .get("language")
                .and_then(Value::as_str)
                .and_then(Lang::parse)
            {
                lang.set(l);
            }
            if let Ok(t) = get::<Vec<String>>("/api/templates").await {
                ctx.templates.set(t);
            }
            let models: Vec<ModelEntry> = get("/api/models").await.unwrap_or_default();
            let last = settings
                .get("last_model")
                .and_then(Value::as_str)
                .map(str::to_string);
            ctx.models.set(models.clone());
            let runs: Vec<Run> = get("/api/runs?limit=50").await.unwrap_or_default();
            // The top bar shows the model in use: the chat's loaded model, else the running
            // run's, else the last one chosen, else the first listed.
            let chat: Option<ChatStatus> = get("/api/chat/status").await.ok();
            let chat = chat.filter(|c| matches!(c.state.as_str(), "loaded" | "loading"));
            let running = runs.iter().find(|r| {
                r.kind == RunKind::Train
                    && matches!(r.status, RunStatus::Queued | RunStatus::Running)
            });
            let in_use = |key: &str| -> Option<String> {
                running?.config.get(key)?.as_str().map(str::to_string)
            };
            let pick = chat
                .as_ref()
                .and_then(|c| c.model.clone())
                .or_else(|| in_use("model_name_or_path"))
                .or(last.filter(|l| !l.is_empty()))
                .or_else(|| models.first().map(|m| m.path.clone()));
            if let Some(p) = pick {
                ctx.follow_model(p);
            }
            if let Some(c) = &chat {
                if let Some(a) = &c.adapter {
                    ctx.top
                        .set("finetuning_type", FinetuningType::Lora.as_str());
                    ctx.top.set("checkpoint", a.clone());
                }
            } else if let Some(ft) = in_use("finetuning_type") {
                ctx.top.set("finetuning_type", ft);
            }
            for (kind, view) in [
                (RunKind::Train, ctx.train),
                (RunKind::Predict, ctx.eval),
                (RunKind::Export, ctx.export),
            ] {
                if let Some(r) = runs.iter().find(|r| {
                    r.kind == kind && matches!(r.status, RunStatus::Queued | RunStatus::Running)
                }) {
                    view.attach(r.id);
                }
            }
        });
    });

    let tab_button = move |t: Tab, key: &'static str| {
        view! {
            <button role="tab" class="tab" class:active=move || tab.get() == t
                aria-selected=move || (tab.get() == t).to_string()
                data-tab=key on:click=move |_| tab.set(t)>{i.t(key)}</button>
        }
    };
    view! {
        <header class="header">
            <div>
                <h1>{i.t("title")}</h1>
                <p class="muted">{i.t("subtitle")}</p>
            </div>
            <span id="hydrated" class="muted small-text" data-state=move || if hydrated.get() { "hydrated" } else { "ssr" }>
                {move || if hydrated.get() { i.tr("hydrated") } else { "" }}
            </span>
        </header>
        <TopBar/>
        <nav class="tabs" role="tablist">
            {tab_button(Tab::Train, "tab_train")}
            {tab_button(Tab::Eval, "tab_eval")}
            {tab_button(Tab::Chat, "tab_chat")}
            {tab_button(Tab::Export, "tab_export")}
        </nav>
        // Tabs stay mounted (hidden) so a running job's view keeps its state while you look elsewhere.
        <section class="panel" class:hidden=move || tab.get() != Tab::Train data-panel="train"><train::TrainTab/></section>
        <section class="panel" class:hidden=move || tab.get() != Tab::Eval data-panel="eval"><eval::EvalTab/></section>
        <section class="panel" class:hidden=move || tab.get() != Tab::Chat data-panel="chat"><chat::ChatTab/></section>
        <section class="panel" class:hidden=move || tab.get() != Tab::Export data-panel="export"><export::ExportTab/></section>
    }
}

#[component]
fn TopBar() -> impl IntoView {
    let i = use_i18n_ctx();
    let ctx = use_ctx();
    let top = ctx.top;
    let set_lang = move |code: String| {
        if let Some(l) = Lang::parse(&code) {
            i.0.set(l);
            spawn_local(async move {
                let body = serde_json::json!({"language": code});
                let _: Result<Value, _> = send("PUT", "/api/settings", &body).await;
            });
        }
    };
    let choose_model = move |path: String| {
        top.set("checkpoint", "");
        ctx.follow_model(path.clone());
        spawn_local(async move {
            let body = serde_json::json!({"last_model": path});
            let _: Result<Value, _> = send("PUT", "/api/settings", &body).await;
        });
    };
    Effect::new(move |_| {
        ctx.refresh.get();
        top.get("finetuning_type");
        ctx.load_checkpoints();
    });
    view! {
        <div class="topbar grid">
            <div class="field">
                <label for="f-lang">{i.t("lang")}</label>
                <select id="f-lang" prop:value=move || i.0.get().code() on:change=move |ev| set_lang(event_target_value(&ev))>
                    <option value="en" selected=move || i.0.get() == Lang::En>"English"</option>
                    <option value="zh" selected=move || i.0.get() == Lang::Zh>"中文"</option>
                </select>
            </div>
            <div class="field">
                <label for="f-model">{i.t("model")}</label>
                <select id="f-model" prop:value=move || top.get("model_name_or_path")
                    on:change=move |ev| choose_model(event_target_value(&ev))>
                    <option value="">"—"</option>
                    {move || ctx.models.get().into_iter().map(|m| {
                        let p = m.path.clone();
                        let label = format!("{} ({})", m.name, m.source);
                        view! { <option value=p.clone() selected=move || top.get("model_name_or_path") == p>{label}</option> }
                    }).collect_view()}
                </select>
            </div>
            <div class="field" class:invalid=move || top.errors.with(|e| e.contains_key("model_name_or_path"))>
                <label for="f-top-model_name_or_path">{i.t("model_path")}</label>
                // A typed path takes effect when the field is left: its template follows.
                <input id="f-top-model_name_or_path" name="model_name_or_path" placeholder="models/demo"
                    prop:value=move || top.get("model_name_or_path")
                    on:change=move |ev| {
                        top.set("checkpoint", "");
                        ctx.follow_model(event_target_value(&ev).trim().to_string());
                    }/>
                {move || top.errors.with(|e| e.get("model_name_or_path").cloned()).map(|m| view! { <p class="field-error" role="alert" data-field="model_name_or_path">{m}</p> })}
            </div>
            <Select form=top key="finetuning_type" label="finetuning_type"
                options={form::choices::<FinetuningType>()}/>
            <div class="field" class:invalid=move || top.errors.with(|e| e.contains_key("checkpoint"))>
                <label for="f-checkpoint">{i.t("checkpoint")}</label>
                // LoRA adapters stack, so several can be chosen (comma-joined, like LlamaBoard).
                <select id="f-checkpoint" name="checkpoint"
                    multiple=move || top.get("finetuning_type") == FinetuningType::Lora.as_str()
                    on:change=move |ev| top.set("checkpoint", selected_values(&ev))>
                    <option value="" selected=move || top.get("checkpoint").is_empty()>{i.t("none")}</option>
                    {move || ctx.checkpoints.get().into_iter().map(|c| {
                        let p = c.path.clone();
                        view! { <option value=p.clone() selected=move || top.get("checkpoint").split(',').any(|x| x == p)>{c.name}</option> }
                    }).collect_view()}
                </select>
                {move || top.errors.with(|e| e.get("checkpoint").cloned()).map(|m| view! { <p class="field-error" role="alert">{m}</p> })}
            </div>
            <div class="field">
                <label for="f-template">{i.t("template")}</label>
                <select id="f-template" name="template" prop:value=move || top.get("template")
                    on:change=move |ev| {
                        top.set("template", event_target_value(&ev));
                        ctx.template_reason.set(String::new());
                    }>
                    <option value="" selected=move || top.get("template").is_empty()>{i.t("template_own")}</option>
                    {move || ctx.templates.get().into_iter().map(|t| {
                        let v = t.clone();
                        let shown = t.clone();
                        view! { <option value=t selected=move || top.get("template") == v>{shown}</option> }
                    }).collect_view()}
                </select>
                <p class="muted small-text" data-testid="template-reason">{move || ctx.template_reason.get()}</p>
            </div>
            <Select form=top key="quantization_bit" label="quantization_bit"
                options=vec![("none", "none"), ("8", ""), ("6", ""), ("5", ""), ("4", ""), ("3", ""), ("2", "")]/>
            <Select form=top key="quantization_method" label="quantization_method"
                options={QuantizationMethod::ALL.iter().filter(|m| m.supported()).map(|m| (m.as_str(), "")).collect::<Vec<_>>()}
                disabled=Signal::derive(move || top.get("quantization_bit") == "none")/>
            <Select form=top key="rope_scaling" label="rope_scaling"
                options={[("none", "none")].into_iter().chain(form::choices::<RopeScalingType>()).collect::<Vec<_>>()}/>
            <Select form=top key="booster" label="booster"
                options=vec![("auto", ""), ("flashattn2", ""), ("unsloth", ""), ("liger_kernel", "")]/>
        </div>
    }
}

/// Keeps `datasets` in step with the form's `dataset_dir` (those `keep` accepts); a dir that is
/// not a dataset dir shows its error under the field.
pub fn watch_datasets(
    form: Form,
    datasets: RwSignal<Vec<protocol::run::DatasetEntry>>,
    keep: fn(&protocol::run::DatasetEntry) -> bool,
) {
    Effect::new(move |_| {
        let dir = form.get("dataset_dir");
        spawn_local(async move {
            let url = format!("/api/datasets?dataset_dir={}", enc(&dir));
            match get::<Vec<protocol::run::DatasetEntry>>(&url).await {
                Ok(list) => {
                    form.errors.update(|e| {
                        e.remove("dataset_dir");
                    });
                    datasets.set(list.into_iter().filter(keep).collect());
                }
                Err(e) => {
                    datasets.set(Vec::new());
                    form.show_error("dataset_dir", &e.message);
                }
            }
        });
    });
}

/// The chosen values of a (possibly multiple) select, comma-joined, empty ones dropped.
fn selected_values(ev: &leptos::ev::Event) -> String {
    #[cfg(feature = "hydrate")]
    {
        use wasm_bindgen::JsCast;
        let Some(sel) = ev
            .target()
            .and_then(|t| t.dyn_into::<web_sys::HtmlSelectElement>().ok())
        else {
            return String::new();
        };
        let opts = sel.selected_options();
        (0..opts.length())
            .filter_map(|i| opts.item(i))
            .filter_map(|e| e.dyn_into::<web_sys::HtmlOptionElement>().ok())
            .map(|o| o.value())
            .filter(|v| !v.is_empty())
            .collect::<Vec<_>>()
            .join(",")
    }
    #[cfg(not(feature = "hydrate"))]
    {
        let _ = ev;
        String::new()
    }
}

/// The last component of a path, for tables.
pub fn short(path: &str) -> String {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(path)
        .to_string()
}

fn use_i18n_ctx() -> I18n {
    i18n::use_i18n()
}

#[cfg(feature = "hydrate")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(App);
}

#[cfg(test)]
mod tests {
    /// Every label the page asks for has an entry in both languages.
    #[test]
    fn every_used_label_is_translated() {
        let sources = [
            include_str!("lib.rs"),
            include_str!("train.rs"),
            include_str!("eval.rs"),
            include_str!("chat.rs"),
            include_str!("export.rs"),
            include_str!("form.rs"),
            include_str!("runview.rs"),
            include_str!("chart.rs"),
        ];
        let mut used = Vec::new();
        for src in sources {
            for pat in ["i.t(\"", "i.tr(\"", "i.now(\"", "label=\""] {
                for part in src.split(pat).skip(1) {
                    if let Some(end) = part.find('"') {
                        used.push(part[..end].to_string());
                    }
                }
            }
        }
        assert!(used.len() > 50, "found only {} labels", used.len());
        for k in used {
            assert!(
                super::i18n::TABLE.iter().any(|(key, _, _)| *key == k),
                "label `{k}` has no translation"
            );
        }
    }
}
