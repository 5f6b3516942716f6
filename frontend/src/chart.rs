//! The loss chart: raw and smoothed training loss, eval loss, and other runs overlaid; zoom on the
//! step axis and hover values. Plain SVG, so the server renders it and the browser updates it.

use leptos::prelude::*;
use protocol::run::MetricPoint;

use crate::i18n::use_i18n;

const W: f64 = 640.0;
const H: f64 = 260.0;
const PAD_L: f64 = 48.0;
const PAD_R: f64 = 12.0;
const PAD_T: f64 = 12.0;
const PAD_B: f64 = 28.0;

const OVERLAY_COLORS: &[&str] = &[
    "#7c3aed", "#059669", "#d97706", "#db2777", "#0891b2", "#65a30d",
];

/// LLaMA-Factory's `smooth`: an EMA whose weight grows with the number of points.
pub fn smooth(values: &[f64]) -> Vec<f64> {
    let Some(first) = values.first() else {
        return Vec::new();
    };
    let weight = 1.8 * (1.0 / (1.0 + (-0.05 * values.len() as f64).exp()) - 0.5);
    let mut last = *first;
    values
        .iter()
        .map(|v| {
            last = last * weight + (1.0 - weight) * v;
            last
        })
        .collect()
}

#[derive(Clone, PartialEq)]
pub struct Overlay {
    pub label: String,
    pub points: Vec<MetricPoint>,
}

struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn x(&self, step: f64) -> f64 {
        PAD_L + (step - self.x0) / (self.x1 - self.x0).max(1e-9) * (W - PAD_L - PAD_R)
    }
    fn y(&self, v: f64) -> f64 {
        PAD_T + (self.y1 - v) / (self.y1 - self.y0).max(1e-9) * (H - PAD_T - PAD_B)
    }
    fn polyline(&self, pts: &[(f64, f64)]) -> String {
        pts.iter()
            .filter(|(s, _)| *s >= self.x0 && *s <= self.x1)
            .map(|(s, v)| format!("{:.1},{:.1}", self.x(*s), self.y(*v)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn series(points: &[MetricPoint], f: impl Fn(&MetricPoint) -> Option<f64>) -> Vec<(f64, f64)> {
    points
        .iter()
        .filter_map(|p| f(p).filter(|v| v.is_finite()).map(|v| (p.step as f64, v)))
        .collect()
}

#[component]
pub fn LossChart(
    #[prop(into)] points: Signal<Vec<MetricPoint>>,
    #[prop(into)] overlays: Signal<Vec<Overlay>>,
) -> impl IntoView {
    let i = use_i18n();
    // Visible share of the step axis: [lo, hi] in 0..=1.
    let window = RwSignal::new((0.0f64, 1.0f64));
    let hover = RwSignal::new(None::<f64>);
    let frame = Memo::new(move |_| {
        let pts = points.get();
        let ovs = overlays.get();
        let mut max_step = 1.0f64;
        let mut lo = f64::INFINITY;
        let mut hi = f64::NEG_INFINITY;
        let (w0, w1) = window.get();
        let all = pts.iter().chain(ovs.iter().flat_map(|o| o.points.iter()));
        for p in all.clone() {
            max_step = max_step.max(p.step as f64);
        }
        let (x0, x1) = (w0 * max_step, (w1 * max_step).max(w0 * max_step + 1.0));
        for p in all {
            let s = p.step as f64;
            if s < x0 || s > x1 {
                continue;
            }
            for v in [p.loss, p.eval_loss]
                .into_iter()
                .flatten()
                .filter(|v| v.is_finite())
            {
                lo = lo.min(v);
                hi = hi.max(v);
            }
        }
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        let pad = ((hi - lo) * 0.08).max(1e-3);
        (x0, x1, (lo - pad).max(0.0), hi + pad)
    });
    let with_frame = move |f: &dyn Fn(&Frame) -> String| {
        let (x0, x1, y0, y1) = frame.get();
        f(&Frame { x0, x1, y0, y1 })
    };
    let raw = move || with_frame(&|fr| fr.polyline(&series(&points.get(), |p| p.loss)));
    let smoothed = move || {
        with_frame(&|fr| {
            let s = series(&points.get(), |p| p.loss);
            let ys = smooth(&s.iter().map(|(_, v)| *v).collect::<Vec<_>>());
            let pts: Vec<(f64, f64)> = s.iter().zip(ys).map(|((x, _), y)| (*x, y)).collect();
            fr.polyline(&pts)
        })
    };
    let eval = move || with_frame(&|fr| fr.polyline(&series(&points.get(), |p| p.eval_loss)));
    let ticks = move || {
        let (x0, x1, y0, y1) = frame.get();
        let fr = Frame { x0, x1, y0, y1 };
        let mut v = Vec::new();
        for k in 0..=4 {
            let val = y0 + (y1 - y0) * k as f64 / 4.0;
            v.push(view! {
                <g class="tick">
                    <line x1=PAD_L x2=W - PAD_R y1=fr.y(val) y2=fr.y(val)/>
                    <text x=PAD_L - 4.0 y=fr.y(val) + 4.0 text-anchor="end">{format!("{val:.3}")}</text>
                </g>
            });
        }
        for k in 0..=4 {
            let s = x0 + (x1 - x0) * k as f64 / 4.0;
            v.push(view! {
                <g class="tick">
                    <line x1=fr.x(s) x2=fr.x(s) y1=H - PAD_B y2=H - PAD_B + 4.0/>
                    <text x=fr.x(s) y=H - 8.0 text-anchor="middle">{format!("{s:.0}")}</text>
                </g>
            });
        }
        v
    };
    let on_move = move |ev: leptos::ev::MouseEvent| {
        #[cfg(feature = "hydrate")]
        {
            use wasm_bindgen::JsCast;
            let svg = ev
                .current_target()
                .and_then(|t| t.dyn_into::<web_sys::Element>().ok());
            if let Some(svg) = svg {
                let r = svg.get_bounding_client_rect();
                let svg_x = (ev.client_x() as f64 - r.left()) / r.width().max(1.0) * W;
                let (x0, x1, _, _) = frame.get_untracked();
                hover.set(Some(x0 + (svg_x - PAD_L) / (W - PAD_L - PAD_R) * (x1 - x0)));
            }
        }
        #[cfg(not(feature = "hydrate"))]
        let _ = ev;
    };
    let hovered = move || {
        let s = hover.get()?;
        let pts = points.get();
        let p = pts
            .iter()
            .filter(|p| p.loss.is_some() || p.eval_loss.is_some())
            .min_by(|a, b| {
                (a.step as f64 - s)
                    .abs()
                    .total_cmp(&(b.step as f64 - s).abs())
            })?
            .clone();
        Some(p)
    };
    let zoom = move |factor: f64| {
        window.update(|(lo, hi)| {
            let mid = (*lo + *hi) / 2.0;
            let half = ((*hi - *lo) / 2.0 * factor).clamp(0.02, 0.5);
            let (mut a, mut b) = (mid - half, mid + half);
            if a < 0.0 {
                b -= a;
                a = 0.0;
            }
            if b > 1.0 {
                a -= b - 1.0;
                b = 1.0;
            }
            (*lo, *hi) = (a.max(0.0), b.min(1.0));
        })
    };
    view! {
        <div class="chart">
            <div class="chart-bar">
                <span class="legend raw">{i.t("loss")}</span>
                <span class="legend smooth">{i.t("smoothed")}</span>
                <span class="legend eval">{i.t("eval_loss")}</span>
                {move || overlays.get().into_iter().enumerate().map(|(k, o)| {
                    let color = OVERLAY_COLORS[k % OVERLAY_COLORS.len()];
                    view! { <span class="legend" style=format!("--c: {color}")>{o.label}</span> }
                }).collect_view()}
                <span class="spacer"></span>
                <button class="small" title=i.t("zoom_in") aria-label=i.t("zoom_in") on:click=move |_| zoom(0.5)>"+"</button>
                <button class="small" title=i.t("zoom_out") aria-label=i.t("zoom_out") on:click=move |_| zoom(2.0)>"−"</button>
                <button class="small" title=i.t("zoom_reset") on:click=move |_| window.set((0.0, 1.0))>{i.t("zoom_reset")}</button>
            </div>
            <svg viewBox=format!("0 0 {W} {H}") class="loss-svg" data-testid="loss-chart"
                on:mousemove=on_move on:mouseleave=move |_| hover.set(None)>
                <rect x=PAD_L y=PAD_T width=W - PAD_L - PAD_R height=H - PAD_T - PAD_B class="plot-bg"/>
                {ticks}
                {move || overlays.get().into_iter().enumerate().map(|(k, o)| {
                    let color = OVERLAY_COLORS[k % OVERLAY_COLORS.len()];
                    let line = with_frame(&|fr| fr.polyline(&series(&o.points, |p| p.loss)));
                    view! { <polyline class="overlay" points=line style=format!("stroke: {color}")/> }
                }).collect_view()}
                <polyline class="raw" points=raw data-testid="loss-raw"/>
                <polyline class="smooth" points=smoothed/>
                <polyline class="eval" points=eval/>
                {move || hovered().map(|p| {
                    let (x0, x1, y0, y1) = frame.get();
                    let fr = Frame { x0, x1, y0, y1 };
                    let x = fr.x(p.step as f64);
                    view! { <line class="cursor" x1=x x2=x y1=PAD_T y2=H - PAD_B/> }
                })}
            </svg>
            <div class="hover" data-testid="chart-hover">
                {move || hovered().map(|p| {
                    let mut s = format!("{} {}", i.tr("step"), p.step);
                    if let Some(l) = p.loss { s.push_str(&format!(" · {} {l:.4}", i.tr("loss"))); }
                    if let Some(l) = p.eval_loss { s.push_str(&format!(" · {} {l:.4}", i.tr("eval_loss"))); }
                    if let Some(lr) = p.lr { s.push_str(&format!(" · lr {lr:.2e}")); }
                    s
                })}
            </div>
        </div>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_matches_llamafactory() {
        // LLaMA-Factory: weight = 1.8 * (1 / (1 + exp(-0.05 * n)) - 0.5); EMA from the first value.
        let v = [4.0, 2.0, 3.0];
        let w = 1.8 * (1.0 / (1.0 + (-0.15f64).exp()) - 0.5);
        let s = smooth(&v);
        assert_eq!(s[0], 4.0);
        assert!((s[1] - (4.0 * w + 2.0 * (1.0 - w))).abs() < 1e-12);
        assert!((s[2] - (s[1] * w + 3.0 * (1.0 - w))).abs() < 1e-12);
        assert!(smooth(&[]).is_empty());
    }
}
