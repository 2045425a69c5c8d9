"""Float64 least squares M = argmin ||A.M - B|| over row designs of two embedding tables.

A = R.X and B = R.Y, with X, Y [N_old, d] tables (base and instruct, as stored: float32 or 16-bit)
and R a CSR row design (a TokenMap: the donor's token map T for conversion, a selection of shared
ids for overlap). Neither A nor B is ever materialised whole: chunks of rows go into one reused
float64 buffer [A_k | B_k], which the solver folds in, SEGMENT_ROWS rows at a time summed with the
init stage's segment_sum op (float32 accumulation, a cache-sized float32 result), copied into the
buffer and divided by their weight mass in float64 while still in cache.

Solvers:
  normal  A^T [A | B] accumulated chunk by chunk, then Cholesky of A^T A; a rank-deficient A
          falls back to gelsy on the normal equations (still a least-squares minimiser). A^T A is
          symmetric, so only its upper triangle is computed, as a symmetric rank-k update built
          from GEMMs: the diagonal blocks recursively halved down to GRAM_LEAF wide, the blocks
          right of them (and A^T B with them) one GEMM per level, so most flops run in a few large
          GEMMs. That is 3/4 + GRAM_LEAF/(4d) of the two full Gram products' flops (76.6% at
          d = 4096; gram_flops). Cholesky factors that upper triangle as it is (no symmetric copy).
          The residual comes from the Gram matrices (||B||^2 - <M, A^T B>), which cancels to ~1e-7
          when the fit is exact.
  qr      streamed (TS)QR of the augmented [A | B]: R of [R_prev; A_k | B_k] per chunk; then
          M = R11^-1 R12 (gelsy) and the residual is ||R22||. Stable in cond(A), not cond(A)^2,
          at about three times the normal solver's flops.
"""
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from lep_megatron.ops import segment_sum
from lep_megatron.tokenizer.token_map import TokenMap

SOLVERS = ("normal", "qr")
GRAM_LEAF = 256
"""Width of the diagonal blocks of A^T A computed whole (their lower halves are the wasted flops):
narrower wastes less, but small GEMMs run below the machine's GEMM rate. The leaves carry few of
the flops (the recursion puts the rest in large GEMMs); 256 and 512 measured within 1% here."""
SEGMENT_ROWS = 256
"""Rows of R.X and R.Y summed per segment op call: its two float32 results (8 MiB at d = 4096)
stay in cache for the float64 conversion and below malloc's mmap threshold (no page faults)."""


@dataclass
class Solution:
    """A fitted d x d map and how well it aligns the two tables."""

    map: torch.Tensor
    """float64 [d, d]: A.map ~ B."""
    residual: float
    """Relative alignment residual ||A.map - B|| / ||B||."""
    rows: int
    """Rows of the design that took part (non-empty rows of R)."""
    solver: str
    """What actually solved it (normal, normal+gelsy fallback, qr)."""


def gram_flops(rows: int, d: int, leaf: int = None) -> int:
    """Flops of solve_normal's Gram products for `rows` design rows (the floor's two full
    products are 4 rows d^2)."""
    leaf = GRAM_LEAF if leaf is None else leaf
    leaves = []

    def count(lo, hi):
        if hi - lo <= leaf:
            leaves.append(hi - lo)
        else:
            mid = lo + (hi - lo + 1) // 2
            count(lo, mid)
            count(mid, hi)
    count(0, d)
    # A^T B (d^2 entries) + the strict upper triangle of A^T A + the leaves' whole squares
    entries = d * d + (d * d - sum(n * n for n in leaves)) // 2 + sum(n * n for n in leaves)
    return 2 * rows * entries


def design_chunks(x: torch.Tensor, y: torch.Tensor, rows: TokenMap, out: torch.Tensor,
                  summed: bool = False) -> Iterator[torch.Tensor]:
    """float64 [k, 2d] chunks [A_k | B_k] of (R.X, R.Y), written into the leading rows of `out`
    (float64 [chunk_rows, 2d]; each chunk overwrites the last): weighted means per row of R (the
    weighted sums if `summed`). Empty rows of R are skipped: they are zero in A and B alike.
    """
    d = x.shape[1]
    counts = rows.offsets.diff()
    if bool((counts > 0).all()):
        offsets, indices, weights = rows.offsets, rows.indices, rows.weights
    else:  # the CSR of the non-empty rows alone
        kept = torch.nonzero(counts > 0).flatten()
        lengths = counts[kept]
        entries = torch.repeat_interleave(rows.offsets[kept] - torch.cumsum(lengths, 0) + lengths, lengths) \
            + torch.arange(int(lengths.sum()))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
        indices, weights = rows.indices[entries], rows.weights[entries]
    n_rows = offsets.numel() - 1
    for lo in range(0, n_rows, out.shape[0]):
        ab = out[:min(out.shape[0], n_rows - lo)]
        for s in range(0, ab.shape[0], SEGMENT_ROWS):
            r0, r1 = lo + s, min(lo + s + SEGMENT_ROWS, lo + ab.shape[0])
            e0, e1 = int(offsets[r0]), int(offsets[r1])
            sums_x, sums_y, mass = segment_sum(x, y, offsets[r0:r1 + 1] - e0, indices[e0:e1],
                                               None if summed else weights[e0:e1])
            part = ab[s:s + r1 - r0]
            part[:, :d], part[:, d:] = sums_x, sums_y
            if not summed:  # in place while in cache (a mixed-dtype torch.div is ~4x slower)
                part /= torch.where(mass == 0, 1.0, mass).double().unsqueeze(1)
        yield ab


