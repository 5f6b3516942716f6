//! The browser's side of the API: JSON over `fetch` and WebSockets. Only the hydrated page
//! talks to the server; the server-rendered HTML needs neither.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// An API error as the page shows it: the message, and the form field it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiErr {
    pub message: String,
    pub field: Option<String>,
}

impl ApiErr {
    pub fn plain(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            field: None,
        }
    }
}

pub async fn get<T: DeserializeOwned>(url: &str) -> Result<T, ApiErr> {
    let text = imp::request("GET", url, None).await?;
    serde_json::from_str(&text).map_err(|e| ApiErr::plain(format!("{url}: {e}")))
}

pub async fn get_text(url: &str) -> Result<String, ApiErr> {
    imp::request("GET", url, None).await
}

pub async fn send<B: Serialize, T: DeserializeOwned>(
    method: &str,
    url: &str,
    body: &B,
) -> Result<T, ApiErr> {
    let body = serde_json::to_string(body).map_err(|e| ApiErr::plain(e.to_string()))?;
    let text = imp::request(method, url, Some(body)).await?;
    let text = if text.trim().is_empty() {
        "null".to_string()
    } else {
        text
    };
    serde_json::from_str(&text).map_err(|e| ApiErr::plain(format!("{url}: {e}")))
}

/// Percent-encodes a query value.
pub use protocol::query_enc as enc;

pub use imp::{read_images, Socket};

#[cfg(feature = "hydrate")]
mod imp {
    use super::ApiErr;
    use send_wrapper::SendWrapper;
    use wasm_bindgen::closure::Closure;
    use wasm_bindgen::{JsCast, JsValue};
    use wasm_bindgen_futures::JsFuture;

    fn js_err(e: JsValue) -> ApiErr {
        ApiErr::plain(e.as_string().unwrap_or_else(|| format!("{e:?}")))
    }

    pub async fn request(method: &str, url: &str, body: Option<String>) -> Result<String, ApiErr> {
        let opts = web_sys::RequestInit::new();
        opts.set_method(method);
        if let Some(b) = &body {
            opts.set_body(&JsValue::from_str(b));
        }
        let req = web_sys::Request::new_with_str_and_init(url, &opts).map_err(js_err)?;
        if body.is_some() {
            req.headers()
                .set("Content-Type", "application/json")
                .map_err(js_err)?;
        }
        let window = web_sys::window().ok_or_else(|| ApiErr::plain("no window"))?;
        let resp: web_sys::Response = JsFuture::from(window.fetch_with_request(&req))
            .await
            .map_err(|_| ApiErr::plain("the server cannot be reached"))?
            .dyn_into()
            .map_err(js_err)?;
        let text = JsFuture::from(resp.text().map_err(js_err)?)
            .await
            .map_err(js_err)?
            .as_string()
            .unwrap_or_default();
        if resp.ok() {
            return Ok(text);
        }
        match serde_json::from_str::<protocol::run::ErrorBody>(&text) {
            Ok(b) => Err(ApiErr {
                message: b.error.message,
                field: b.error.field,
            }),
            Err(_) => Err(ApiErr::plain(format!("HTTP {}: {text}", resp.status()))),
        }
    }

    /// The image files chosen in the file input `input_id`, as `(name, data URL)`, read in the
    /// browser.
    pub async fn read_images(input_id: &str) -> Result<Vec<(String, String)>, ApiErr> {
        let doc = web_sys::window()
            .and_then(|w| w.document())
            .ok_or_else(|| ApiErr::plain("no document"))?;
        let input: web_sys::HtmlInputElement = doc
            .get_element_by_id(input_id)
            .ok_or_else(|| ApiErr::plain("no file input"))?
            .dyn_into()
            .map_err(|_| ApiErr::plain("not a file input"))?;
        let Some(files) = input.files() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for i in 0..files.length() {
            let Some(file) = files.get(i) else { continue };
            let reader = web_sys::FileReader::new().map_err(js_err)?;
            let done = js_sys::Promise::new(&mut |resolve, reject| {
                reader.set_onload(Some(&resolve));
                reader.set_onerror(Some(&reject));
            });
            reader.read_as_data_url(&file).map_err(js_err)?;
            JsFuture::from(done)
                .await
                .map_err(|_| ApiErr::plain(format!("cannot read {}", file.name())))?;
            let url = reader
                .result()
                .map_err(js_err)?
                .as_string()
                .unwrap_or_default();
            out.push((file.name(), url));
        }
        input.set_value("");
        Ok(out)
    }

    /// An open WebSocket; closed when dropped.
    pub struct Socket(SendWrapper<web_sys::WebSocket>);

    impl Socket {
        /// Connects to `path` on this host and calls `on_text` with every text message.
        pub fn open(path: &str, on_text: impl Fn(String) + 'static) -> Option<Self> {
            let loc = web_sys::window()?.location();
            let proto = if loc.protocol().ok()? == "https:" {
                "wss"
            } else {
                "ws"
            };
            let url = format!("{proto}://{}{path}", loc.host().ok()?);
            let ws = web_sys::WebSocket::new(&url).ok()?;
            let cb = Closure::<dyn FnMut(web_sys::MessageEvent)>::new(
                move |e: web_sys::MessageEvent| {
                    if let Some(t) = e.data().as_string() {
                        on_text(t);
                    }
                },
            );
            ws.set_onmessage(Some(cb.as_ref().unchecked_ref()));
            cb.forget();
            Some(Socket(SendWrapper::new(ws)))
        }

        pub fn on_open(&self, f: impl FnOnce() + 'static) {
            let cb = Closure::once(f);
            self.0.set_onopen(Some(cb.as_ref().unchecked_ref()));
            cb.forget();
        }

        pub fn on_close(&self, f: impl FnOnce() + 'static) {
            let cb = Closure::once(f);
            self.0.set_onclose(Some(cb.as_ref().unchecked_ref()));
            cb.forget();
        }

        pub fn is_open(&self) -> bool {
            self.0.ready_state() == web_sys::WebSocket::OPEN
        }

        pub fn send(&self, text: &str) -> bool {
            self.0.send_with_str(text).is_ok()
        }
    }

    impl Drop for Socket {
        fn drop(&mut self) {
            if SendWrapper::valid(&self.0) {
                self.0.set_onmessage(None);
                self.0.set_onclose(None);
                let _ = self.0.close();
            }
        }
    }
}

#[cfg(not(feature = "hydrate"))]
mod imp {
    use super::ApiErr;

    pub async fn request(
        _method: &str,
        url: &str,
        _body: Option<String>,
    ) -> Result<String, ApiErr> {
        Err(ApiErr::plain(format!(
            "{url}: requests are made by the browser only"
        )))
    }

    /// Files are read by the browser only.
    pub async fn read_images(_input_id: &str) -> Result<Vec<(String, String)>, ApiErr> {
        Ok(Vec::new())
    }

    /// On the server the page never opens sockets.
    pub struct Socket;

    impl Socket {
        pub fn open(_path: &str, _on_text: impl Fn(String) + 'static) -> Option<Self> {
            None
        }
        pub fn on_open(&self, _f: impl FnOnce() + 'static) {}
        pub fn on_close(&self, _f: impl FnOnce() + 'static) {}
        pub fn is_open(&self) -> bool {
            false
        }
        pub fn send(&self, _text: &str) -> bool {
            false
        }
    }
}
