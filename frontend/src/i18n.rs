//! Every label and message of the page in English and Chinese.

use leptos::prelude::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lang {
    En,
    Zh,
}

impl Lang {
    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Zh => "zh",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "en" => Some(Lang::En),
            "zh" => Some(Lang::Zh),
            _ => None,
        }
    }
}

/// (key, English, Chinese)
pub const TABLE: &[(&str, &str, &str)] = &[
    ("title", "LlamaBoard", "LlamaBoard"),
    (
        "subtitle",
        "Fine-tune LLMs natively: no Python, one binary",
        "原生大模型微调：无需 Python，一个程序",
    ),
    ("lang", "Language", "语言"),
    ("model", "Model", "模型"),
    ("model_path", "Model path", "模型路径"),
    (
        "model_path_hint",
        "A folder with config.json or a Hugging Face id in the local cache",
        "含 config.json 的目录，或本地缓存中的 Hugging Face 模型名",
    ),
    ("finetuning_type", "Finetuning method", "微调方法"),
    ("checkpoint", "Checkpoint path", "检查点路径"),
    ("none", "none", "无"),
    ("template", "Chat template", "对话模板"),
    ("template_own", "model's own (Jinja)", "模型自带 (Jinja)"),
    ("quantization_bit", "Quantization bit", "量化等级"),
    ("memory_estimate", "Estimated memory", "预计内存"),
    ("memory_weights", "weights", "权重"),
    (
        "memory_training",
        "trained tensors and optimizer",
        "训练参数与优化器",
    ),
    ("memory_activations", "activations", "激活"),
    ("quantization_method", "Quantization method", "量化方法"),
    ("rope_scaling", "RoPE scaling", "RoPE 插值方法"),
    ("booster", "Booster", "加速方式"),
    ("tab_train", "Train", "训练"),
    ("tab_eval", "Evaluate & Predict", "评估与预测"),
    ("tab_chat", "Chat", "对话"),
    ("tab_export", "Export", "导出"),
    ("stage", "Stage", "训练阶段"),
    ("stage_sft", "Supervised Fine-Tuning", "指令监督微调"),
    ("stage_rm", "Reward Modeling", "奖励模型训练"),
    ("stage_dpo", "DPO", "DPO"),
    ("stage_kto", "KTO", "KTO"),
    ("stage_ppo", "PPO", "PPO"),
    ("reward_model", "Reward model", "奖励模型"),
    (
        "ppo_max_new_tokens",
        "Max new tokens (PPO responses)",
        "最大生成长度（PPO 回复）",
    ),
    ("ppo_score_norm", "Score norm", "奖励模型归一化"),
    ("ppo_whiten_rewards", "Whiten rewards", "白化奖励"),
    ("stage_pt", "Pre-Training", "预训练"),
    ("dataset_dir", "Data dir", "数据路径"),
    ("dataset", "Dataset", "数据集"),
    ("preview_dataset", "Preview dataset", "预览数据集"),
    (
        "no_datasets",
        "No dataset of this stage in the data dir",
        "数据路径中没有适用于该阶段的数据集",
    ),
    ("learning_rate", "Learning rate", "学习率"),
    ("num_train_epochs", "Epochs", "训练轮数"),
    ("max_grad_norm", "Maximum gradient norm", "最大梯度范数"),
    ("seed", "Seed", "随机种子"),
    ("max_samples", "Max samples", "最大样本数"),
    ("compute_type", "Compute type", "计算类型"),
    ("cutoff_len", "Cutoff length", "截断长度"),
    ("batch_size", "Batch size", "批处理大小"),
    (
        "nproc_per_node",
        "Devices (data-parallel ranks)",
        "设备数量（数据并行）",
    ),
    (
        "gradient_accumulation_steps",
        "Gradient accumulation",
        "梯度累积",
    ),
    ("val_size", "Val size", "验证集比例"),
    ("lr_scheduler_type", "LR scheduler", "学习率调节器"),
    ("extra_group", "Extra configurations", "其它参数设置"),
    ("logging_steps", "Logging steps", "日志间隔"),
    ("save_steps", "Save steps", "保存间隔"),
    ("warmup_steps", "Warmup steps", "预热步数"),
    ("neftune_alpha", "NEFTune alpha", "NEFTune 噪声参数"),
    ("packing", "Pack sequences", "序列打包"),
    ("neat_packing", "Use neat packing", "使用无污染打包"),
    ("train_on_prompt", "Train on prompt", "学习提示词"),
    ("mask_history", "Mask history", "不学习历史对话"),
    ("resize_vocab", "Resize token embeddings", "更改词表大小"),
    ("enable_thinking", "Enable thinking", "启用思考模式"),
    (
        "gradient_checkpointing",
        "Gradient checkpointing (less memory, slower steps)",
        "梯度检查点（省内存，步骤变慢）",
    ),
    ("mm_group", "Multimodal configurations", "多模态参数设置"),
    (
        "freeze_vision_tower",
        "Freeze vision tower",
        "冻结视觉编码器",
    ),
    (
        "freeze_multi_modal_projector",
        "Freeze multi-modal projector",
        "冻结多模态投影器",
    ),
    (
        "freeze_language_model",
        "Freeze language model",
        "冻结语言模型",
    ),
    ("image_max_pixels", "Image max pixels", "图像最大像素"),
    ("image_min_pixels", "Image min pixels", "图像最小像素"),
    (
        "freeze_group",
        "Freeze tuning configurations",
        "部分参数微调设置",
    ),
    ("freeze_trainable_layers", "Trainable layers", "可训练层数"),
    (
        "freeze_trainable_modules",
        "Trainable modules",
        "可训练模块",
    ),
    ("freeze_extra_modules", "Extra modules", "额外模块"),
    ("lora_group", "LoRA configurations", "LoRA 参数设置"),
    ("galore_group", "GaLore configurations", "GaLore 参数设置"),
    ("badam_group", "BAdam configurations", "BAdam 参数设置"),
    ("apollo_group", "APOLLO configurations", "APOLLO 参数设置"),
    ("use_apollo", "Use APOLLO", "使用 APOLLO"),
    ("apollo_rank", "APOLLO rank", "APOLLO 秩"),
    ("apollo_update_interval", "Update interval", "更新间隔"),
    ("apollo_scale", "APOLLO scale", "APOLLO 缩放系数"),
    ("apollo_target", "APOLLO modules", "APOLLO 作用模块"),
    ("use_badam", "Use BAdam", "使用 BAdam"),
    ("badam_switch_mode", "Switch mode", "切换策略"),
    ("badam_mode", "BAdam mode", "BAdam 模式"),
    ("badam_switch_interval", "Switch interval", "切换频率"),
    ("badam_update_ratio", "Update ratio", "Block 更新比例"),
    ("use_galore", "Use GaLore", "使用 GaLore"),
    ("galore_rank", "GaLore rank", "GaLore 秩"),
    ("galore_update_interval", "Update interval", "更新间隔"),
    ("galore_scale", "GaLore scale", "GaLore 缩放系数"),
    ("galore_target", "GaLore modules", "GaLore 作用模块"),
    ("lora_rank", "LoRA rank", "LoRA 秩"),
    ("lora_alpha", "LoRA alpha", "LoRA 缩放系数"),
    ("lora_dropout", "LoRA dropout", "LoRA 随机丢弃"),
    ("loraplus_lr_ratio", "LoRA+ LR ratio", "LoRA+ 学习率比例"),
    ("create_new_adapter", "Create new adapter", "新建适配器"),
    ("use_rslora", "Use rsLoRA", "使用 rsLoRA"),
    ("use_dora", "Use DoRA", "使用 DoRA"),
    ("use_pissa", "Use PiSSA", "使用 PiSSA"),
    ("use_llama_pro", "Enable LLaMA Pro", "使用 LLaMA Pro"),
    ("shift_attn", "Enable S^2 Attention", "使用 S^2 Attention"),
    ("report_to", "Enable external logger", "启用外部记录面板"),
    ("lora_target", "LoRA modules", "LoRA 作用模块"),
    ("additional_target", "Additional modules", "附加模块"),
    ("rlhf_group", "RLHF configurations", "RLHF 参数设置"),
    ("pref_beta", "Beta value", "Beta 参数"),
    ("pref_ftx", "Ftx gamma", "Ftx gamma"),
    ("pref_loss", "Loss type", "损失类型"),
    ("simpo_gamma", "SimPO gamma", "SimPO gamma"),
    ("output_dir", "Output dir", "输出目录"),
    ("config_name", "Config name", "配置名称"),
    ("preview_command", "Preview command", "预览命令"),
    ("save_args", "Save arguments", "保存训练参数"),
    ("load_args", "Load arguments", "载入训练参数"),
    ("start", "Start", "开始"),
    ("abort", "Abort", "中断"),
    ("resume", "Resume", "继续训练"),
    ("ready", "Ready.", "准备就绪。"),
    ("status", "Status", "状态"),
    ("queued", "queued", "排队中"),
    ("running", "running", "运行中"),
    ("succeeded", "succeeded", "已完成"),
    ("failed", "failed", "失败"),
    ("aborted", "aborted", "已中断"),
    ("interrupted", "interrupted", "被打断"),
    ("elapsed", "elapsed", "已用时"),
    ("eta", "remaining", "剩余"),
    ("tokens_per_sec", "tokens/s", "词元/秒"),
    ("loss", "Loss", "损失"),
    ("smoothed", "smoothed", "平滑"),
    ("eval_loss", "eval loss", "验证损失"),
    ("zoom_in", "Zoom in", "放大"),
    ("zoom_out", "Zoom out", "缩小"),
    ("zoom_reset", "Reset zoom", "重置缩放"),
    ("step", "Step", "步数"),
    ("log", "Log", "日志"),
    ("history", "Run history", "运行历史"),
    (
        "history_hint",
        "Select runs to overlay their loss curves and compare their configs",
        "选择多个运行以叠加损失曲线并比较配置",
    ),
    ("refresh", "Refresh", "刷新"),
    ("id", "ID", "编号"),
    ("dataset_col", "Dataset", "数据集"),
    ("final_loss", "Final loss", "最终损失"),
    ("duration", "Duration", "用时"),
    ("config_diff", "Config differences", "配置差异"),
    ("key", "Key", "参数"),
    ("no_runs", "No runs yet", "暂无运行"),
    ("attach", "Watch", "查看"),
    ("predict", "Save predictions", "保存预测结果"),
    ("max_new_tokens", "Maximum new tokens", "最大生成长度"),
    ("top_p", "Top-p", "Top-p 采样值"),
    ("temperature", "Temperature", "温度系数"),
    ("metrics", "Metrics", "指标"),
    ("predictions", "Predictions", "预测结果"),
    ("prompt", "Prompt", "提示词"),
    ("predict_col", "Predict", "预测"),
    ("label", "Label", "标签"),
    ("prev", "Previous", "上一页"),
    ("next", "Next", "下一页"),
    ("close", "Close", "关闭"),
    ("page", "Page", "页"),
    ("of", "of", "共"),
    ("rows", "rows", "行"),
    ("infer_backend", "Inference engine", "推理引擎"),
    ("infer_dtype", "Inference data type", "推理数据类型"),
    ("load_model", "Load model", "加载模型"),
    ("unload_model", "Unload model", "卸载模型"),
    (
        "model_unloaded",
        "Model unloaded, please load a model first.",
        "模型未加载，请先加载模型。",
    ),
    ("model_loading", "Loading model...", "加载中……"),
    (
        "model_loaded",
        "Model loaded, now you can chat with your model!",
        "模型已加载，可以开始聊天了！",
    ),
    ("load_failed", "Loading failed", "加载失败"),
    (
        "system_prompt",
        "System prompt (optional)",
        "系统提示词（非必填）",
    ),
    ("tools", "Tools (optional)", "工具列表（非必填）"),
    ("role", "Role", "角色"),
    ("user", "user", "用户"),
    ("observation", "observation", "工具结果"),
    ("input", "Input...", "输入……"),
    ("submit", "Submit", "提交"),
    ("stop", "Stop", "停止"),
    ("clear_history", "Clear history", "清空历史"),
    (
        "image_input",
        "Images (vision-language models)",
        "图像（多模态模型）",
    ),
    ("remove", "Remove", "移除"),
    ("export_size", "Max shard size (GB)", "最大分块大小（GB）"),
    ("export_format", "Export format", "导出格式"),
    ("export_gguf_type", "GGUF type", "GGUF 类型"),
    ("export_dtype", "Export data type", "导出数据类型"),
    (
        "export_quantization_bit",
        "Export quantization bit.",
        "导出量化等级",
    ),
    (
        "export_quantization_dataset",
        "Export quantization dataset",
        "导出量化数据集",
    ),
    (
        "export_quantization_nsamples",
        "Calibration samples",
        "校准样本数",
    ),
    (
        "export_quantization_maxlen",
        "Calibration length (tokens)",
        "校准长度（token）",
    ),
    ("export_dir", "Export dir", "导出目录"),
    ("export", "Export", "开始导出"),
    ("exported_files", "Written files", "已写入文件"),
    ("exporting", "Exporting model...", "正在导出模型……"),
    ("exported", "Model exported.", "模型导出完成。"),
    ("size", "Size", "大小"),
    ("file", "File", "文件"),
    ("error", "Error", "错误"),
    ("err_no_model", "Please select a model.", "请选择模型。"),
    (
        "err_no_dataset",
        "Please choose a dataset.",
        "请选择数据集。",
    ),
    (
        "err_no_reward_model",
        "Please select a reward model.",
        "请选择奖励模型。",
    ),
    (
        "err_running",
        "A process is in running, please abort it first.",
        "任务进行中，请先中断训练。",
    ),
    ("command", "Command", "命令"),
    ("saved", "Saved.", "已保存。"),
    ("loaded", "Loaded.", "已载入。"),
    ("no_arg_sets", "No saved arguments", "没有已保存的参数"),
    ("hydrated", "interactive", "可交互"),
    ("queue_position", "Position in queue", "队列位置"),
    ("checkpoint_saved", "Checkpoint saved", "检查点已保存"),
    ("result", "Result", "结果"),
];

