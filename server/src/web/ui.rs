//! The LlamaBoard page: server-rendered by Leptos, hydrated by the WASM bundle under `pkg/`,
//! under a Content Security Policy that allows only this server's scripts (and the page's own
//! inline scripts by their per-response nonce).

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use leptos::prelude::*;
use leptos_axum::{generate_route_list, LeptosRoutes};
use tower_http::services::ServeDir;

use super::AppState;

/// The page's CSP, naming the nonce leptos_axum gave this response's inline scripts.
fn page_policy() {
    let (Some(nonce), Some(res)) = (
        leptos::nonce::use_nonce(),
        use_context::<leptos_axum::ResponseOptions>(),
    ) else {
        return;
    };
    let csp = format!(
        "default-src 'self'; script-src 'self' 'nonce-{nonce}' 'wasm-unsafe-eval'; \
         style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; \
         frame-ancestors 'none'; base-uri 'none'; object-src 'none'; form-action 'self'"
    );
    if let Ok(v) = header::HeaderValue::from_str(&csp) {
        res.insert_header(header::CONTENT_SECURITY_POLICY, v);
    }
}

const STYLE: &str = include_str!("../../../assets/style.css");

pub fn routes(app: AppState) -> Router {
    // Leptos only names the bundle's files; they are served below.
    let site_root = app
        .cfg
        .site_root
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "site".into());
    let opts = LeptosOptions::builder()
        .output_name("frontend")
        .site_root(site_root.clone())
        .site_pkg_dir("pkg")
        .site_addr(app.cfg.addr)
        .build();
    let routes = generate_route_list(frontend::App);
    let router = Router::new()
        .route(
            "/style.css",
            get(|| async {
                ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
            }),
        )
        .leptos_routes_with_context(&opts, routes, page_policy, {
            let o = opts.clone();
            move || frontend::shell(o.clone())
        })
        .with_state(opts);
    match &app.cfg.site_root {
        Some(root) => router.nest_service("/pkg", ServeDir::new(root.join("pkg"))),
        None => router.route("/pkg/{file}", get(super::bundle::serve)),
    }
}
