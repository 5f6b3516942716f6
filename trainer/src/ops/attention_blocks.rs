//! Attention in f32 on the CPU a block of query rows at a time, each block's products and
//! softmax stopping at the block's last visible key. Under a causal mask the keys after a block's
//! last row are hidden from all of its rows (the model's masks add −1e9 there, so their
//! probabilities are exactly 0): skipping them changes no value and saves close to half of the
//! square products' work (`q·kᵀ`, `p·v` forward; the recomputed `q·kᵀ`, `pᵀ·g`, `g·vᵀ`,
//! `dz·k`, `dzᵀ·q` backward). A block whose rows see no key at all keeps every key, as the
//! composed softmax does. The products run one block per thread, on the `gemm` crate in f32
//! with the operands read in place through their strides (no transposed copies), or — the CPU's
//! `bf16: true` — on AMX tiles with both operands rounded to bf16 (each group's `k` and `v`
//! packed once per pass, a block's own operands on its thread); nothing of size `rows × keys`
//! outlives its block.
//!
//! Layouts as in `ops::attention`: `q`, `o`, `dq` are `(B, kv, rep·n, hd)` — per kv head (a
//! *group*) the `rep` query heads stacked along the rows; `k`, `v`, `dk`, `dv` are
//! `(B, kv, total, hd)`; the additive `mask` is `(B or 1, 1, n, total)`.

use rayon::prelude::*;

use super::amx_bf16::{self, PackedA, PackedB};
use super::rowwise::{softmax_bwd_row, softmax_row, visible_keys};

/// Query rows per block: small enough that the causal skip is fine-grained, large enough for
/// the products to run at speed.
const ROWS: usize = 32;

/// What one attention call computes on.
#[derive(Debug, Clone)]
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
    /// Columns of a row of the mask's table.
    pub mask_cols: usize,
    pub scale: f32,
    /// Products in bf16 on AMX tiles (else f32).
    pub bf16: bool,
    /// The sequences of each row, each attending within itself; in order, covering the `n`
    /// positions. One for a padded batch; the packed sequences of a padding-free row.
    pub segs: Vec<Seg>,
}

/// A sequence of query positions `q0 .. q0 + len` and the keys `k0 .. k0 + keys` it attends
/// to, its mask the table's top-left `len × keys` corner (a causal table serves every shorter
/// sequence that way).
#[derive(Debug, Clone, Copy)]
pub(super) struct Seg {
    pub q0: usize,
    pub len: usize,
    pub k0: usize,
    pub keys: usize,
}

/// A block of query rows of one group.
#[derive(Debug, Clone, Copy)]
struct Block {
    group: usize,
    /// Its sequence (an index into `Dims::segs`).
    seg: usize,
    /// First row in the group's stack of `rep · n`.
    row: usize,
    rows: usize,
    /// Query position of the first row.
    pos: usize,
    /// Keys the block's products cover from its sequence's first: one past the last key any of
    /// its rows sees.
    keys: usize,
}

