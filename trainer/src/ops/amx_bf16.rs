//! bf16 matrix products on AMX tiles, for training on CPUs that have them (Sapphire Rapids and
//! later; x86-64 Linux): `C (m, n) = bf16(A) · B` in f32, with `A (m, k)` f32 rounded to bf16
//! (nearest-even) as it is packed and `B (k, n)` packed once into AMX's pair-interleaved layout
//! ([`PackedB`]). Products accumulate in f32 inside the tiles (`tdpbf16ps`), as PyTorch's
//! autocast does on these CPUs; the rest of a step stays f32.
//!
//! Layout: A is packed row-major into rows padded to 32 and columns padded to 32 (one tile's
//! depth); B into 1 KiB tiles of 32 rows × 16 columns, `[n-tile][k-tile][k/2][16][2]`, padded to
//! an even number of n-tiles. Each 32 × 32 block of C is 2 × 2 tiles in registers, fed by two A
//! and two B tiles per 32 steps of depth.
//!
//! A low-rank term `h · S` ([`LowRank`]: LoRA's `s·(x·Aᵀ)·Bᵀ`) joins a product as more depth:
//! `h`'s rows are packed after A's, `S` is packed as a second B, and the same tiles sum both.

use half::bf16;

/// Rows and columns of one tile of C; depth of one tile step.
const TILE: usize = 16;
const DEPTH: usize = 32;
/// A block of C: 2 × 2 tiles.
const BLOCK: usize = 32;
/// Bytes of packed B a thread sweeps its rows over before moving on: a panel that stays in
/// the core's L2 (2 MB on Sapphire Rapids) next to the thread's rows of A. Sweeping all of a
/// wide B (a 1,536-wide MLP weight, an LM head tile) for every block of rows instead streamed
/// it from L3 each time, and the products ran at half the speed of narrow ones.
const PANEL_BYTES: usize = 512 * 1024;

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// `x` rounded to bf16 (nearest, ties to even; NaN stays NaN), as its bits.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// `B (k, n)`, element `(i, j)` at `src[i·stride_k + j·stride_n]`, rounded to bf16 and packed
/// for [`matmul`]. Pack a frozen weight once and reuse it every step.
#[derive(Default)]
pub struct PackedB {
    k: usize,
    n: usize,
    k_tiles: usize,
    n_tiles: usize,
    data: Vec<u16>,
}

impl PackedB {
    pub fn new(src: &[f32], k: usize, n: usize, stride_k: usize, stride_n: usize) -> Self {
        let mut b = Self::default();
        b.layout(src, k, n, stride_k, stride_n);
        // One n-tile (16 columns × all of k) per task: disjoint slices of `data`.
        use rayon::prelude::*;
        b.data
            .par_chunks_mut(b.k_tiles * DEPTH * TILE)
            .enumerate()
            .for_each(|(nt, tiles)| pack_column(src, k, n, stride_k, stride_n, nt, tiles));
        b
    }

    /// Packs `B` as [`PackedB::new`] does, on the calling thread, into this buffer: for small
    /// operands packed per call (attention's, a block at a time).
    pub fn pack_here(&mut self, src: &[f32], k: usize, n: usize, stride_k: usize, stride_n: usize) {
        self.layout(src, k, n, stride_k, stride_n);
        let len = self.k_tiles * DEPTH * TILE;
        for (nt, tiles) in self.data.chunks_mut(len.max(1)).enumerate() {
            pack_column(src, k, n, stride_k, stride_n, nt, tiles);
        }
    }

    /// Sets the dimensions and a zeroed buffer of their size (checking `src` holds B).
    fn layout(&mut self, src: &[f32], k: usize, n: usize, stride_k: usize, stride_n: usize) {
        assert!(k == 0 || n == 0 || src.len() > (k - 1) * stride_k + (n - 1) * stride_n);
        let (k_tiles, n_tiles) = (k.div_ceil(DEPTH), round_up(n, BLOCK) / TILE);
        *self = Self {
            k,
            n,
            k_tiles,
            n_tiles,
            data: std::mem::take(&mut self.data),
        };
        self.data.clear();
        self.data.resize(n_tiles * k_tiles * DEPTH * TILE, 0);
    }

