//! Attention in f32 on the CPU a block of query rows at a time, each block's products and
//! softmax stopping at the block's last visible key. Under a causal mask the keys after a block's
//! last row are hidden from all of its rows (the model's masks add −1e9 there, so their
//! probabilities are exactly 0): skipping them changes no value and saves close to half of the
//! square products' work (`q·kᵀ`, `p·v` forward; the recomputed `q·kᵀ`, `pᵀ·g`, `g·vᵀ`,
//! `dz·k`, `dzᵀ·q` backward). A block whose rows see no key at all keeps every key, as the
//! composed softmax does. The products run on the `gemm` crate one block per thread, with the
//! operands read in place through their strides (no transposed copies), and nothing of size
//! `rows × keys` outlives its block.
//!
//! Layouts as in `ops::attention`: `q`, `o`, `dq` are `(B, kv, rep·n, hd)` — per kv head (a
//! *group*) the `rep` query heads stacked along the rows; `k`, `v`, `dk`, `dv` are
//! `(B, kv, total, hd)`; the additive `mask` is `(B or 1, 1, n, total)`.

use rayon::prelude::*;

use super::rowwise::{softmax_bwd_row, softmax_row, visible_keys};

/// Query rows per block: small enough that the causal skip is fine-grained, large enough for
/// the products to run at speed.
const ROWS: usize = 32;

/// What one attention call computes on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub batch: usize,
    pub kv_heads: usize,
    /// Query heads per kv head.
    pub rep: usize,
    /// Query positions.
    pub n: usize,
    /// Keys (cached prefix included).
    pub total: usize,
    pub head_dim: usize,
    /// Whether the mask has one table per batch row (else one for all).
    pub mask_per_row: bool,
    pub scale: f32,
}

/// A block of query rows of one group.
#[derive(Debug, Clone, Copy)]
struct Block {
    group: usize,
    /// First row in the group's stack of `rep · n`.
    row: usize,
    rows: usize,
    /// Query position of the first row.
    pos: usize,
    /// Keys the block's products cover: one past the last key any of its rows sees.
    keys: usize,
}

impl Dims {
    fn groups(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// The mask's row for query position `pos` of group `group`.
    fn mask_row<'m>(&self, mask: &'m [f32], group: usize, pos: usize) -> &'m [f32] {
        let b = if self.mask_per_row {
            group / self.kv_heads
        } else {
            0
        };
        &mask[(b * self.n + pos) * self.total..][..self.total]
    }

    /// The blocks in storage order (group by group, rows ascending; a block never crosses from
    /// one query head to the next).
    fn blocks(&self, mask: &[f32]) -> Vec<Block> {
        let mut out = Vec::new();
        for group in 0..self.groups() {
            // Positions' extents, shared by the group's query heads.
            let ext: Vec<usize> = (0..self.n)
                .map(|pos| visible_keys(self.mask_row(mask, group, pos)).end)
                .collect();
            for head in 0..self.rep {
                for pos in (0..self.n).step_by(ROWS) {
                    let rows = ROWS.min(self.n - pos);
                    out.push(Block {
                        group,
                        row: head * self.n + pos,
                        rows,
                        pos,
                        keys: ext[pos..pos + rows].iter().copied().max().unwrap_or(0),
                    });
                }
            }
        }
        out
    }

    /// `(q-like rows of the block, k-like rows the block sees)` offsets and lengths.
    fn spans(&self, b: &Block) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let hd = self.head_dim;
        let q0 = (b.group * self.rep * self.n + b.row) * hd;
        let k0 = b.group * self.total * hd;
        (q0..q0 + b.rows * hd, k0..k0 + b.keys * hd)
    }
}