impl Dims {
    fn groups(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// The mask's row for query position `pos` of group `group` in sequence `seg`, over the
    /// sequence's keys.
    fn mask_row<'m>(&self, mask: &'m [f32], group: usize, seg: usize, pos: usize) -> &'m [f32] {
        let s = &self.segs[seg];
        let table = if self.mask_per_row {
            group / self.kv_heads * self.n * self.mask_cols
        } else {
            0
        };
        &mask[table + (pos - s.q0) * self.mask_cols..][..s.keys]
    }

    /// The blocks in storage order (group by group, rows ascending; a block never crosses from
    /// one query head, or one sequence, to the next).
    fn blocks(&self, mask: &[f32]) -> Vec<Block> {
        let mut out = Vec::new();
        // Positions' extents, per table of the mask (shared by the groups that read it).
        let extents = |group: usize| {
            let mut ext = vec![0; self.n];
            for (i, s) in self.segs.iter().enumerate() {
                let span = &mut ext[s.q0..s.q0 + s.len];
                for (e, pos) in span.iter_mut().zip(s.q0..) {
                    *e = visible_keys(self.mask_row(mask, group, i, pos)).end;
                }
            }
            ext
        };
        let per_table = if self.mask_per_row {
            self.kv_heads
        } else {
            self.groups()
        };
        let mut ext = Vec::new();
        for group in 0..self.groups() {
            if group % per_table == 0 {
                ext = extents(group);
            }
            for head in 0..self.rep {
                for (seg, s) in self.segs.iter().enumerate() {
                    for pos in (s.q0..s.q0 + s.len).step_by(ROWS) {
                        let rows = ROWS.min(s.q0 + s.len - pos);
                        out.push(Block {
                            group,
                            seg,
                            row: head * self.n + pos,
                            rows,
                            pos,
                            keys: ext[pos..pos + rows].iter().copied().max().unwrap_or(0),
                        });
                    }
                }
            }
        }
        out
    }

    /// The first key block `b`'s products cover: its sequence's.
    fn k0(&self, b: &Block) -> usize {
        self.segs[b.seg].k0
    }

    /// `(q-like rows of the block, k-like rows the block sees)` offsets and lengths.
    fn spans(&self, b: &Block) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let hd = self.head_dim;
        let q0 = (b.group * self.rep * self.n + b.row) * hd;
        let k0 = (b.group * self.total + self.k0(b)) * hd;
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

/// Which of a group's key-side matrices a product takes.
#[derive(Clone, Copy)]
enum Keyed {
    K,
    V,
}

/// A block's products with its group's keys or values `M` (`k` or `v`, `(total, hd)`) over the
/// block's `e` visible keys, in f32 ([`F32`]) or in bf16 on AMX tiles ([`Tiles`]).
trait Products: Sync {
    /// A thread's scratch.
    type Scratch: Default + Send;
    /// Whether a run's key-side sums are kept transposed, `(hd, keys)` rather than `(keys, hd)`.
    const SUMS_TRANSPOSED: bool;
    /// `out (rows × e) = x (rows × hd) · M[..e]ᵀ`.
    fn times_t(&self, s: &mut Self::Scratch, b: &Block, m: Keyed, x: &[f32], out: &mut [f32]);
    /// `out (rows × hd) = x (rows × e) · M[..e]`.
    fn times(&self, s: &mut Self::Scratch, b: &Block, m: Keyed, x: &[f32], out: &mut [f32]);
    /// `sum += xᵀ · y` for `x (rows × e)`, `y (rows × hd)`, into a run's sums of `keys` keys
    /// (laid out as [`Products::SUMS_TRANSPOSED`] says).
    fn add_t_times(
        &self,
        s: &mut Self::Scratch,
        b: &Block,
        x: &[f32],
        y: &[f32],
        sum: &mut [f32],
        keys: usize,
    );
}

/// The products on the `gemm` crate in f32, the operands read in place through their strides.
struct F32<'a> {
    d: &'a Dims,
    k: &'a [f32],
    v: &'a [f32],
}

impl F32<'_> {
    fn keyed(&self, b: &Block, m: Keyed) -> View<'_> {
        let (_, ks) = self.d.spans(b);
        let m = match m {
            Keyed::K => self.k,
            Keyed::V => self.v,
        };
        View::new(&m[ks], b.keys, self.d.head_dim)
    }
}

impl Products for F32<'_> {
    type Scratch = ();
    const SUMS_TRANSPOSED: bool = false;

    fn times_t(&self, _: &mut (), b: &Block, m: Keyed, x: &[f32], out: &mut [f32]) {
        let x = View::new(x, b.rows, self.d.head_dim);
        product(out, false, x, self.keyed(b, m).t());
    }

    fn times(&self, _: &mut (), b: &Block, m: Keyed, x: &[f32], out: &mut [f32]) {
        product(out, false, View::new(x, b.rows, b.keys), self.keyed(b, m));
    }

    fn add_t_times(&self, _: &mut (), b: &Block, x: &[f32], y: &[f32], sum: &mut [f32], _: usize) {
        let x = View::new(x, b.rows, b.keys);
        product(sum, true, x.t(), View::new(y, b.rows, self.d.head_dim));
    }
}

