//! The browser bundle under `/pkg/`: embedded in the binary at build time (see `build.rs`) and
//! served brotli- or gzip-compressed as the browser accepts, with an ETag so a reload costs a
//! `304`; or, with `--site-root`, read from a folder on disk (working on the frontend).

use axum::extract::Path as UrlPath;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// One file of the bundle, as stored and in both compressions.
pub struct Asset {
    name: &'static str,
    kind: &'static str,
    etag: &'static str,
    raw: &'static [u8],
    br: &'static [u8],
    gz: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/bundle.rs"));

/// Whether this binary carries a bundle.
pub fn embedded() -> bool {
    FILES.iter().any(|f| f.name == "frontend.js")
}

fn accepts(headers: &HeaderMap, coding: &str) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|c| {
            let mut parts = c.trim().split(';');
            parts.next() == Some(coding) && !parts.any(|q| q.trim().replace(' ', "") == "q=0")
        })
}

/// `GET /pkg/{file}` from the embedded bundle.
pub async fn serve(UrlPath(name): UrlPath<String>, headers: HeaderMap) -> Response {
    let Some(&Asset {
        kind,
        etag,
        raw,
        br,
        gz,
        ..
    }) = FILES.iter().find(|f| f.name == name)
    else {
        return (StatusCode::NOT_FOUND, "no such file in the bundle").into_response();
    };
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::ETAG, HeaderValue::from_static(etag));
    // The names carry no hash: revalidate every time, which the ETag makes cheap.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if fresh {
        return (StatusCode::NOT_MODIFIED, h).into_response();
    }
    let body: &'static [u8] = if accepts(&headers, "br") {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        br
    } else if accepts(&headers, "gzip") {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        gz
    } else {
        raw
    };
    (h, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_accepted_encoding_is_chosen() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, deflate, br;q=0"),
        );
        assert!(accepts(&h, "gzip") && !accepts(&h, "br"));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, deflate, br, zstd"),
        );
        assert!(accepts(&h, "br"));
    }
}