/// A matrix read through strides: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// Row-major `rows × cols`.
    fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = a·b` (`add`: `dst += a·b`) for a row-major `dst` of `a.rows × b.cols`, on this thread.
fn product(dst: &mut [f32], add: bool, a: View, b: View) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(b.rows == k && a.fits() && b.fits() && dst.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !add {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: every index the product reads or writes was checked above to lie inside the
    // slices (`fits`, `dst.len()`), and `dst` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            add,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The block's probabilities, `softmax(scale · q·kᵀ + mask)` over its keys, into `p`
/// (`rows × keys`), with `z` as scratch.
fn probs(
    d: &Dims,
    b: &Block,
    q: &[f32],
    k: &[f32],
    mask: &[f32],
    z: &mut Vec<f32>,
    p: &mut Vec<f32>,
) {
    let (qs, ks) = d.spans(b);
    let (hd, e) = (d.head_dim, b.keys);
    z.resize(b.rows * e, 0.0);
    p.resize(b.rows * e, 0.0);
    product(
        z,
        false,
        View::new(&q[qs], b.rows, hd),
        View::new(&k[ks], e, hd).t(),
    );
    for (r, (pr, zr)) in p.chunks_mut(e).zip(z.chunks(e)).enumerate() {
        let m = &d.mask_row(mask, b.group, b.pos + r)[..e];
        softmax_row(pr, zr, m, d.scale);
    }
}

/// Splits `data` into consecutive pieces, one per run of blocks, each of the run's rows ×
/// `head_dim` (a run of one block: that block's rows).
fn split_rows<'a, 'b>(
    mut data: &'a mut [f32],
    runs: impl IntoIterator<Item = &'b [Block]>,
    hd: usize,
) -> Vec<&'a mut [f32]> {
    runs.into_iter()
        .map(|run| {
            let len = run.iter().map(|b| b.rows * hd).sum();
            let (head, tail) = std::mem::take(&mut data).split_at_mut(len);
            data = tail;
            head
        })
        .collect()
}

/// `softmax(scale · q·kᵀ + mask) · v`, `(B, kv, rep·n, hd)`.
pub(super) fn forward(d: &Dims, q: &[f32], k: &[f32], v: &[f32], mask: &[f32]) -> Vec<f32> {
    let blocks = d.blocks(mask);
    let mut o = vec![0f32; q.len()];
    let outs = split_rows(&mut o, blocks.chunks(1), d.head_dim);
    blocks.par_iter().zip(outs).for_each_init(
        || (Vec::new(), Vec::new()),
        |(z, p), (b, out)| {
            probs(d, b, q, k, mask, z, p);
            let (_, ks) = d.spans(b);
            product(
                out,
                false,
                View::new(p, b.rows, b.keys),
                View::new(&v[ks], b.keys, d.head_dim),
            );
        },
    );
    o
}

/// `(dq, dk, dv)` for the output gradient `g` (laid out as `q`), the probabilities recomputed.
pub(super) fn backward(
    d: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    g: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = d.head_dim;
    let blocks = d.blocks(mask);
    // Runs of a group's blocks, each on one thread with its own key-side sums: one run per
    // group when the groups alone keep the threads busy, else a few per group.
    let per_group = blocks.len() / d.groups().max(1);
    let runs_per_group = (4 * rayon::current_num_threads())
        .div_ceil(d.groups().max(1))
        .clamp(1, per_group.max(1));
    let run_len = per_group.div_ceil(runs_per_group).max(1);
    let runs: Vec<&[Block]> = blocks
        .chunks(per_group.max(1))
        .flat_map(|group| group.chunks(run_len))
        .collect();
    let mut dq = vec![0f32; q.len()];
    let dq_runs = split_rows(&mut dq, runs.iter().copied(), hd);
    // Each run: its dq rows written, its dk and dv sums over the keys it sees returned.
    let sums: Vec<(usize, Vec<f32>, Vec<f32>)> = runs
        .par_iter()
        .zip(dq_runs)
        .map(|(run, dq_run)| {
            let keys = run.iter().map(|b| b.keys).max().unwrap_or(0);
            let (mut dk, mut dv) = (vec![0f32; keys * hd], vec![0f32; keys * hd]);
            let (mut z, mut p, mut dz) = (Vec::new(), Vec::new(), Vec::new());
            for (b, dq_b) in run.iter().zip(split_rows(dq_run, run.chunks(1), hd)) {
                let (qs, ks) = d.spans(b);
                let (rows, e) = (b.rows, b.keys);
                probs(d, b, q, k, mask, &mut z, &mut p);
                let (qb, gb) = (
                    View::new(&q[qs.clone()], rows, hd),
                    View::new(&g[qs], rows, hd),
                );
                let (kb, vb) = (View::new(&k[ks.clone()], e, hd), View::new(&v[ks], e, hd));
                let pv = View::new(&p, rows, e);
                product(&mut dv, true, pv.t(), gb);
                // z ← dp = g·vᵀ, then dz = scale · p ⊙ (dp − Σ dp⊙p).
                product(&mut z, false, gb, vb.t());
                dz.resize(rows * e, 0.0);
                for ((o, pr), dpr) in dz.chunks_mut(e).zip(p.chunks(e)).zip(z.chunks(e)) {
                    softmax_bwd_row(o, pr, dpr, d.scale);
                }
                let dzv = View::new(&dz, rows, e);
                product(dq_b, false, dzv, kb);
                product(&mut dk, true, dzv.t(), qb);
            }
            (run[0].group, dk, dv)
        })
        .collect();
    let size = d.total * hd;
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    dk.par_chunks_mut(size)
        .zip(dv.par_chunks_mut(size))
        .enumerate()
        .for_each(|(group, (dk, dv))| {
            for (_, sk, sv) in sums.iter().filter(|s| s.0 == group) {
                for (a, b) in dk.iter_mut().zip(sk) {
                    *a += b;
                }
                for (a, b) in dv.iter_mut().zip(sv) {
                    *a += b;
                }
            }
        });
    (dq, dk, dv)
}
