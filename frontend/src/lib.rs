//! LlamaBoard, the web UI. It knows only the wire types of `protocol`.

pub use protocol;