/// The products in bf16 on AMX tiles (the CPU's `bf16: true`), as PyTorch's attention computes
/// under bf16 autocast: both operands rounded to bf16, sums in f32. Each sequence's `k` and `v`
/// are packed once per call and group, in the orientations the pass needs; a block's own
/// operands are packed on its thread.
struct Tiles {
    /// Per group and sequence (`group · segs + seg`), `M` packed as `B (keys, hd)` for
    /// [`Products::times`] (empty when the pass does not need it).
    plain: [Vec<PackedB>; 2],
    /// Per group and sequence, `Mᵀ` packed as `B (hd, keys)` for [`Products::times_t`].
    transposed: [Vec<PackedB>; 2],
    hd: usize,
    segs: usize,
}

impl Tiles {
    /// Packs `(matrix, transposed)` for each of `wanted`.
    fn new(d: &Dims, k: &[f32], v: &[f32], wanted: &[(Keyed, bool)]) -> Self {
        let (hd, total, segs) = (d.head_dim, d.total, d.segs.len());
        let mut tiles = Self {
            plain: Default::default(),
            transposed: Default::default(),
            hd,
            segs,
        };
        for &(m, t) in wanted {
            let src = match m {
                Keyed::K => k,
                Keyed::V => v,
            };
            let packs = (0..d.groups() * segs)
                .into_par_iter()
                .map(|i| {
                    let s = &d.segs[i % segs];
                    let src = &src[((i / segs) * total + s.k0) * hd..][..s.keys * hd];
                    let mut b = PackedB::default();
                    if t {
                        b.pack_here(src, hd, s.keys, 1, hd);
                    } else {
                        b.pack_here(src, s.keys, hd, hd, 1);
                    }
                    b
                })
                .collect();
            match t {
                true => tiles.transposed[m as usize] = packs,
                false => tiles.plain[m as usize] = packs,
            }
        }
        tiles
    }
}

/// A thread's packed operands for [`Tiles`].
#[derive(Default)]
struct TileScratch {
    a: PackedA,
    b: PackedB,
}

impl Products for Tiles {
    type Scratch = TileScratch;
    const SUMS_TRANSPOSED: bool = true;

    fn times_t(&self, s: &mut TileScratch, b: &Block, m: Keyed, x: &[f32], out: &mut [f32]) {
        s.a.pack(x, b.rows, self.hd, self.hd, 1);
        let mt = &self.transposed[m as usize][b.group * self.segs + b.seg];
        amx_bf16::matmul_here(&s.a, mt, b.keys, out, b.keys, false);
    }

    fn times(&self, s: &mut TileScratch, b: &Block, m: Keyed, x: &[f32], out: &mut [f32]) {
        s.a.pack(x, b.rows, b.keys, b.keys, 1);
        let mp = &self.plain[m as usize][b.group * self.segs + b.seg];
        amx_bf16::matmul_here(&s.a, mp, self.hd, out, self.hd, false);
    }

    /// As `sumᵀ += yᵀ · x`: `y`'s block is the smaller to read transposed.
    fn add_t_times(
        &self,
        s: &mut TileScratch,
        b: &Block,
        x: &[f32],
        y: &[f32],
        sum: &mut [f32],
        keys: usize,
    ) {
        s.a.pack(y, self.hd, b.rows, 1, self.hd);
        s.b.pack_here(x, b.rows, b.keys, b.keys, 1);
        amx_bf16::matmul_here(&s.a, &s.b, b.keys, sum, keys, true);
    }
}

