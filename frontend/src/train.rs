//! The Train tab: every LlamaBoard training control our trainer supports, Preview command,
//! Save / Load arguments, Start / Abort, live progress, loss chart and log, and the run history
//! with overlaid curves and config diffs.

use std::collections::{BTreeMap, BTreeSet};

use leptos::prelude::*;
use leptos::task::spawn_local;
use protocol::args::{
    BadamMode, BadamSwitchMode, Choice, FinetuningType, PrefLossType, RewardModelType,
    SchedulerType, Stage,
};
use protocol::run::{
    ArgSet, CommandPreview, Created, DatasetEntry, DatasetPage, MetricPoint, Run, RunKind,
    RunStatus,
};
use serde_json::{Map, Value};

use crate::chart::{LossChart, Overlay};
use crate::client::{enc, get, send};
use crate::form::{choices, hms, Check, Field, Form, Group, Select};
use crate::i18n::use_i18n;
use crate::runview::{LogTail, Progress};
use crate::use_ctx;

pub const TRAIN_DEFAULTS: &[(&str, &str)] = &[
    ("stage", "sft"),
    ("dataset_dir", "data"),
    ("dataset", ""),
    ("learning_rate", "5e-5"),
    ("num_train_epochs", "3.0"),
    ("max_grad_norm", "1.0"),
    ("seed", "42"),
    ("max_samples", "100000"),
    ("compute_type", "fp32"),
    ("cutoff_len", "2048"),
    ("per_device_train_batch_size", "2"),
    ("nproc_per_node", "1"),
    ("gradient_accumulation_steps", "8"),
    ("val_size", "0"),
    ("lr_scheduler_type", "cosine"),
    ("logging_steps", "5"),
    ("save_steps", "100"),
    ("warmup_steps", "0"),
    ("neftune_noise_alpha", "0"),
    ("packing", "false"),
    ("neat_packing", "false"),
    ("train_on_prompt", "false"),
    ("mask_history", "false"),
    ("resize_vocab", "false"),
    ("use_llama_pro", "false"),
    ("shift_attn", "false"),
    ("report_to", "none"),
    ("enable_thinking", "true"),
    ("gradient_checkpointing", "false"),
    ("freeze_vision_tower", "true"),
    ("freeze_multi_modal_projector", "true"),
    ("freeze_language_model", "false"),
    ("image_max_pixels", "589824"),
    ("image_min_pixels", "1024"),
    ("freeze_trainable_layers", "2"),
    ("freeze_trainable_modules", "all"),
    ("freeze_extra_modules", ""),
    ("use_badam", "false"),
    ("badam_mode", "layer"),
    ("badam_switch_mode", "ascending"),
    ("badam_switch_interval", "50"),
    ("badam_update_ratio", "0.05"),
    ("use_apollo", "false"),
    ("apollo_rank", "16"),
    ("apollo_update_interval", "200"),
    ("apollo_scale", "32"),
    ("apollo_target", "all"),
    ("use_galore", "false"),
    ("galore_rank", "16"),
    ("galore_update_interval", "200"),
    ("galore_scale", "2"),
    ("galore_target", "all"),
    ("lora_rank", "8"),
    ("lora_alpha", "16"),
    ("lora_dropout", "0"),
    ("loraplus_lr_ratio", "0"),
    ("create_new_adapter", "false"),
    ("use_rslora", "false"),
    ("use_dora", "false"),
    ("use_pissa", "false"),
    ("lora_target", ""),
    ("additional_target", ""),
    ("pref_beta", "0.1"),
    ("pref_ftx", "0"),
    ("pref_loss", "sigmoid"),
    ("simpo_gamma", "0.5"),
    ("reward_model", ""),
    ("ppo_score_norm", "false"),
    ("ppo_whiten_rewards", "false"),
    ("max_new_tokens", "1024"),
    ("output_dir", ""),
    ("config_name", ""),
];

/// Which datasets a stage can use, like LlamaBoard's filter (pairwise data for rm / dpo).
pub fn dataset_fits(stage: Stage, d: &DatasetEntry) -> bool {
    match stage {
        Stage::Rm | Stage::Dpo => d.ranking,
        Stage::Kto => d.kind == "kto",
        Stage::Sft | Stage::Pt | Stage::Ppo => !d.ranking && d.kind != "kto",
    }
}

