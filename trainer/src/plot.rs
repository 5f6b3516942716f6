//! `training_loss.png` (and `training_eval_loss.png`): raw values and LLaMA-Factory's EMA
//! smoothing, 100 dpi-sized, titled like LLaMA-Factory's `plot_loss`.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../../assets/fonts/DejaVuSans.ttf"),
        );
    });
}

/// LLaMA-Factory's `smooth`: EMA whose weight grows with the number of points.
pub fn smooth(values: &[f64]) -> Vec<f64> {
    let Some(&first) = values.first() else {
        return Vec::new();
    };
    let weight = 1.8 * (1.0 / (1.0 + (-0.05 * values.len() as f64).exp()) - 0.5);
    let mut last = first;
    values
        .iter()
        .map(|&v| {
            last = last * weight + (1.0 - weight) * v;
            last
        })
        .collect()
}

fn plot(path: &Path, title: &str, key: &str, points: &[(f64, f64)]) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (640, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let (xmin, xmax) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = ((ymax - ymin) * 0.05).max(1e-6);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(xmin..xmax.max(xmin + 1.0), (ymin - pad)..(ymax + pad))
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(key)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    let raw = RGBColor(31, 119, 180);
    chart
        .draw_series(LineSeries::new(points.iter().copied(), raw.mix(0.4)))
        .map_err(|e| anyhow!("plot: {e}"))?
        .label("original")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], raw.mix(0.4)));
    let ys: Vec<f64> = points.iter().map(|p| p.1).collect();
    let smoothed: Vec<(f64, f64)> = points.iter().map(|p| p.0).zip(smooth(&ys)).collect();
    chart
        .draw_series(LineSeries::new(smoothed, raw.stroke_width(2)))
        .map_err(|e| anyhow!("plot: {e}"))?
        .label("smoothed")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], raw.stroke_width(2)));
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    root.present()
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// Plots `loss` and `eval_loss` from a `log_history`; a key without points is skipped.
pub fn plot_losses(output_dir: &Path, log_history: &[Value]) -> Result<Vec<String>> {
    let mut written = Vec::new();
    for key in ["loss", "eval_loss"] {
        let points: Vec<(f64, f64)> = log_history
            .iter()
            .filter_map(|h| Some((h.get("step")?.as_f64()?, h.get(key)?.as_f64()?)))
            .collect();
        if points.is_empty() {
            continue;
        }
        let name = format!("training_{key}.png");
        plot(
            &output_dir.join(&name),
            &format!("training {key} of {}", output_dir.display()),
            key,
            &points,
        )?;
        written.push(name);
    }
    Ok(written)
}