pub fn lookup(lang: Lang, key: &str) -> &'static str {
    match TABLE.iter().find(|(k, _, _)| *k == key) {
        Some((_, en, zh)) => match lang {
            Lang::En => en,
            Lang::Zh => zh,
        },
        None => "?",
    }
}

/// The page's language, shared through context.
#[derive(Clone, Copy)]
pub struct I18n(pub RwSignal<Lang>);

impl I18n {
    pub fn t(&self, key: &'static str) -> impl Fn() -> &'static str + Copy + Send + Sync + 'static {
        let lang = self.0;
        move || lookup(lang.get(), key)
    }

    pub fn now(&self, key: &str) -> &'static str {
        lookup(self.0.get_untracked(), key)
    }

    pub fn tr(&self, key: &str) -> &'static str {
        lookup(self.0.get(), key)
    }
}

pub fn use_i18n() -> I18n {
    expect_context::<I18n>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_unique_and_translated() {
        for (i, (k, en, zh)) in TABLE.iter().enumerate() {
            assert!(!en.is_empty() && !zh.is_empty(), "{k}");
            assert!(
                TABLE[i + 1..].iter().all(|(o, _, _)| o != k),
                "duplicate key {k}"
            );
        }
        assert_eq!(lookup(Lang::Zh, "tab_train"), "训练");
        assert_eq!(lookup(Lang::En, "missing"), "?");
    }
}