    /// `(k, n)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The packed values back as a row-major `(k, n)` matrix: B rounded to bf16.
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.k * self.n];
        for i in 0..self.k {
            let (kt, r) = (i / DEPTH, i % DEPTH);
            for j in 0..self.n {
                let (nt, jj) = (j / TILE, j % TILE);
                let at = nt * self.k_tiles * DEPTH * TILE
                    + kt * DEPTH * TILE
                    + (r / 2) * 2 * TILE
                    + jj * 2
                    + r % 2;
                out[i * self.n + j] = bf16::from_bits(self.data[at]).to_f32();
            }
        }
        out
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

/// Whether this process can run AMX-BF16 tiles: the CPU has them, the OS saves their state and
/// Linux granted this process the tile data (asked once).
pub fn available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| crate::sysinfo::bf16_units().amx_bf16 && kernel::request_tiles())
}

/// `c (m, n, row stride ldc) = bf16(a (m, k, row stride lda)) · b` in f32. Call only when
/// [`available`].
pub fn matmul(a: &[f32], m: usize, lda: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    assert!(m == 0 || c.len() >= (m - 1) * ldc + b.n);
    // SAFETY: `c` holds the m rows of n at stride ldc (checked).
    unsafe { matmul_raw(a, m, lda, b, c.as_mut_ptr(), ldc, None) }
}

/// A low-rank term `h · S` for a product `A · B (k, n)`: `h (m, r)` row-major f32, rounded to
/// bf16 as it is packed, and `S (r, n)` packed. The tiles sum it as `r` more steps of depth.
pub struct LowRank<'a> {
    pub h: Rows<'a>,
    pub s: &'a PackedB,
}

/// Where a [`LowRank`] term's `h (m, r)` comes from.
pub enum Rows<'a> {
    /// Given, row-major.
    Given(&'a [f32]),
    /// `h = scale · A · pᵀ` for `p (r, k)` row-major, made as A's rows are packed (each row
    /// read once for both) and written to `out (m, r)`: LoRA's `s·x·Aᵀ` in the forward and
    /// `s·g·B` in the backward.
    Projected {
        p: &'a [f32],
        scale: f32,
        out: &'a mut [f32],
    },
}

/// `bf16(a (m, k, row stride lda)) · b` as a new row-major `(m, n)` buffer (not zero-filled
/// first: every element is written once).
pub fn matmul_new(a: &[f32], m: usize, lda: usize, b: &PackedB) -> Vec<f32> {
    matmul_new_plus(a, m, lda, b, None)
}

/// [`matmul_new`] plus a low-rank term summed in the same tiles.
pub fn matmul_new_plus(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &PackedB,
    low_rank: Option<LowRank>,
) -> Vec<f32> {
    let len = m * b.n;
    let mut c: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: the capacity holds m rows of n; `matmul_raw` writes every one of its elements,
    // so all `len` are initialised before `set_len`.
    unsafe {
        matmul_raw(a, m, lda, b, c.as_mut_ptr(), b.n, low_rank);
        c.set_len(len);
    }
    c
}

/// `A (m, k)`, element `(i, j)` at `src[i·rs + j·cs]`, rounded to bf16 and packed on the
/// calling thread for [`matmul_here`]: rows padded to a block, depth to a tile, with zeros. Keep
/// one per thread and repack it per call (the buffer is reused).
#[derive(Default)]
pub struct PackedA {
    m: usize,
    row_len: usize,
    data: Vec<u16>,
}

impl PackedA {
    pub fn pack(&mut self, src: &[f32], m: usize, k: usize, rs: usize, cs: usize) {
        assert!(m == 0 || k == 0 || src.len() > (m - 1) * rs + (k - 1) * cs);
        self.m = m;
        self.row_len = round_up(k, DEPTH);
        // Every element is written below (values, then zeros), so the buffer is only resized.
        self.data.resize(round_up(m, BLOCK) * self.row_len, 0);
        if m == 0 || k == 0 {
            return;
        }
        let (rows, pad) = self.data.split_at_mut(m * self.row_len);
        pad.fill(0);
        if cs == 1 {
            for (i, dst) in rows.chunks_mut(self.row_len).enumerate() {
                round_row(&src[i * rs..][..k], &mut dst[..k]);
                dst[k..].fill(0);
            }
        } else {
            pack_columns(src, m, k, rs, cs, rows, self.row_len);
            for dst in rows.chunks_mut(self.row_len) {
                dst[k..].fill(0);
            }
        }
    }
}