def gram_update(gram: torch.Tensor, ab: torch.Tensor, lo: int, hi: int, end: int, leaf: int) -> None:
    """gram[lo:hi, lo:end] += ab[:, lo:hi]^T ab[:, lo:end] on and above the diagonal of its leading
    square block (the lower part of the diagonal leaves is computed too, and never read)."""
    if hi - lo <= leaf:
        gram[lo:hi, lo:end].addmm_(ab[:, lo:hi].T, ab[:, lo:end])
        return
    mid = lo + (hi - lo + 1) // 2
    gram_update(gram, ab, lo, mid, mid, leaf)
    gram[lo:mid, mid:end].addmm_(ab[:, lo:mid].T, ab[:, mid:end])
    gram_update(gram, ab, mid, hi, end, leaf)


def solve_normal(chunks: Iterator[torch.Tensor], d: int, leaf: int = None) -> Solution:
    leaf = GRAM_LEAF if leaf is None else leaf
    gram = torch.zeros(d, 2 * d, dtype=torch.float64)  # [A^T A | A^T B], A^T A upper triangle
    b_sq, n = 0.0, 0
    for ab in chunks:
        gram_update(gram, ab, 0, d, 2 * d, leaf)
        b_sq += float(torch.linalg.vector_norm(ab[:, d:])) ** 2
        n += ab.shape[0]
    g, rhs = gram[:, :d], gram[:, d:]
    factor, info = torch.linalg.cholesky_ex(g, upper=True)  # reads the upper triangle only
    if info == 0:
        m, used = torch.cholesky_solve(rhs, factor, upper=True), "normal"
    else:
        del factor
        g = g.triu() + g.triu(1).T
        m, used = torch.linalg.lstsq(g, rhs, driver="gelsy").solution, "normal+gelsy (rank-deficient A)"
    # at the least-squares solution G.M = A^T B, so ||A.M - B||^2 = ||B||^2 - <M, A^T B>
    res_sq = max(b_sq - float((m * rhs).sum()), 0.0)
    return Solution(m, math.sqrt(res_sq / b_sq) if b_sq else 0.0, n, used)


def solve_qr(stacked: torch.Tensor, chunks: Iterator[torch.Tensor], d: int) -> Solution:
    """`stacked`: float64 [2d + chunk_rows, 2d]; `chunks` writes into its rows from 2d on, and R
    of the rows so far sits right above them, so each step factors one contiguous block."""
    r_rows, n = 0, 0
    for ab in chunks:
        r = torch.linalg.qr(stacked[2 * d - r_rows:2 * d + ab.shape[0]], mode="r").R
        r_rows = r.shape[0]
        stacked[2 * d - r_rows:2 * d] = r
        n += ab.shape[0]
    r = torch.cat([stacked[2 * d - r_rows:2 * d], torch.zeros(2 * d - r_rows, 2 * d, dtype=torch.float64)])
    m = torch.linalg.lstsq(r[:d, :d], r[:d, d:], driver="gelsy").solution
    b_norm = float(torch.linalg.vector_norm(r[:, d:]))
    return Solution(m, float(torch.linalg.vector_norm(r[d:, d:])) / b_norm if b_norm else 0.0, n, "qr")


def fit_map(x: torch.Tensor, y: torch.Tensor, rows: TokenMap, solver: str = "normal",
            chunk_rows: int = 4096, summed: bool = False) -> Solution:
    """M = argmin ||R.X.M - R.Y|| in float64. X, Y: [N_old, d] contiguous tables of one dtype
    (float32, bfloat16 or float16); chunk_rows applies to the normal solver."""
    d = x.shape[1]
    if solver == "qr":
        # each step re-factors the 2d x 2d R with the chunk: 8d rows keep that overhead at 25%, and
        # LAPACK's QR of much taller blocks is slow
        stacked = torch.empty(2 * d + 8 * d, 2 * d, dtype=torch.float64)
        return solve_qr(stacked, design_chunks(x, y, rows, stacked[2 * d:], summed), d)
    out = torch.empty(chunk_rows, 2 * d, dtype=torch.float64)
    return solve_normal(design_chunks(x, y, rows, out, summed), d)


def identity_residual(x: torch.Tensor, y: torch.Tensor, chunk_rows: int = 8192) -> float:
    """||X - Y|| / ||Y|| (swap's implicit identity map), without a temporary table."""
    diff_sq = y_sq = 0.0
    for lo in range(0, x.shape[0], chunk_rows):
        xs, ys = x[lo:lo + chunk_rows].double(), y[lo:lo + chunk_rows].double()
        diff_sq += float(torch.linalg.vector_norm(xs - ys)) ** 2
        y_sq += float(torch.linalg.vector_norm(ys)) ** 2
    return math.sqrt(diff_sq / y_sq) if y_sq else 0.0


def apply_map(table: torch.Tensor, m: Optional[torch.Tensor], out: torch.Tensor, chunk_rows: int = 8192) -> None:
    """out[:len(table)] = table.M, as a float32 GEMM (the map is float64, `out` a checkpoint
    dtype) in row chunks through two reused buffers; M = None copies the rows unchanged (swap)."""
    if m is None:
        out[:table.shape[0]] = table
        return
    m32 = m.float()
    rows = torch.empty(min(chunk_rows, table.shape[0]), table.shape[1])
    mapped = torch.empty_like(rows)
    for lo in range(0, table.shape[0], chunk_rows):
        hi = min(lo + chunk_rows, table.shape[0])
        rows[:hi - lo] = table[lo:hi]
        torch.mm(rows[:hi - lo], m32, out=mapped[:hi - lo])
        out[lo:hi] = mapped[:hi - lo]
