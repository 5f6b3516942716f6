//! The LlamaBoard page: server-rendered by Leptos, hydrated by the WASM bundle under `pkg/`.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use leptos::prelude::*;
use leptos_axum::{generate_route_list, LeptosRoutes};
use tower_http::services::ServeDir;

use super::AppState;

const STYLE: &str = include_str!("../../../assets/style.css");

pub fn routes(app: AppState) -> Router {
    let site_root = app.cfg.site_root.to_string_lossy().into_owned();
    let opts = LeptosOptions::builder()
        .output_name("frontend")
        .site_root(site_root.clone())
        .site_pkg_dir("pkg")
        .site_addr(app.cfg.addr)
        .build();
    let routes = generate_route_list(frontend::App);
    Router::new()
        .route(
            "/style.css",
            get(|| async {
                ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
            }),
        )
        .leptos_routes(&opts, routes, {
            let o = opts.clone();
            move || frontend::shell(o.clone())
        })
        .nest_service("/pkg", ServeDir::new(app.cfg.site_root.join("pkg")))
        .with_state(opts)
}
