//! Frozen quantized weights for QLoRA: a linear layer's weight kept in 2–8 bits and used through
//! [`quant_linear`], which dequantizes one tile of rows at a time, so the full-precision weight
//! never exists beyond one tile. Formats: candle's GGML k-quants (`Q2_K` … `Q6_K`, `Q8_0`,
//! with the 32-element `Q4_0` / `Q5_0` / `Q8_0` where a row is not a multiple of 256) and
//! bitsandbytes' 4-bit NF4 / FP4 (`bnb`).

pub mod bnb;
pub mod gptq;
mod op;

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use protocol::args::{QuantizationMethod, QuantizationType};
use protocol::TrainArgs;

pub use op::quant_linear;

/// How a weight is stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QuantFormat {
    Ggml(GgmlDType),
    Bnb4 {
        kind: bnb::Kind,
        double: bool,
    },
    /// A GPTQ checkpoint's weights, used as stored (see [`gptq`]).
    Gptq {
        bits: u32,
        group_size: Option<usize>,
    },
}

impl QuantFormat {
    /// The format of `quantization_bit` / `quantization_method` / `quantization_type` /
    /// `double_quantization`; `None` without `quantization_bit`. Validation has refused the
    /// combinations that do not exist.
    pub fn from_args(a: &TrainArgs) -> Result<Option<Self>> {
        let Some(bits) = a.quantization_bit else {
            return Ok(None);
        };
        Ok(Some(match (a.quantization_method, bits) {
            (QuantizationMethod::Bnb, 4) => QuantFormat::Bnb4 {
                kind: match a.quantization_type {
                    QuantizationType::Nf4 => bnb::Kind::Nf4,
                    QuantizationType::Fp4 => bnb::Kind::Fp4,
                },
                double: a.double_quantization,
            },
            (QuantizationMethod::Bnb, 8) | (QuantizationMethod::Ggml, 8) => {
                QuantFormat::Ggml(GgmlDType::Q8_0)
            }
            (QuantizationMethod::Ggml, 2) => QuantFormat::Ggml(GgmlDType::Q2K),
            (QuantizationMethod::Ggml, 3) => QuantFormat::Ggml(GgmlDType::Q3K),
            (QuantizationMethod::Ggml, 4) => QuantFormat::Ggml(GgmlDType::Q4K),
            (QuantizationMethod::Ggml, 5) => QuantFormat::Ggml(GgmlDType::Q5K),
            (QuantizationMethod::Ggml, 6) => QuantFormat::Ggml(GgmlDType::Q6K),
            (QuantizationMethod::Gptq, _) => bail!(
                "`quantization_method: gptq` is for checkpoints already quantized with GPTQ: give such a folder as `model_name_or_path` without `quantization_bit` (or make one with `llamafactory export` and `export_quantization_bit`)"
            ),
            (m, b) => {
                bail!("`quantization_bit: {b}` with `quantization_method: {m}` is not supported")
            }
        }))
    }

    pub fn describe(self) -> String {
        match self {
            QuantFormat::Ggml(t) => format!("{t:?}"),
            QuantFormat::Bnb4 { kind, double } => format!(
                "{} (bitsandbytes, blocks of 64{})",
                match kind {
                    bnb::Kind::Nf4 => "NF4",
                    bnb::Kind::Fp4 => "FP4",
                },
                if double { ", double quantization" } else { "" }
            ),
            QuantFormat::Gptq { bits, group_size } => match group_size {
                Some(g) => format!("GPTQ {bits}-bit (groups of {g})"),
                None => format!("GPTQ {bits}-bit (one group per row)"),
            },
        }
    }

    /// The GGML type a row of `cols` values can take: k-quants need rows of whole 256-blocks;
    /// narrower ones take the 32-element type of at least as many bits, as llama.cpp does.
    /// `None`: not even 32-blocks fit (the weight stays in full precision, as llama.cpp's
    /// quantizer falls back to F16 there).
    fn ggml_for(t: GgmlDType, cols: usize) -> Option<GgmlDType> {
        if cols.is_multiple_of(t.block_size()) {
            return Some(t);
        }
        let fallback = match t {
            GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K => GgmlDType::Q4_0,
            GgmlDType::Q5K => GgmlDType::Q5_0,
            _ => GgmlDType::Q8_0,
        };
        cols.is_multiple_of(fallback.block_size())
            .then_some(fallback)
    }