/// The stage the form holds (its default when the text is not one).
fn stage_of(form: &Form, tracked: bool) -> Stage {
    let text = if tracked {
        form.get("stage")
    } else {
        form.get_untracked("stage")
    };
    Stage::parse(&text).unwrap_or(Stage::Sft)
}

/// LlamaBoard's label of a stage (an i18n key).
fn stage_label(s: Stage) -> &'static str {
    match s {
        Stage::Sft => "stage_sft",
        Stage::Rm => "stage_rm",
        Stage::Dpo => "stage_dpo",
        Stage::Kto => "stage_kto",
        Stage::Ppo => "stage_ppo",
        Stage::Pt => "stage_pt",
    }
}

/// The Train form as run arguments, with LlamaBoard's derived keys.
pub fn train_args(top: Map<String, Value>, form: &Form) -> Map<String, Value> {
    let mut m = top;
    let mut own = form.to_json();
    own.remove("config_name");
    let stage = stage_of(form, false);
    match own
        .remove("compute_type")
        .and_then(|v| v.as_str().map(str::to_string))
        .as_deref()
    {
        Some("bf16") => {
            m.insert("bf16".into(), Value::Bool(true));
        }
        Some("fp16") => {
            m.insert("fp16".into(), Value::Bool(true));
        }
        Some("pure_bf16") => {
            m.insert("pure_bf16".into(), Value::Bool(true));
        }
        _ => {}
    }
    // These keys go only where they differ from LLaMA-Factory's defaults (a text model then
    // says that a changed multimodal key has no effect).
    for (k, default) in [
        ("freeze_vision_tower", "true"),
        ("freeze_multi_modal_projector", "true"),
        ("freeze_language_model", "false"),
        ("image_max_pixels", "589824"),
        ("image_min_pixels", "1024"),
        ("report_to", "none"),
        ("use_llama_pro", "false"),
        ("shift_attn", "false"),
    ] {
        if own.get(k).and_then(Value::as_str) == Some(default) {
            own.remove(k);
        }
    }
    // As LlamaBoard's runner: one PiSSA box sets PiSSA's initialization and its conversion
    // of the saved adapter; unchecked boxes stay out of the arguments.
    if own
        .remove("use_pissa")
        .and_then(|v| v.as_str().map(str::to_string))
        .as_deref()
        == Some("true")
    {
        own.insert("pissa_init".into(), Value::String("true".into()));
        own.insert("pissa_convert".into(), Value::String("true".into()));
    }
    // A method's keys go only with the method on, as LlamaBoard's runner passes them.
    let methods: [&[&str]; 3] = [
        &[
            "use_badam",
            "badam_mode",
            "badam_switch_mode",
            "badam_switch_interval",
            "badam_update_ratio",
        ],
        &[
            "use_apollo",
            "apollo_rank",
            "apollo_update_interval",
            "apollo_scale",
            "apollo_target",
        ],
        &[
            "use_galore",
            "galore_rank",
            "galore_update_interval",
            "galore_scale",
            "galore_target",
        ],
    ];
    for keys in methods {
        if own.get(keys[0]).and_then(Value::as_str) != Some("true") {
            for k in keys {
                own.remove(*k);
            }
        }
    }
    for zero_is_none in ["neftune_noise_alpha", "loraplus_lr_ratio"] {
        if own
            .get(zero_is_none)
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<f64>().ok())
            == Some(0.0)
        {
            own.remove(zero_is_none);
        }
    }
    let ft = m
        .get("finetuning_type")
        .and_then(Value::as_str)
        .and_then(FinetuningType::parse)
        .unwrap_or(FinetuningType::Lora);
    let group_keys: &[(FinetuningType, &[&str])] = &[
        (
            FinetuningType::Freeze,
            &[
                "freeze_trainable_layers",
                "freeze_trainable_modules",
                "freeze_extra_modules",
            ],
        ),
        (
            FinetuningType::Lora,
            &[
                "lora_rank",
                "lora_alpha",
                "lora_dropout",
                "loraplus_lr_ratio",
                "create_new_adapter",
                "use_rslora",
                "use_dora",
                "pissa_init",
                "pissa_convert",
                "lora_target",
                "additional_target",
            ],
        ),
    ];
    for (method, keys) in group_keys {
        if *method != ft {
            for k in *keys {
                own.remove(*k);
            }
        }
    }
    if !matches!(stage, Stage::Dpo | Stage::Kto) {
        for k in ["pref_beta", "pref_ftx", "pref_loss", "simpo_gamma"] {
            own.remove(k);
        }
    }
    if stage == Stage::Ppo {
        // As LlamaBoard's runner: the reward model's type follows the method, and sampling
        // uses nucleus sampling without a top-k cut.
        let kind = if ft == FinetuningType::Lora {
            RewardModelType::Lora
        } else {
            RewardModelType::Full
        };
        own.insert("reward_model_type".into(), kind.as_str().into());
        own.insert("top_k".into(), "0".into());
        own.insert("top_p".into(), "0.9".into());
    } else {
        for k in [
            "reward_model",
            "ppo_score_norm",
            "ppo_whiten_rewards",
            "max_new_tokens",
        ] {
            own.remove(k);
        }
    }
    let val: f64 = form.get_untracked("val_size").parse().unwrap_or(0.0);
    if val > 1e-6 {
        own.insert("eval_strategy".into(), "steps".into());
        own.insert(
            "eval_steps".into(),
            Value::String(form.get_untracked("save_steps")),
        );
        own.insert(
            "per_device_eval_batch_size".into(),
            Value::String(form.get_untracked("per_device_train_batch_size")),
        );
    } else {
        own.remove("val_size");
    }
    own.insert("plot_loss".into(), Value::Bool(true));
    m.extend(own);
    m
}