/// The block's probabilities, `softmax(scale · q·kᵀ + mask)` over its keys, into `p`
/// (`rows × keys`), with `z` as scratch.
#[allow(clippy::too_many_arguments)]
fn probs<P: Products>(
    pr: &P,
    s: &mut P::Scratch,
    d: &Dims,
    b: &Block,
    q: &[f32],
    mask: &[f32],
    z: &mut Vec<f32>,
    p: &mut Vec<f32>,
) {
    let (qs, _) = d.spans(b);
    let e = b.keys;
    z.resize(b.rows * e, 0.0);
    p.resize(b.rows * e, 0.0);
    pr.times_t(s, b, Keyed::K, &q[qs], z);
    for (r, (pr, zr)) in p.chunks_mut(e).zip(z.chunks(e)).enumerate() {
        let m = &d.mask_row(mask, b.group, b.seg, b.pos + r)[..e];
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
    if d.bf16 {
        let tiles = Tiles::new(d, k, v, &[(Keyed::K, true), (Keyed::V, false)]);
        forward_on(&tiles, d, q, mask)
    } else {
        forward_on(&F32 { d, k, v }, d, q, mask)
    }
}

fn forward_on<P: Products>(pr: &P, d: &Dims, q: &[f32], mask: &[f32]) -> Vec<f32> {
    let blocks = d.blocks(mask);
    let mut o = vec![0f32; q.len()];
    let outs = split_rows(&mut o, blocks.chunks(1), d.head_dim);
    blocks.par_iter().zip(outs).for_each_init(
        || (P::Scratch::default(), Vec::new(), Vec::new()),
        |(s, z, p), (b, out)| {
            probs(pr, s, d, b, q, mask, z, p);
            pr.times(s, b, Keyed::V, p, out);
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
    if d.bf16 {
        let wanted = [(Keyed::K, true), (Keyed::V, true), (Keyed::K, false)];
        let tiles = Tiles::new(d, k, v, &wanted);
        backward_on(&tiles, d, q, mask, g)
    } else {
        backward_on(&F32 { d, k, v }, d, q, mask, g)
    }
}

fn backward_on<P: Products>(
    pr: &P,
    d: &Dims,
    q: &[f32],
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
    // Each run: its dq rows written, its dk and dv sums over the keys it sees (from its
    // first) returned.
    let sums: Vec<RunSums> = runs
        .par_iter()
        .zip(dq_runs)
        .map(|(run, dq_run)| {
            let k0 = run.iter().map(|b| d.k0(b)).min().unwrap_or(0);
            let keys = run.iter().map(|b| d.k0(b) + b.keys).max().unwrap_or(0) - k0;
            let (mut dk, mut dv) = (vec![0f32; keys * hd], vec![0f32; keys * hd]);
            // A block's sums start at its first key.
            let at = |b: &Block| (d.k0(b) - k0) * if P::SUMS_TRANSPOSED { 1 } else { hd };
            let mut s = P::Scratch::default();
            let (mut z, mut p, mut dz) = (Vec::new(), Vec::new(), Vec::new());
            for (b, dq_b) in run.iter().zip(split_rows(dq_run, run.chunks(1), hd)) {
                let (qs, _) = d.spans(b);
                let (qb, gb) = (&q[qs.clone()], &g[qs]);
                probs(pr, &mut s, d, b, q, mask, &mut z, &mut p);
                pr.add_t_times(&mut s, b, &p, gb, &mut dv[at(b)..], keys);
                // z ← dp = g·vᵀ, then dz = scale · p ⊙ (dp − Σ dp⊙p).
                pr.times_t(&mut s, b, Keyed::V, gb, &mut z);
                dz.resize(b.rows * b.keys, 0.0);
                let e = b.keys;
                for ((o, pb), dpb) in dz.chunks_mut(e).zip(p.chunks(e)).zip(z.chunks(e)) {
                    softmax_bwd_row(o, pb, dpb, d.scale);
                }
                pr.times(&mut s, b, Keyed::K, &dz, dq_b);
                pr.add_t_times(&mut s, b, &dz, qb, &mut dk[at(b)..], keys);
            }
            RunSums {
                group: run[0].group,
                k0,
                keys,
                dk,
                dv,
            }
        })
        .collect();
    let size = d.total * hd;
    let mut dk = vec![0f32; size * d.groups()];
    let mut dv = vec![0f32; size * d.groups()];
    dk.par_chunks_mut(size)
        .zip(dv.par_chunks_mut(size))
        .enumerate()
        .for_each(|(group, (dk, dv))| {
            for r in sums.iter().filter(|r| r.group == group) {
                add_sums::<P>(&mut dk[r.k0 * hd..], &r.dk, r.keys, hd);
                add_sums::<P>(&mut dv[r.k0 * hd..], &r.dv, r.keys, hd);
            }
        });
    (dq, dk, dv)
}

/// A backward run's sums for its group's `dk` and `dv`, over `keys` keys from `k0`.
struct RunSums {
    group: usize,
    k0: usize,
    keys: usize,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Adds a run's key-side sums over `keys` keys into a group's `(keys.., hd)` from the first.
fn add_sums<P: Products>(dst: &mut [f32], sum: &[f32], keys: usize, hd: usize) {
    if !P::SUMS_TRANSPOSED {
        for (a, b) in dst.iter_mut().zip(sum) {
            *a += b;
        }
        return;
    }
    for (j, col) in sum.chunks(keys.max(1)).enumerate() {
        for (key, b) in col.iter().enumerate() {
            dst[key * hd + j] += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::wave;
    use super::*;
    use crate::ops::amx_bf16::round_to_bf16;

    /// Attention in f64 for the block layouts, each product's operands rounded to bf16 first
    /// when `round` (as the tiles take them: `q`, `k` for the scores; `p`, `v` for the output;
    /// `p`, `g` for `dv`; `g`, `v` for `dp`; `dz` with `k` and with `q` for `dq` and `dk`).
    /// `(o, dq, dk, dv)`.
    fn reference(
        d: &Dims,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[f32],
        g: &[f32],
        round: bool,
    ) -> [Vec<f64>; 4] {
        let r = |x: f32| {
            if round {
                round_to_bf16(x) as f64
            } else {
                x as f64
            }
        };
        let (hd, total, rn) = (d.head_dim, d.total, d.rep * d.n);
        let mut o = vec![0f64; q.len()];
        let mut dq = vec![0f64; q.len()];
        let mut dk = vec![0f64; k.len()];
        let mut dv = vec![0f64; v.len()];
        for grp in 0..d.groups() {
            let kv = |m: &[f32], j: usize, c: usize| m[(grp * total + j) * hd + c];
            for row in 0..rn {
                let at = (grp * rn + row) * hd;
                let pos = row % d.n;
                let seg = d.segs.iter().position(|s| pos < s.q0 + s.len).unwrap();
                let (k0, mrow) = (d.segs[seg].k0, d.mask_row(mask, grp, seg, pos));
                // Keys outside the sequence as if masked.
                let x: Vec<f64> = (0..total)
                    .map(|j| {
                        let z: f64 = (0..hd).map(|c| r(q[at + c]) * r(kv(k, j, c))).sum();
                        let m = mrow.get(j.wrapping_sub(k0)).map_or(-1e9, |&m| m as f64);
                        d.scale as f64 * z + m
                    })
                    .collect();
                let top = x.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = x.iter().map(|x| (x - top).exp()).collect();
                let sum: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|e| e / sum).collect();
                let rp = |j: usize| {
                    if round {
                        round_to_bf16(p[j] as f32) as f64
                    } else {
                        p[j]
                    }
                };
                let dp: Vec<f64> = (0..total)
                    .map(|j| (0..hd).map(|c| r(g[at + c]) * r(kv(v, j, c))).sum())
                    .collect();
                let dot: f64 = (0..total).map(|j| dp[j] * p[j]).sum();
                let dz: Vec<f64> = (0..total)
                    .map(|j| {
                        let dz = d.scale as f64 * p[j] * (dp[j] - dot);
                        if round {
                            round_to_bf16(dz as f32) as f64
                        } else {
                            dz
                        }
                    })
                    .collect();
                for c in 0..hd {
                    o[at + c] = (0..total).map(|j| rp(j) * r(kv(v, j, c))).sum();
                    dq[at + c] = (0..total).map(|j| dz[j] * r(kv(k, j, c))).sum();
                }
                for (j, dzj) in dz.iter().enumerate() {
                    for c in 0..hd {
                        let kvat = (grp * total + j) * hd + c;
                        dv[kvat] += rp(j) * r(g[at + c]);
                        dk[kvat] += dzj * r(q[at + c]);
                    }
                }
            }
        }
        [o, dq, dk, dv]
    }

    fn rms(a: &[f32], b: &[f64]) -> f64 {
        let s: f64 = a.iter().zip(b).map(|(&a, b)| (a as f64 - b).powi(2)).sum();
        (s / a.len() as f64).sqrt()
    }

    /// With the products on AMX tiles, the forward and backward equal attention computed in f64
    /// from operands rounded to bf16 as the tiles take them — much closer than to attention on
    /// the unrounded operands (the rounding is real and where it should be). GQA with three
    /// query heads per kv head, 70 positions (two full blocks and a ragged one), a head
    /// dimension of 20 (no whole tile), a causal mask per batch row (the second row two packed
    /// sequences), one over a cached prefix of five keys, and a padding-free row of three
    /// sequences (30, 25, 15) under one causal table of 40.
    #[test]
    fn tiles_take_the_operands_rounded_to_bf16() {
        if !amx_bf16::available() {
            eprintln!("skipped: this CPU (or OS) offers no AMX-BF16 tiles");
            return;
        }
        let (batch, kv_heads, rep, n, hd) = (2, 2, 3, 70, 20);
        let causal = |total: usize, second: usize| -> Vec<f32> {
            (0..n * total)
                .map(|i| {
                    let (pos, key) = (i / total, i % total);
                    let hidden = key > pos + (total - n) || (pos >= second && key < second);
                    if hidden {
                        -1e9
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let one = |total| {
            vec![Seg {
                q0: 0,
                len: n,
                k0: 0,
                keys: total,
            }]
        };
        let packed: Vec<Seg> = [(0, 30), (30, 25), (55, 15)]
            .map(|(q0, len)| Seg {
                q0,
                len,
                k0: q0,
                keys: len,
            })
            .to_vec();
        let table: Vec<f32> = (0..40 * 40)
            .map(|i| if i % 40 > i / 40 { -1e9 } else { 0.0 })
            .collect();
        for (batch, total, per_row, segs) in [
            (batch, n, true, one(n)),
            (batch, n + 5, false, one(n + 5)),
            (1, n, false, packed),
        ] {
            let (mask, mask_cols) = match (per_row, segs.len()) {
                (true, _) => ([causal(n, n), causal(n, 30)].concat(), total),
                (false, 1) => (causal(total, n), total),
                _ => (table.clone(), 40),
            };
            let d = Dims {
                batch,
                kv_heads,
                rep,
                n,
                total,
                head_dim: hd,
                mask_per_row: per_row,
                mask_cols,
                scale: 0.3,
                bf16: true,
                segs,
            };
            let q = wave(batch * kv_heads * rep * n * hd, 0.0);
            let k = wave(batch * kv_heads * total * hd, 1.0);
            let v = wave(batch * kv_heads * total * hd, 2.0);
            let g = wave(q.len(), 3.0);
            let o = forward(&d, &q, &k, &v, &mask);
            let (dq, dk, dv) = backward(&d, &q, &k, &v, &mask, &g);
            let rounded = reference(&d, &q, &k, &v, &mask, &g, true);
            let exact = reference(&d, &q, &k, &v, &mask, &g, false);
            for (name, got, r, e) in [
                ("o", &o, &rounded[0], &exact[0]),
                ("dq", &dq, &rounded[1], &exact[1]),
                ("dk", &dk, &rounded[2], &exact[2]),
                ("dv", &dv, &rounded[3], &exact[3]),
            ] {
                let (to_rounded, to_exact) = (rms(got, r), rms(got, e));
                let segs = d.segs.len();
                let size = rms(&vec![0f32; got.len()], e);
                assert!(size > 1e-2, "{name}: not zero");
                assert!(
                    to_rounded <= 0.1 * to_exact && to_exact <= 1e-2 * size,
                    "{name} (total {total}, {segs} sequences): {to_rounded:.2e} from the rounded operands' \
                     attention, {to_exact:.2e} from the exact one (size {size:.2e})"
                );
            }
        }
    }
}