    /// Bits a stored weight takes, scales included.
    pub fn bits_per_weight(self) -> f64 {
        match self {
            QuantFormat::Ggml(t) => (t.type_size() * 8) as f64 / t.block_size() as f64,
            QuantFormat::Bnb4 { double: false, .. } => 4.0 + 32.0 / bnb::BLOCK as f64,
            QuantFormat::Bnb4 { double: true, .. } => {
                4.0 + (8.0 + 32.0 / bnb::STATS_BLOCK as f64) / bnb::BLOCK as f64
            }
            // Scales in 16 bits and zeros in `bits` per group.
            QuantFormat::Gptq { bits, group_size } => {
                let g = group_size.unwrap_or(4096) as f64;
                bits as f64 + (16.0 + bits as f64) / g
            }
        }
    }

    /// Whether a weight with rows of `cols` values can be stored in this format.
    pub fn fits(self, cols: usize) -> bool {
        match self {
            QuantFormat::Ggml(t) => Self::ggml_for(t, cols).is_some(),
            QuantFormat::Bnb4 { .. } => true,
            QuantFormat::Gptq { bits, .. } => (cols * bits as usize).is_multiple_of(32),
        }
    }
}

enum Store {
    /// Tiles of consecutive rows, each its own quantized tensor.
    Ggml(Vec<QTensor>),
    /// The whole flattened weight, as bitsandbytes stores it.
    Bnb4(bnb::Bnb4),
    /// Packed integers with per-group scales and zeros.
    Gptq(gptq::Quantized),
}

/// A frozen `(rows, cols)` weight in a quantized format.
pub struct QuantWeight {
    /// The format asked for; a GGML weight may store a narrower-row fallback (see `stored`).
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    /// Rows per tile: dequantized at once, the unit of [`quant_linear`]'s work.
    pub tile_rows: usize,
    store: Store,
    device: Device,
}

/// About 4 M values (16 MB in f32) per dequantized tile.
const TILE_VALUES: usize = 1 << 22;

impl QuantWeight {
    /// Quantizes the `(rows, cols)` weight `w`.
    pub fn quantize(w: &Tensor, format: QuantFormat) -> Result<Arc<Self>> {
        let (rows, cols) = w.dims2()?;
        let tile_rows = (TILE_VALUES / cols.max(1)).clamp(1, rows.max(1));
        let device = w.device().clone();
        let store = match format {
            QuantFormat::Ggml(t) => {
                let Some(t) = QuantFormat::ggml_for(t, cols) else {
                    bail!("a weight with rows of {cols} values cannot be stored as {t:?}: rows must be a multiple of 32");
                };
                let w = w.to_dtype(DType::F32)?;
                let mut tiles = Vec::new();
                for r0 in (0..rows).step_by(tile_rows) {
                    let n = tile_rows.min(rows - r0);
                    tiles.push(QTensor::quantize(&w.narrow(0, r0, n)?, t)?);
                }
                Store::Ggml(tiles)
            }
            QuantFormat::Bnb4 { kind, double } => {
                let flat = w
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_device(&Device::Cpu)?
                    .to_vec1::<f32>()?;
                Store::Bnb4(bnb::Bnb4::quantize(&flat, kind, double))
            }
            QuantFormat::Gptq { bits, group_size } => {
                let cfg = gptq::GptqConfig {
                    group_size,
                    ..gptq::GptqConfig::new(bits)
                };
                Store::Gptq(gptq::rtn(w, &cfg)?)
            }
        };
        Ok(Arc::new(Self {
            format,
            rows,
            cols,
            tile_rows,
            store,
            device,
        }))
    }