#[component]
pub fn TrainTab() -> impl IntoView {
    let i = use_i18n();
    let ctx = use_ctx();
    let form = Form::new("train", TRAIN_DEFAULTS);
    let view_ = ctx.train;
    let message = RwSignal::new(None::<String>);
    let command = RwSignal::new(None::<CommandPreview>);
    let datasets = RwSignal::new(Vec::<DatasetEntry>::new());
    let preview = RwSignal::new(None::<DatasetPage>);
    let arg_sets = RwSignal::new(Vec::<ArgSet>::new());
    let busy = Signal::derive(move || view_.is_active());

    crate::watch_datasets(form, datasets, |_| true);
    let load_arg_sets = move || {
        spawn_local(async move {
            if let Ok(sets) = get::<Vec<ArgSet>>("/api/arg-sets").await {
                arg_sets.set(sets);
            }
        })
    };
    Effect::new(move |_| load_arg_sets());

    let chosen = move || -> BTreeSet<String> {
        form.get("dataset")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    let toggle = move |name: String, on: bool| {
        let mut set = chosen();
        if on {
            set.insert(name);
        } else {
            set.remove(&name);
        }
        form.set("dataset", set.into_iter().collect::<Vec<_>>().join(","));
    };
    let open_preview = move |name: String, offset: u64| {
        let dir = form.get_untracked("dataset_dir");
        spawn_local(async move {
            let url = format!(
                "/api/datasets/{}/preview?dataset_dir={}&offset={offset}&limit=2",
                enc(&name),
                enc(&dir)
            );
            match get::<DatasetPage>(&url).await {
                Ok(p) => preview.set(Some(p)),
                Err(e) => message.set(Some(e.message)),
            }
        });
    };
    let args = move || train_args(ctx.top_args(), &form);
    let report = move |e: crate::client::ApiErr| {
        message.set(ctx.place_error(&e, &[form]));
    };
    let on_preview = move |_| {
        form.clear_errors();
        ctx.top.clear_errors();
        let body = args();
        spawn_local(async move {
            match send::<_, CommandPreview>("POST", "/api/preview-command", &body).await {
                Ok(c) => {
                    message.set(None);
                    command.set(Some(c));
                }
                Err(e) => report(e),
            }
        });
    };
    let on_start = move |_| {
        form.clear_errors();
        ctx.top.clear_errors();
        message.set(None);
        if ctx.top.get_untracked("model_name_or_path").is_empty() {
            ctx.top
                .show_error("model_name_or_path", i.now("err_no_model"));
            return;
        }
        if form.get_untracked("dataset").is_empty() {
            form.show_error("dataset", i.now("err_no_dataset"));
            return;
        }
        if stage_of(&form, false) == Stage::Ppo && form.get_untracked("reward_model").is_empty() {
            form.show_error("reward_model", i.now("err_no_reward_model"));
            return;
        }
        let body = args();
        spawn_local(async move {
            match send::<_, Created>("POST", "/api/runs", &body).await {
                Ok(c) => {
                    view_.attach(c.id);
                    ctx.refresh.update(|n| *n += 1);
                }
                Err(e) => report(e),
            }
        });
    };
    let on_abort = move |_| view_.abort(message);
    let on_save = move |_| {
        let name = form.get_untracked("config_name");
        if name.trim().is_empty() {
            form.show_error("config_name", i.now("config_name"));
            return;
        }
        // Saved as the run would see it, so a loaded set is also a valid `POST /api/runs` body.
        let run_config = train_args(ctx.top_args(), &form);
        let body = serde_json::json!({"name": name, "config": run_config});
        spawn_local(async move {
            match send::<_, Value>("POST", "/api/arg-sets", &body).await {
                Ok(_) => {
                    message.set(Some(i.now("saved").into()));
                    load_arg_sets();
                }
                Err(e) => report(e),
            }
        });
    };
    let on_load = move |name: String| {
        if let Some(set) = arg_sets
            .get_untracked()
            .into_iter()
            .find(|s| s.name == name)
        {
            ctx.top.load(&set.config);
            form.load(&set.config);
            form.set("config_name", name);
            message.set(Some(i.now("loaded").into()));
        }
    };
    // A run that ends refreshes the checkpoint list and the history.
    Effect::new(move |_| {
        if view_.finished.get() > 0 {
            ctx.refresh.update(|n| *n += 1);
        }
    });

    let stage_options: Vec<(&str, &str)> = Stage::ALL
        .iter()
        .map(|s| (s.as_str(), stage_label(*s)))
        .collect();
    view! {
        <div class="grid">
            <Select form key="stage" label="stage" options=stage_options disabled=busy/>
            <Field form key="dataset_dir" label="dataset_dir" disabled=busy/>
        </div>
        <div class="field datasets" class:invalid=move || form.errors.with(|e| e.contains_key("dataset"))>
            <span class="label">{i.t("dataset")}</span>
            <div class="chips" data-testid="datasets">
                {move || {
                    let stage = stage_of(&form, true);
                    let list: Vec<DatasetEntry> = datasets.get().into_iter().filter(|d| dataset_fits(stage, d)).collect();
                    if list.is_empty() {
                        return view! { <span class="muted">{i.t("no_datasets")}</span> }.into_any();
                    }
                    list.into_iter().map(|d| {
                        let name = d.name.clone();
                        let n2 = name.clone();
                        let checked = move || chosen().contains(&n2);
                        view! {
                            <span class="chip">
                                <label>
                                    <input type="checkbox" name="dataset" value=name.clone() prop:checked=checked
                                        on:change=move |ev| toggle(name.clone(), event_target_checked(&ev))/>
                                    {d.name.clone()}
                                </label>
                            </span>
                        }
                    }).collect_view().into_any()
                }}
            </div>
            {move || form.errors.with(|e| e.get("dataset").cloned()).map(|m| view! { <p class="field-error" role="alert" data-field="dataset">{m}</p> })}
            <div>
                // Like LlamaBoard: previews the first chosen dataset, two rows a page.
                <button class="small" data-testid="preview-dataset" disabled=move || chosen().is_empty()
                    on:click=move |_| if let Some(first) = chosen().into_iter().next() { open_preview(first, 0) }>
                    {i.t("preview_dataset")}
                </button>
            </div>
        </div>
        {move || preview.get().map(|p| {
            let name = p.name.clone();
            let n2 = name.clone();
            let off = p.offset;
            let total = p.total;
            view! {
                <div class="modal" role="dialog" aria-modal="true" data-testid="dataset-preview">
                    <div class="modal-box">
                        <h3>{p.name.clone()}" · "{format!("{}–{} / {}", off + 1, (off + p.rows.len() as u64).min(total), total)}</h3>
                        <pre class="json">{p.rows.iter().map(|r| serde_json::to_string_pretty(r).unwrap_or_default()).collect::<Vec<_>>().join("\n\n")}</pre>
                        <div class="thumbs" data-testid="dataset-images">
                            {p.images.iter().flatten().map(|url| view! { <img class="thumb-img" src=url.clone() alt="" loading="lazy"/> }).collect_view()}
                        </div>
                        <div class="actions">
                            <button disabled=off == 0 on:click=move |_| open_preview(name.clone(), off.saturating_sub(2))>{i.t("prev")}</button>
                            <button disabled={off + 2 >= total} on:click=move |_| open_preview(n2.clone(), off + 2)>{i.t("next")}</button>
                            <button on:click=move |_| preview.set(None)>{i.t("close")}</button>
                        </div>
                    </div>
                </div>
            }
        })}
        <div class="grid">
            <Field form key="learning_rate" label="learning_rate"/>
            <Field form key="num_train_epochs" label="num_train_epochs"/>
            <Field form key="max_grad_norm" label="max_grad_norm"/>
            <Field form key="seed" label="seed" kind="number"/>
            <Field form key="max_samples" label="max_samples" kind="number" min="1"/>
            <Select form key="compute_type" label="compute_type" options=vec![("fp32", ""), ("bf16", ""), ("fp16", ""), ("pure_bf16", "")]/>
            <Field form key="cutoff_len" label="cutoff_len" kind="number" min="4" max="131072"/>
            <Field form key="per_device_train_batch_size" label="batch_size" kind="number" min="1" max="1024"/>
            <Field form key="gradient_accumulation_steps" label="gradient_accumulation_steps" kind="number" min="1" max="1024"/>
            <Field form key="nproc_per_node" label="nproc_per_node" kind="number" min="1" max="64"/>
            <Field form key="val_size" label="val_size" kind="number" min="0" max="1" step="0.001"/>
            <Select form key="lr_scheduler_type" label="lr_scheduler_type" options={choices::<SchedulerType>()}/>
        </div>
        <Group label="extra_group" form keys=&["logging_steps", "save_steps", "warmup_steps", "neftune_noise_alpha", "packing", "neat_packing", "train_on_prompt", "mask_history", "resize_vocab", "use_llama_pro", "shift_attn", "report_to", "enable_thinking", "gradient_checkpointing"]>
            <Field form key="logging_steps" label="logging_steps" kind="number" min="1"/>
            <Field form key="save_steps" label="save_steps" kind="number" min="1"/>
            <Field form key="warmup_steps" label="warmup_steps" kind="number" min="0"/>
            <Field form key="neftune_noise_alpha" label="neftune_alpha" kind="number" min="0" step="0.1"/>
            <Check form key="packing" label="packing"/>
            <Check form key="neat_packing" label="neat_packing"/>
            <Check form key="train_on_prompt" label="train_on_prompt"/>
            <Check form key="mask_history" label="mask_history"/>
            <Check form key="resize_vocab" label="resize_vocab"/>
            <Check form key="use_llama_pro" label="use_llama_pro"/>
            <Check form key="shift_attn" label="shift_attn"/>
            <Select form key="report_to" label="report_to" options=vec![("none", ""), ("tensorboard", ""), ("mlflow", ""), ("wandb", ""), ("all", "")]/>
            <Check form key="enable_thinking" label="enable_thinking"/>
            <Check form key="gradient_checkpointing" label="gradient_checkpointing"/>
        </Group>
        <Group label="mm_group" form keys=&["freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model", "image_max_pixels", "image_min_pixels"]>
            <Check form key="freeze_vision_tower" label="freeze_vision_tower"/>
            <Check form key="freeze_multi_modal_projector" label="freeze_multi_modal_projector"/>
            <Check form key="freeze_language_model" label="freeze_language_model"/>
            <Field form key="image_max_pixels" label="image_max_pixels" kind="number" min="1"/>
            <Field form key="image_min_pixels" label="image_min_pixels" kind="number" min="1"/>
        </Group>
        <Group label="freeze_group" form keys=&["freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"]>
            <Field form key="freeze_trainable_layers" label="freeze_trainable_layers" kind="number"/>
            <Field form key="freeze_trainable_modules" label="freeze_trainable_modules"/>
            <Field form key="freeze_extra_modules" label="freeze_extra_modules"/>
        </Group>
        <Group label="galore_group" form keys=&["use_galore", "galore_rank", "galore_update_interval", "galore_scale", "galore_target"]>
            <Check form key="use_galore" label="use_galore"/>
            <Field form key="galore_rank" label="galore_rank" kind="number" min="1" max="1024"/>
            <Field form key="galore_update_interval" label="galore_update_interval" kind="number" min="1" max="2048"/>
            <Field form key="galore_scale" label="galore_scale" kind="number" min="0" max="100" step="0.01"/>
            <Field form key="galore_target" label="galore_target"/>
        </Group>
        <Group label="apollo_group" form keys=&["use_apollo", "apollo_rank", "apollo_update_interval", "apollo_scale", "apollo_target"]>
            <Check form key="use_apollo" label="use_apollo"/>
            <Field form key="apollo_rank" label="apollo_rank" kind="number" min="1" max="1024"/>
            <Field form key="apollo_update_interval" label="apollo_update_interval" kind="number" min="1" max="2048"/>
            <Field form key="apollo_scale" label="apollo_scale" kind="number" min="0" max="100" step="0.01"/>
            <Field form key="apollo_target" label="apollo_target"/>
        </Group>
        <Group label="badam_group" form keys=&["use_badam", "badam_mode", "badam_switch_mode", "badam_switch_interval", "badam_update_ratio"]>
            <Check form key="use_badam" label="use_badam"/>
            <Select form key="badam_mode" label="badam_mode" options={choices::<BadamMode>()}/>
            <Select form key="badam_switch_mode" label="badam_switch_mode" options={choices::<BadamSwitchMode>()}/>
            <Field form key="badam_switch_interval" label="badam_switch_interval" kind="number" min="1" max="1024"/>
            <Field form key="badam_update_ratio" label="badam_update_ratio" kind="number" min="0" max="1" step="0.01"/>
        </Group>
        <Group label="lora_group" form keys=&["lora_rank", "lora_alpha", "lora_dropout", "loraplus_lr_ratio", "create_new_adapter", "use_rslora", "use_dora", "use_pissa", "lora_target", "additional_target"]>
            <Field form key="lora_rank" label="lora_rank" kind="number" min="1" max="1024"/>
            <Field form key="lora_alpha" label="lora_alpha" kind="number" min="1" max="2048"/>
            <Field form key="lora_dropout" label="lora_dropout" kind="number" min="0" max="1" step="0.01"/>
            <Field form key="loraplus_lr_ratio" label="loraplus_lr_ratio" kind="number" min="0" max="64" step="0.01"/>
            <Check form key="create_new_adapter" label="create_new_adapter"/>
            <Check form key="use_rslora" label="use_rslora"/>
            <Check form key="use_dora" label="use_dora"/>
            <Check form key="use_pissa" label="use_pissa"/>
            <Field form key="lora_target" label="lora_target" placeholder="all"/>
            <Field form key="additional_target" label="additional_target"/>
        </Group>
        <Group label="rlhf_group" form keys=&["pref_beta", "pref_ftx", "pref_loss", "simpo_gamma", "max_new_tokens", "ppo_score_norm", "ppo_whiten_rewards", "reward_model"]>
            <Field form key="pref_beta" label="pref_beta" kind="number" min="0" max="1" step="0.01"/>
            <Field form key="pref_ftx" label="pref_ftx" kind="number" min="0" max="10" step="0.01"/>
            <Select form key="pref_loss" label="pref_loss" options={choices::<PrefLossType>()}/>
            <Field form key="simpo_gamma" label="simpo_gamma" kind="number" step="0.1"/>
            <div class="field" class:invalid=move || form.errors.with(|e| e.contains_key("reward_model"))>
                <label for="f-train-reward_model">{i.t("reward_model")}</label>
                <select id="f-train-reward_model" name="reward_model"
                    prop:value=move || form.get("reward_model")
                    on:change=move |ev| form.set("reward_model", event_target_value(&ev))>
                    <option value="" selected=move || form.get("reward_model").is_empty()>{i.t("none")}</option>
                    {move || ctx.checkpoints.get().into_iter().filter(|c| c.reward_model).map(|c| {
                        let p = c.path.clone();
                        view! { <option value=p.clone() selected=move || form.get("reward_model") == p>{c.name}</option> }
                    }).collect_view()}
                </select>
                {move || form.errors.with(|e| e.get("reward_model").cloned()).map(|m| view! { <p class="field-error" role="alert" data-field="reward_model">{m}</p> })}
            </div>
            <Field form key="max_new_tokens" label="ppo_max_new_tokens" kind="number" min="1" max="4096"/>
            <Check form key="ppo_score_norm" label="ppo_score_norm"/>
            <Check form key="ppo_whiten_rewards" label="ppo_whiten_rewards"/>
        </Group>
        <div class="grid">
            <Field form key="output_dir" label="output_dir" placeholder="train_<time>" disabled=busy/>
            <Field form key="config_name" label="config_name" placeholder="my_config"/>
            <div class="field">
                <label for="f-argset">{i.t("load_args")}</label>
                <select id="f-argset" on:change=move |ev| on_load(event_target_value(&ev))>
                    <option value="">{move || if arg_sets.get().is_empty() { i.tr("no_arg_sets") } else { "—" }}</option>
                    {move || arg_sets.get().into_iter().map(|s| view! { <option value=s.name.clone()>{s.name.clone()}</option> }).collect_view()}
                </select>
            </div>
        </div>
        <div class="actions">
            <button on:click=on_preview>{i.t("preview_command")}</button>
            <button on:click=on_save>{i.t("save_args")}</button>
            <button class="primary" data-testid="start" disabled=busy on:click=on_start>{i.t("start")}</button>
            <button class="danger" data-testid="abort" disabled=move || !busy.get() on:click=on_abort>{i.t("abort")}</button>
        </div>
        {move || message.get().map(|m| view! { <p class="message" role="status" data-testid="train-message">{m}</p> })}
        {move || command.get().map(|c| view! {
            <div class="command" data-testid="command">
                <pre>{c.command.clone()}</pre>
                <pre class="yaml">{c.yaml.clone()}</pre>
                {c.memory.map(|m| {
                    let gib = |b: u64| format!("{:.2}", b as f64 / (1u64 << 30) as f64);
                    view! {
                        <p class="muted" data-testid="memory-estimate">
                            {i.t("memory_estimate")} ": " {gib(m.total)} " GiB ("
                            {i.t("memory_weights")} " " {gib(m.weights)} ", "
                            {i.t("memory_training")} " " {gib(m.training_state)} ", "
                            {i.t("memory_activations")} " " {gib(m.activations)} ")"
                        </p>
                    }
                })}
            </div>
        })}
        <Progress view=view_/>
        <History/>
        <LogTail view=view_/>
    }
    .into_any()
}

/// Run history from the registry: select runs to overlay their curves and diff their configs.
#[component]
fn History() -> impl IntoView {
    let i = use_i18n();
    let ctx = use_ctx();
    let runs = RwSignal::new(Vec::<Run>::new());
    let selected = RwSignal::new(BTreeSet::<i64>::new());
    let curves = RwSignal::new(BTreeMap::<i64, Vec<MetricPoint>>::new());
    Effect::new(move |_| {
        ctx.refresh.get();
        ctx.train.finished.get();
        spawn_local(async move {
            if let Ok(list) = get::<Vec<Run>>("/api/runs?kind=train&limit=100").await {
                runs.set(list);
            }
        });
    });
    let toggle = move |id: i64, on: bool| {
        selected.update(|s| {
            if on {
                s.insert(id);
            } else {
                s.remove(&id);
            }
        });
        if on && !curves.with_untracked(|c| c.contains_key(&id)) {
            spawn_local(async move {
                if let Ok(pts) = get::<Vec<MetricPoint>>(&format!("/api/runs/{id}/metrics")).await {
                    curves.update(|c| {
                        c.insert(id, pts);
                    });
                }
            });
        }
    };
    let overlays = Signal::derive(move || {
        let sel = selected.get();
        let c = curves.get();
        let current = ctx.train.id.get();
        sel.iter()
            .filter(|id| Some(**id) != current)
            .filter_map(|id| {
                c.get(id).map(|pts| Overlay {
                    label: format!("#{id}"),
                    points: pts.clone(),
                })
            })
            .collect::<Vec<_>>()
    });
    let diff = move || -> Vec<(String, Vec<String>)> {
        let sel = selected.get();
        let list = runs.get();
        let chosen: Vec<&Run> = list.iter().filter(|r| sel.contains(&r.id)).collect();
        if chosen.len() < 2 {
            return Vec::new();
        }
        let keys: BTreeSet<&String> = chosen.iter().flat_map(|r| r.config.keys()).collect();
        keys.into_iter()
            .filter_map(|k| {
                let vals: Vec<String> = chosen
                    .iter()
                    .map(|r| {
                        r.config
                            .get(k)
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "—".into())
                    })
                    .collect();
                (vals.iter().any(|v| v != &vals[0])).then(|| (k.clone(), vals))
            })
            .collect()
    };
    let resume = move |id: i64| {
        spawn_local(async move {
            if send::<_, Run>("POST", &format!("/api/runs/{id}/resume"), &Value::Null)
                .await
                .is_ok()
            {
                ctx.train.attach(id);
            }
        });
    };
    view! {
        <LossChart points=ctx.train.points overlays=overlays/>
        <details class="history" open>
            <summary>{i.t("history")}</summary>
            <p class="muted">{i.t("history_hint")}</p>
            <div class="table-wrap">
                <table data-testid="history">
                    <thead><tr>
                        <th></th><th>{i.t("id")}</th><th>{i.t("status")}</th><th>{i.t("model")}</th>
                        <th>{i.t("dataset_col")}</th><th>{i.t("final_loss")}</th><th>{i.t("duration")}</th><th></th>
                    </tr></thead>
                    <tbody>
                        {move || {
                            let list = runs.get();
                            if list.is_empty() {
                                return view! { <tr><td colspan="8" class="muted">{i.t("no_runs")}</td></tr> }.into_any();
                            }
                            list.into_iter().map(|r| {
                                let id = r.id;
                                let dur = match (r.started_at, r.finished_at) {
                                    (Some(a), Some(b)) => hms(b - a),
                                    _ => "—".into(),
                                };
                                let resumable = r.kind == RunKind::Train && matches!(r.status, RunStatus::Aborted | RunStatus::Interrupted | RunStatus::Failed);
                                view! {
                                    <tr data-run=id>
                                        <td><input type="checkbox" aria-label=format!("select run {id}")
                                            prop:checked=move || selected.get().contains(&id)
                                            on:change=move |ev| toggle(id, event_target_checked(&ev))/></td>
                                        <td>{id}</td>
                                        <td><span class=format!("badge {}", r.status.as_str())>{i.tr(r.status.as_str())}</span></td>
                                        <td>{crate::short(&r.model)}</td>
                                        <td>{r.dataset.clone()}</td>
                                        <td>{r.final_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "—".into())}</td>
                                        <td>{dur}</td>
                                        <td class="row-actions">
                                            <button class="small" on:click=move |_| ctx.train.attach(id)>{i.t("attach")}</button>
                                            {resumable.then(|| view! { <button class="small" on:click=move |_| resume(id)>{i.t("resume")}</button> })}
                                        </td>
                                    </tr>
                                }
                            }).collect_view().into_any()
                        }}
                    </tbody>
                </table>
            </div>
            {move || {
                let d = diff();
                (!d.is_empty()).then(|| {
                    let ids: Vec<i64> = selected.get().into_iter().collect();
                    view! {
                        <h4>{i.t("config_diff")}</h4>
                        <div class="table-wrap">
                            <table data-testid="config-diff">
                                <thead><tr><th>{i.t("key")}</th>{ids.iter().map(|id| view! { <th>"#"{*id}</th> }).collect_view()}</tr></thead>
                                <tbody>{d.into_iter().map(|(k, vals)| view! {
                                    <tr><td>{k}</td>{vals.into_iter().map(|v| view! { <td>{v}</td> }).collect_view()}</tr>
                                }).collect_view()}</tbody>
                            </table>
                        </div>
                    }
                })
            }}
        </details>
    }
}