simd_kernel! {
/// A's columns one at a time (each read along `rs`), for an A stored transposed: a column
/// rounded a run at a time (vectorised where `rs == 1`), then put in place.
fn pack_columns(src: &[f32], m: usize, k: usize, rs: usize, cs: usize, dst: &mut [u16], row_len: usize) {
    let mut run = [0u16; 256];
    for j in 0..k {
        for i0 in (0..m).step_by(run.len()) {
            let run = &mut run[..(m - i0).min(256)];
            if rs == 1 {
                for (d, &x) in run.iter_mut().zip(&src[i0 + j * cs..]) {
                    *d = bf16_bits(x);
                }
            } else {
                for (ii, d) in run.iter_mut().enumerate() {
                    *d = bf16_bits(src[(i0 + ii) * rs + j * cs]);
                }
            }
            for (ii, &x) in run.iter().enumerate() {
                dst[(i0 + ii) * row_len + j] = x;
            }
        }
    }
}
}

/// `c (m, n, row stride ldc) = a · b[.., ..n]` (`add`: `+=`) on the calling thread, summed over
/// A's depth, which may stop short of B's `k` (B's rows past it are not read: A's padding is
/// zero). Call only when [`available`].
pub fn matmul_here(a: &PackedA, b: &PackedB, n: usize, c: &mut [f32], ldc: usize, add: bool) {
    let (m, k_tiles) = (a.m, a.row_len / DEPTH);
    assert!(available(), "AMX-BF16 tiles are not available");
    assert!(n <= b.n && k_tiles <= b.k_tiles, "A does not fit B");
    assert!(m == 0 || n == 0 || c.len() >= (m - 1) * ldc + n);
    if m == 0 || n == 0 {
        return;
    }
    kernel::configure();
    let mut scratch = [0f32; BLOCK * BLOCK];
    for i0 in (0..m).step_by(BLOCK) {
        let a0 = &a.data[i0 * a.row_len..];
        for j0 in (0..n).step_by(BLOCK) {
            let depth = Depth {
                b: &b.data[(j0 / TILE) * b.k_tiles * DEPTH * TILE..],
                k_tiles,
                b_tiles: b.k_tiles,
                extra: &[],
                extra_tiles: 0,
            };
            let (rows, cols) = (BLOCK.min(m - i0), BLOCK.min(n - j0));
            let at = i0 * ldc + j0;
            if rows == BLOCK && cols == BLOCK {
                // SAFETY: `a0` holds 32 packed rows of `row_len`, the depth two n-tiles of
                // `b.k_tiles` tiles from column j0; the whole block lies within `c` (checked).
                unsafe { kernel::block(a0, a.row_len, &depth, c[at..].as_mut_ptr(), ldc, add) };
                continue;
            }
            // SAFETY: as above, into the 32 × 32 scratch.
            unsafe { kernel::block(a0, a.row_len, &depth, scratch.as_mut_ptr(), BLOCK, false) };
            for (r, got) in scratch.chunks(BLOCK).take(rows).enumerate() {
                let dst = &mut c[at + r * ldc..][..cols];
                if add {
                    for (d, g) in dst.iter_mut().zip(got) {
                        *d += g;
                    }
                } else {
                    dst.copy_from_slice(&got[..cols]);
                }
            }
        }
    }
}

