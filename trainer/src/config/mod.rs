//! Loading LLaMA-Factory training configs: a YAML (or JSON) file plus `key=value` overrides,
//! checked key by key so a typo or a wrong type is reported with its file, key and value.

mod load;
mod suggest;
mod validate;

pub use load::{args_from_json, load_args, parse_overrides, ArgSource};
pub use suggest::closest;
pub use validate::{validate, ArgError};
