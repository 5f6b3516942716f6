//! Form state and controls. A form is a map from LLaMA-Factory argument names to the text in
//! their control; the server coerces and checks them like YAML values and names the field of any
//! error, which the page shows next to that control.

use std::collections::BTreeMap;

use leptos::prelude::*;
use protocol::args::Choice;
use serde_json::{Map, Value};

use crate::i18n::use_i18n;

#[derive(Clone, Copy)]
pub struct Form {
    /// Prefix of the controls' element ids, unique per form on the page.
    pub scope: &'static str,
    pub values: RwSignal<BTreeMap<String, String>>,
    pub errors: RwSignal<BTreeMap<String, String>>,
}

impl Form {
    pub fn new(scope: &'static str, defaults: &[(&str, &str)]) -> Self {
        Self {
            scope,
            values: RwSignal::new(
                defaults
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            errors: RwSignal::new(BTreeMap::new()),
        }
    }

    pub fn get(&self, key: &str) -> String {
        self.values
            .with(|m| m.get(key).cloned().unwrap_or_default())
    }

    pub fn get_untracked(&self, key: &str) -> String {
        self.values
            .with_untracked(|m| m.get(key).cloned().unwrap_or_default())
    }

    pub fn set(&self, key: &str, value: impl Into<String>) {
        let value = value.into();
        self.values.update(|m| {
            m.insert(key.to_string(), value);
        });
        self.errors.update(|e| {
            e.remove(key);
        });
    }

    /// Non-empty values as a JSON object of strings (the server coerces them).
    pub fn to_json(&self) -> Map<String, Value> {
        self.values.with_untracked(|m| {
            m.iter()
                .filter(|(_, v)| !v.trim().is_empty())
                .map(|(k, v)| (k.clone(), Value::String(v.trim().to_string())))
                .collect()
        })
    }

    /// Fills the controls from a saved config (values of any JSON type).
    pub fn load(&self, config: &Map<String, Value>) {
        self.values.update(|m| {
            for (k, v) in config {
                if m.contains_key(k) {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Null => String::new(),
                        other => other.to_string(),
                    };
                    m.insert(k.clone(), text);
                }
            }
        });
    }

    /// Puts an error next to its field; returns false when the form has no such field.
    pub fn show_error(&self, field: &str, message: &str) -> bool {
        if self.values.with_untracked(|m| m.contains_key(field)) {
            self.errors.update(|e| {
                e.insert(field.to_string(), message.to_string());
            });
            true
        } else {
            false
        }
    }

    pub fn clear_errors(&self) {
        self.errors.set(BTreeMap::new());
    }
}

/// Merges forms: later ones win.
pub fn merged(forms: &[Form]) -> Map<String, Value> {
    let mut out = Map::new();
    for f in forms {
        out.extend(f.to_json());
    }
    out
}

#[component]
fn FieldError(form: Form, key: &'static str) -> impl IntoView {
    move || {
        form.errors.with(|e| e.get(key).cloned()).map(|msg| {
            view! { <p class="field-error" role="alert" data-field=key>{msg}</p> }
        })
    }
}

/// A text or number input bound to `key`.
#[component]
pub fn Field(
    form: Form,
    key: &'static str,
    label: &'static str,
    #[prop(default = "text")] kind: &'static str,
    #[prop(optional)] step: Option<&'static str>,
    #[prop(optional)] min: Option<&'static str>,
    #[prop(optional)] max: Option<&'static str>,
    #[prop(optional)] placeholder: Option<&'static str>,
    #[prop(optional, into)] disabled: Option<Signal<bool>>,
) -> impl IntoView {
    let i = use_i18n();
    let id = format!("f-{}-{key}", form.scope);
    view! {
        <div class="field" class:invalid=move || form.errors.with(|e| e.contains_key(key))>
            <label for=id.clone()>{i.t(label)}</label>
            <input
                id=id
                name=key
                type=kind
                step=step
                min=min
                max=max
                placeholder=placeholder
                disabled=move || disabled.map(|d| d.get()).unwrap_or(false)
                prop:value=move || form.get(key)
                on:input=move |ev| form.set(key, event_target_value(&ev))
            />
            <FieldError form key/>
        </div>
    }
}

/// A drop-down of fixed choices; `labels` gives translated names per choice (else the value).
/// The options of a closed choice, in the engine's order and spelling: the form can offer
/// nothing the engine rejects.
pub fn choices<C: Choice>() -> Vec<(&'static str, &'static str)> {
    C::ALL.iter().map(|c| (c.as_str(), "")).collect()
}

#[component]
pub fn Select(
    form: Form,
    key: &'static str,
    label: &'static str,
    options: Vec<(&'static str, &'static str)>,
    #[prop(optional, into)] disabled: Option<Signal<bool>>,
) -> impl IntoView {
    let i = use_i18n();
    let id = format!("f-{}-{key}", form.scope);
    view! {
        <div class="field" class:invalid=move || form.errors.with(|e| e.contains_key(key))>
            <label for=id.clone()>{i.t(label)}</label>
            <select
                id=id
                name=key
                disabled=move || disabled.map(|d| d.get()).unwrap_or(false)
                prop:value=move || form.get(key)
                on:change=move |ev| form.set(key, event_target_value(&ev))
            >
                {options
                    .into_iter()
                    .map(|(value, text)| {
                        let shown = move || if text.is_empty() { value } else { i.tr(text) };
                        view! { <option value=value selected=move || form.get(key) == value>{shown}</option> }
                    })
                    .collect_view()}
            </select>
            <FieldError form key/>
        </div>
    }
}

/// A checkbox holding `true` / `false`.
#[component]
pub fn Check(form: Form, key: &'static str, label: &'static str) -> impl IntoView {
    let i = use_i18n();
    let id = format!("f-{}-{key}", form.scope);
    view! {
        <div class="field check">
            <input
                id=id.clone()
                name=key
                type="checkbox"
                prop:checked=move || form.get(key) == "true"
                on:change=move |ev| form.set(key, if event_target_checked(&ev) { "true" } else { "false" })
            />
            <label for=id>{i.t(label)}</label>
            <FieldError form key/>
        </div>
    }
}

/// A collapsible group of controls; it opens by itself when one of its `keys` has an error,
/// so a message is never hidden in a closed group.
#[component]
pub fn Group(
    label: &'static str,
    form: Form,
    keys: &'static [&'static str],
    children: Children,
) -> impl IntoView {
    let i = use_i18n();
    let node = NodeRef::<leptos::html::Details>::new();
    Effect::new(move |_| {
        if form
            .errors
            .with(|e| keys.iter().any(|k| e.contains_key(*k)))
        {
            if let Some(d) = node.get() {
                d.set_open(true);
            }
        }
    });
    view! {
        <details class="group" node_ref=node>
            <summary>{i.t(label)}</summary>
            <div class="grid">{children()}</div>
        </details>
    }
}

/// Formats seconds as `h:mm:ss` / `m:ss`.
pub fn hms(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(hms(5.0), "0:05");
        assert_eq!(hms(125.4), "2:05");
        assert_eq!(hms(3725.0), "1:02:05");
    }
}