/// # Safety
/// `c` is valid for writes of `m` rows of `b.n` floats at row stride `ldc`.
unsafe fn matmul_raw(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    low_rank: Option<LowRank>,
) {
    let (k, n) = (b.k, b.n);
    assert!(available(), "AMX-BF16 tiles are not available");
    assert!(m == 0 || a.len() >= (m - 1) * lda + k);
    // The low-rank term's rank, its depth in tiles, its packed S and where its rows come from
    // (a projection's rows are written by the packing task that makes them).
    let (r, extra_tiles, extra) = match low_rank.as_ref().map(|t| t.s) {
        Some(s) => {
            assert!(s.n == n, "low-rank term does not fit the product");
            (s.k, s.k_tiles, &s.data[..])
        }
        None => (0, 0, &[][..]),
    };
    /// The packing tasks' view of [`Rows`] (the projection's output shared as a pointer).
    enum Source<'a> {
        None,
        Given(&'a [f32]),
        Projected {
            p: &'a [f32],
            scale: f32,
            out: SendPtr,
        },
    }
    let source = match low_rank.map(|t| t.h) {
        None => Source::None,
        Some(Rows::Given(h)) => {
            assert!(h.len() >= m * r, "low-rank term does not fit the product");
            Source::Given(h)
        }
        Some(Rows::Projected { p, scale, out }) => {
            assert!(
                p.len() == r * k && out.len() >= m * r,
                "projection does not fit"
            );
            Source::Projected {
                p,
                scale,
                out: SendPtr(out.as_mut_ptr()),
            }
        }
    };
    if m == 0 || n == 0 {
        return;
    }
    let kp = b.k_tiles * DEPTH;
    // A packed row: A's k values and h's r, each padded with zeros to whole tiles of depth.
    let row_len = kp + extra_tiles * DEPTH;
    let mp = round_up(m, BLOCK);
    use rayon::prelude::*;
    // A rounded to bf16, rows padded to a whole block. Not zero-filled first: each row is
    // written whole.
    let mut ap: Vec<u16> = Vec::with_capacity(mp * row_len);
    ap.spare_capacity_mut()[..mp * row_len]
        .par_chunks_mut(row_len * BLOCK)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (row, dst) in rows.chunks_mut(row_len).enumerate() {
                let i = blk * BLOCK + row;
                // SAFETY: MaybeUninit<u16> has u16's layout; every element of the row is
                // written below (its values, then its padding) before anything reads it.
                let dst: &mut [u16] =
                    unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast(), dst.len()) };
                if i >= m {
                    dst.fill(0);
                    continue;
                }
                let (main, low) = dst.split_at_mut(kp);
                let row = &a[i * lda..i * lda + k];
                round_row(row, &mut main[..k]);
                main[k..].fill(0);
                let h_row: &[f32] = match &source {
                    Source::None => continue,
                    Source::Given(h) => &h[i * r..(i + 1) * r],
                    Source::Projected { p, scale, out } => {
                        // SAFETY: `out` holds m rows of r (checked); row i is this task's.
                        let out = unsafe { std::slice::from_raw_parts_mut(out.at(i * r), r) };
                        super::low_rank::project_row(out, row, p, *scale);
                        out
                    }
                };
                round_row(h_row, &mut low[..r]);
                low[r..].fill(0);
            }
        });
    // SAFETY: all mp·row_len elements were written above.
    unsafe { ap.set_len(mp * row_len) };
    let (m_blocks, n_blocks) = (mp / BLOCK, b.n_tiles / 2);
    let blocks = m_blocks * n_blocks;
    let threads = rayon::current_num_threads().max(1).min(blocks);
    let per = blocks.div_ceil(threads);
    // n-blocks per panel of B (each n-block: two n-tiles of all of k).
    let panel = (PANEL_BYTES / (2 * TILE * kp * 2)).max(1);
    let c_ptr = SendPtr(c);
    (0..threads).into_par_iter().for_each(|t| {
        let mut scratch = [0f32; BLOCK * BLOCK];
        kernel::configure();
        // The thread's blocks (a range in row-major order), panel by panel of B, each panel
        // swept by all of the thread's rows.
        let mut mine: Vec<(usize, usize)> = (t * per..((t + 1) * per).min(blocks))
            .map(|blk| (blk / n_blocks, blk % n_blocks))
            .collect();
        mine.sort_unstable_by_key(|&(mb, nb)| (nb / panel, mb, nb));
        for (mb, nb) in mine {
            let a0 = &ap[mb * BLOCK * row_len..];
            let depth = Depth {
                b: &b.data[2 * nb * b.k_tiles * DEPTH * TILE..],
                k_tiles: b.k_tiles,
                b_tiles: b.k_tiles,
                extra: &extra[(2 * nb * extra_tiles * DEPTH * TILE).min(extra.len())..],
                extra_tiles,
            };
            let (i0, j0) = (mb * BLOCK, nb * BLOCK);
            let (rows, cols) = (BLOCK.min(m - i0), BLOCK.min(n - j0));
            if rows == BLOCK && cols == BLOCK {
                // A whole block: the tiles store straight into C.
                // SAFETY: `a0` holds 32 rows of `row_len`, the depth two n-tiles of its tiles
                // each; the block lies within C, and blocks are disjoint.
                unsafe { kernel::block(a0, row_len, &depth, c_ptr.at(i0 * ldc + j0), ldc, false) };
            } else {
                // SAFETY: as above, into the 32 × 32 scratch.
                unsafe { kernel::block(a0, row_len, &depth, scratch.as_mut_ptr(), BLOCK, false) };
                for r in 0..rows {
                    // SAFETY: the block's rows and columns within C; blocks are disjoint.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            scratch.as_ptr().add(r * BLOCK),
                            c_ptr.at((i0 + r) * ldc + j0),
                            cols,
                        )
                    };
                }
            }
        }
    });
}