    /// A GGML tensor as stored in a GGUF file, used as it is (no re-quantization).
    pub fn from_qtensor(q: QTensor, device: &Device) -> Result<Arc<Self>> {
        let (rows, cols) = q.shape().dims2()?;
        let dtype = q.dtype();
        let tile_rows = (TILE_VALUES / cols.max(1)).clamp(1, rows.max(1));
        let data = q.data()?;
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let mut tiles = Vec::new();
        for r0 in (0..rows).step_by(tile_rows) {
            let n = tile_rows.min(rows - r0);
            let bytes = &data[r0 * row_bytes..(r0 + n) * row_bytes];
            let storage = QStorage::from_data(std::borrow::Cow::Borrowed(bytes), device, dtype)?;
            tiles.push(QTensor::new(storage, (n, cols))?);
        }
        Ok(Arc::new(Self {
            format: QuantFormat::Ggml(dtype),
            rows,
            cols,
            tile_rows,
            store: Store::Ggml(tiles),
            device: device.clone(),
        }))
    }

    /// A GPTQ checkpoint's weight, used as stored.
    pub fn from_gptq(q: gptq::Quantized, group_size: Option<usize>, device: &Device) -> Arc<Self> {
        let (rows, cols) = (q.rows, q.cols);
        Arc::new(Self {
            format: QuantFormat::Gptq {
                bits: q.bits,
                group_size,
            },
            rows,
            cols,
            tile_rows: (TILE_VALUES / cols.max(1)).clamp(1, rows.max(1)),
            store: Store::Gptq(q),
            device: device.clone(),
        })
    }

    /// How the weight is stored (a GGML fallback type where the rows asked for it).
    pub fn stored(&self) -> QuantFormat {
        match &self.store {
            Store::Ggml(t) => QuantFormat::Ggml(t.first().map_or(GgmlDType::Q8_0, QTensor::dtype)),
            Store::Bnb4(_) | Store::Gptq(_) => self.format,
        }
    }

    pub fn num_tiles(&self) -> usize {
        self.rows.div_ceil(self.tile_rows)
    }

    /// Rows `[r0, r0 + n)` of tile `i`.
    pub fn tile_span(&self, i: usize) -> (usize, usize) {
        let r0 = i * self.tile_rows;
        (r0, self.tile_rows.min(self.rows - r0))
    }

    /// Tile `i` dequantized, `(n, cols)` in `dtype` on the weight's device.
    pub fn dequantize_tile(&self, i: usize, dtype: DType) -> Result<Tensor> {
        let (r0, n) = self.tile_span(i);
        let t = match &self.store {
            Store::Ggml(tiles) => tiles[i].dequantize(&self.device)?,
            Store::Bnb4(data) => {
                let mut out = vec![0f32; n * self.cols];
                data.dequantize_range(r0 * self.cols, &mut out);
                Tensor::from_vec(out, (n, self.cols), &self.device)?
            }
            Store::Gptq(q) => {
                let mut out = vec![0f32; n * self.cols];
                q.dequantize_rows(r0, n, &mut out);
                Tensor::from_vec(out, (n, self.cols), &self.device)?
            }
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// The whole weight dequantized (merging an adapter, exporting).
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let tiles = (0..self.num_tiles())
            .map(|i| self.dequantize_tile(i, dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&tiles, 0)?)
    }

    /// Bytes the stored weight takes.
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Ggml(tiles) => tiles.iter().map(QTensor::storage_size_in_bytes).sum(),
            Store::Bnb4(data) => data.bytes(),
            Store::Gptq(q) => q.packed_bytes(),
        }
    }

    /// Per-row L2 norms of `W + delta` (`delta` is `(rows, cols)` or none), a tile at a time and
    /// outside the graph: DoRA's weight norm on a quantized base.
    pub fn row_norms(&self, delta: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
        let mut norms = Vec::with_capacity(self.num_tiles());
        for i in 0..self.num_tiles() {
            let (r0, n) = self.tile_span(i);
            let mut w = self.dequantize_tile(i, dtype)?;
            if let Some(d) = delta {
                w = (w + d.narrow(0, r0, n)?.detach().to_dtype(dtype)?)?;
            }
            norms.push(w.sqr()?.sum(1)?.sqrt()?);
        }
        Ok(Tensor::cat(&norms, 0)?)
    }
}