simd_kernel! {
/// Packs n-tile `nt` of B (16 columns, all of k) into `tiles`: along rows when a row's
/// columns are adjacent (`stride_n == 1`: two rows interleaved a tile's columns at a time),
/// along columns when a column's k values are (`stride_k == 1`: B stored transposed), else
/// element by element.
fn pack_column(
    src: &[f32],
    k: usize,
    n: usize,
    stride_k: usize,
    stride_n: usize,
    nt: usize,
    tiles: &mut [u16],
) {
    let cols = TILE.min(n.saturating_sub(nt * TILE));
    let j0 = nt * TILE;
    if cols == 0 {
        // A padding tile (B's n-tiles are an even number): zeros already.
        return;
    }
    let at = |i: usize, jj: usize| (i / DEPTH) * DEPTH * TILE + (i % DEPTH) * TILE + jj * 2;
    if stride_n == 1 {
        for i in (0..k).step_by(2) {
            let dst = &mut tiles[at(i, 0)..][..2 * cols];
            let r0 = &src[i * stride_k + j0..][..cols];
            if i + 1 < k {
                let r1 = &src[(i + 1) * stride_k + j0..][..cols];
                for ((d, &a), &b) in dst.chunks_exact_mut(2).zip(r0).zip(r1) {
                    d[0] = bf16_bits(a);
                    d[1] = bf16_bits(b);
                }
            } else {
                for (d, &a) in dst.chunks_exact_mut(2).zip(r0) {
                    d[0] = bf16_bits(a);
                }
            }
        }
        return;
    }
    if stride_k == 1 {
        // A column rounded a run at a time (vectorised), then its pairs put in place.
        let mut run = [0u16; 256];
        for jj in 0..cols {
            let col = &src[(j0 + jj) * stride_n..][..k];
            for (c, part) in col.chunks(run.len()).enumerate() {
                let run = &mut run[..part.len()];
                for (d, &x) in run.iter_mut().zip(part) {
                    *d = bf16_bits(x);
                }
                for (p, pair) in run.chunks(2).enumerate() {
                    let i = c * 256 + 2 * p;
                    tiles[at(i, jj)..][..pair.len()].copy_from_slice(pair);
                }
            }
        }
        return;
    }
    for jj in 0..cols {
        let j = j0 + jj;
        for i in 0..k {
            tiles[at(i & !1, jj) + i % 2] = bf16_bits(src[i * stride_k + j * stride_n]);
        }
    }
}
}

/// The depth a block of C sums over: `k_tiles` tiles of B (two n-tiles, `[n-tile][k-tile]`
/// as packed, `b_tiles` apart) and `extra_tiles` of a low-rank term's S (none: empty).
#[derive(Clone, Copy)]
struct Depth<'a> {
    b: &'a [u16],
    k_tiles: usize,
    b_tiles: usize,
    extra: &'a [u16],
    extra_tiles: usize,
}

struct SendPtr(*mut f32);

impl SendPtr {
    /// The element `i` places on (a method, so closures capture the whole `SendPtr`).
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}
// SAFETY: each task writes its own blocks of C (or its own rows of a projection's output).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

simd_kernel! {
/// f32 → bf16 bits for a row.
fn round_row(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16_bits(s);
    }
}
}

/// `bf16(x)` as f32: what the tiles multiply (tests compare against it).
pub fn round_to_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod kernel {
    use super::{Depth, BLOCK, DEPTH, TILE};

    /// Asks Linux for the AMX tile data state for this process.
    pub(super) fn request_tiles() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Loads this module's tile shapes on the calling thread: tmm0–3 C (16 × 16 f32),
    /// tmm4–5 A (16 × 32 bf16), tmm6–7 B (16 pair rows × 16 columns). Run before every batch of
    /// blocks: other code on the thread (candle's quantized kernels) loads other shapes.
    pub(super) fn configure() {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = TILE as u8;
        }
        // SAFETY: `cfg` is a valid palette-1 configuration, 64-byte aligned; callers checked
        // `available()`, so the OS granted the tile state.
        unsafe { core::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack)) };
    }

    /// One 32 × 32 block of C into `c` (row stride `ldc` floats; `add`: added to what `c`
    /// holds): `a` 32 packed rows of `row_len` bf16 (B's depth, then the low-rank term's),
    /// summed against `depth`.
    ///
    /// # Safety
    /// `configure` ran on this thread; the slices hold what is described; `c` is valid for
    /// reads and writes of 32 rows of 32 floats at stride `ldc`.
    pub(super) unsafe fn block(
        a: &[u16],
        row_len: usize,
        depth: &Depth,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        let Depth {
            b,
            k_tiles,
            b_tiles,
            extra,
            extra_tiles,
        } = *depth;
        let n_tile = |tiles: usize| tiles * DEPTH * TILE;
        debug_assert!(a.len() >= BLOCK * row_len && row_len >= (k_tiles + extra_tiles) * DEPTH);
        debug_assert!(k_tiles <= b_tiles && b.len() >= n_tile(b_tiles) + n_tile(k_tiles));
        debug_assert!(extra.len() >= 2 * n_tile(extra_tiles));
        let a0 = a.as_ptr();
        let a1 = unsafe { a0.add(TILE * row_len) };
        // Each loop runs over one B: two n-tiles `n_tile` elements apart, a tile of depth
        // (1 KiB) per step; A's two row tiles run on through both.
        unsafe {
            core::arch::asm!(
                // C's four tiles start at zero, or at what `c` holds: (0, 0), (0, 16),
                // (16, 0), (16, 16).
                "test {add}, {add}",
                "jnz 5f",
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "jmp 2f",
                "5:",
                "tileloadd tmm0, [{c} + {sc}*1]",
                "lea {add}, [{c} + 64]",
                "tileloadd tmm1, [{add} + {sc}*1]",
                "mov {add}, {sc}",
                "shl {add}, 4",
                "add {add}, {c}",
                "tileloadd tmm2, [{add} + {sc}*1]",
                "add {add}, 64",
                "tileloadd tmm3, [{add} + {sc}*1]",
                // A pass over one B: `n` steps of depth.
                "2:",
                "test {n}, {n}",
                "jz 3f",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {n}",
                "jmp 2b",
                // Then, once, a pass over the low-rank term's S, if any (A runs on into h).
                "3:",
                "test {e}, {e}",
                "jz 4f",
                "mov {n}, {e}",
                "xor {e}, {e}",
                "mov {b0}, {e0}",
                "mov {b1}, {e1}",
                "jmp 2b",
                "4:",
                // C's four tiles: (0, 0), (0, 16), (16, 0), (16, 16).
                "tilestored [{c} + {sc}*1], tmm0",
                "lea {a0}, [{c} + 64]",
                "tilestored [{a0} + {sc}*1], tmm1",
                "mov {a1}, {sc}",
                "shl {a1}, 4",
                "add {a1}, {c}",
                "tilestored [{a1} + {sc}*1], tmm2",
                "add {a1}, 64",
                "tilestored [{a1} + {sc}*1], tmm3",
                a0 = inout(reg) a0 => _,
                a1 = inout(reg) a1 => _,
                b0 = inout(reg) b.as_ptr() => _,
                b1 = inout(reg) b.as_ptr().add(n_tile(b_tiles)) => _,
                n = inout(reg) k_tiles => _,
                e = inout(reg) extra_tiles => _,
                add = inout(reg) add as usize => _,
                e0 = in(reg) extra.as_ptr(),
                e1 = in(reg) extra.as_ptr().wrapping_add(n_tile(extra_tiles)),
                sa = in(reg) row_len * 2,
                sb = in(reg) 64usize,
                c = in(reg) c,
                sc = in(reg) ldc * 4,
                options(nostack)
            );
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod kernel {
    pub(super) fn request_tiles() -> bool {
        false
    }

    pub(super) fn configure() {}

    pub(super) unsafe fn block(
        _: &[u16],
        _: usize,
        _: &super::Depth,
        _: *mut f32,
        _: usize,
        _: bool,
    ) {
        unreachable!("AMX tiles are x86-64 Linux only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 1.7 + (i % 7) as f32 * 0.01)
            .collect()
    }

    /// f64 reference of `bf16(a) · bf16(b)`.
    fn reference(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| {
                        round_to_bf16(a[i * k + p]) as f64 * round_to_bf16(b[p * n + j]) as f64
                    })
                    .sum();
            }
        }
        c
    }

    /// Ragged shapes (no dimension a multiple of a tile), both operand layouts of B, against
    /// the f64 product of the rounded operands.
    #[test]
    fn products_equal_the_rounded_operands_product() {
        if !available() {
            eprintln!("skipped: this CPU (or OS) offers no AMX-BF16 tiles");
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 40, 17),
            (37, 70, 45),
            (64, 576, 96),
            (100, 33, 31),
            (40, 65, 64),
            // k = 1,024: B panels of 8 blocks of columns, so the 300 columns cross two (and
            // 70 rows make three row blocks for the two threads).
            (70, 1024, 300),
        ] {
            let a = wave(m * k, 0.3);
            let b = wave(k * n, 1.1);
            let want = reference(&a, m, k, &b, n);
            // B row-major (k, n), and the same B stored transposed (n, k) as a weight is.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            for packed in [PackedB::new(&b, k, n, n, 1), PackedB::new(&bt, k, n, 1, k)] {
                let ldc = n + 3;
                let mut c = vec![f32::NAN; m * ldc];
                matmul(&a, m, k, &packed, &mut c, ldc);
                // The same product into a new buffer, unpadded.
                let fresh = matmul_new(&a, m, k, &packed);
                // Unpacking gives B rounded.
                let rounded: Vec<f32> = b.iter().map(|&v| round_to_bf16(v)).collect();
                assert_eq!(packed.unpack(), rounded);
                for i in 0..m {
                    assert_eq!(&fresh[i * n..(i + 1) * n], &c[i * ldc..i * ldc + n]);
                }
                for i in 0..m {
                    for j in 0..n {
                        let (got, w) = (c[i * ldc + j] as f64, want[i * n + j]);
                        assert!(
                            (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "({m},{k},{n}) [{i},{j}]: {got} vs {w}"
                        );
                    }
                    // Padding of C's rows is not written.
                    assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    /// Products on the calling thread: A packed from either layout, B packed here from either
    /// (the transposed one through the column path), over A's depth where B's runs on (its
    /// rows past A's depth hold values that must not count), for the first `n` of B's columns
    /// only, written and added; against the f64 product of the rounded operands.
    #[test]
    fn products_here_over_a_depth_and_width_of_their_own() {
        if !available() {
            eprintln!("skipped: this CPU (or OS) offers no AMX-BF16 tiles");
            return;
        }
        let (mut pa, mut pb) = (PackedA::default(), PackedB::default());
        // (m, k of A, k of B, n used, n of B)
        for &(m, k, kb, n, nb) in &[
            (1, 1, 1, 1, 1),
            (32, 64, 64, 64, 64),
            (37, 40, 70, 17, 45),
            (70, 100, 130, 64, 96),
            (5, 33, 33, 31, 31),
        ] {
            let a = wave(m * k, 0.3);
            let at: Vec<f32> = (0..m * k).map(|i| a[(i % m) * k + i / m]).collect();
            let b = wave(kb * nb, 1.1);
            let bt: Vec<f32> = (0..nb * kb).map(|i| b[(i % kb) * nb + i / kb]).collect();
            let want = reference(&a, m, k, &b[..k * nb], nb);
            for (a_src, rs, cs) in [(&a, k, 1), (&at, 1, m)] {
                pa.pack(a_src, m, k, rs, cs);
                for (b_src, sk, sn) in [(&b, nb, 1), (&bt, 1, kb)] {
                    pb.pack_here(b_src, kb, nb, sk, sn);
                    assert_eq!(pb.unpack(), PackedB::new(b_src, kb, nb, sk, sn).unpack());
                    let ldc = n + 2;
                    let mut c = vec![f32::NAN; m * ldc];
                    matmul_here(&pa, &pb, n, &mut c, ldc, false);
                    let mut sum = vec![0.5f32; m * ldc];
                    matmul_here(&pa, &pb, n, &mut sum, ldc, true);
                    for i in 0..m {
                        for j in 0..n {
                            let w = want[i * nb + j];
                            let tol = 1e-5 * (1.0 + w.abs());
                            let got = c[i * ldc + j] as f64;
                            assert!(
                                (got - w).abs() <= tol,
                                "({m},{k},{n}) [{i},{j}]: {got} vs {w}"
                            );
                            let got = sum[i * ldc + j] as f64 - 0.5;
                            assert!((got - w).abs() <= tol, "added [{i},{j}]: {got} vs {w}");
                        }
                        assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()));
                        assert!(sum[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == 0.5));
                    }
                }
            }
        }
    }
}
