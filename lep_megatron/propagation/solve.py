"""Float64 least squares M = argmin ||A.M - B|| over row designs of two embedding tables.

A = R.X and B = R.Y, with X, Y [N_old, d] tables (base and instruct) and R a CSR row design
(a TokenMap: the donor's token map T for conversion, a selection of shared ids for overlap).
Neither A nor B is ever materialised whole: chunks of rows are averaged with segment_mean in
float32 (the init stage's op), promoted to float64 and folded into a d x 2d accumulator.

Solvers:
  normal  A^T [A | B] accumulated chunk by chunk (one GEMM per chunk: exactly the two Gram
          products), then Cholesky of A^T A; a rank-deficient A falls back to gelsy on the
          normal equations (still a least-squares minimiser). Its residual comes from the Gram
          matrices (||B||^2 - <M, A^T B>), which cancels to ~1e-7 when the fit is exact.
  qr      streamed (TS)QR of the augmented [A | B]: R of [R_prev; A_k | B_k] per chunk; then
          M = R11^-1 R12 (gelsy) and the residual is ||R22||. Stable in cond(A), not cond(A)^2,
          at about twice the flops.
"""
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from lep_megatron.ops import segment_mean, segment_sum
from lep_megatron.tokenizer.token_map import TokenMap

SOLVERS = ("normal", "qr")


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


def design_chunks(x: torch.Tensor, y: torch.Tensor, rows: TokenMap, chunk_rows: int,
                  summed: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(A_k, B_k) float32 chunks of (R.X, R.Y): weighted means per row (sums if `summed`).

    Empty rows of R are skipped: they are zero in both A and B and change nothing.
    """
    kept = torch.nonzero(rows.offsets.diff() > 0).flatten()
    lengths = rows.offsets.diff()[kept]
    starts = rows.offsets[kept]
    for lo in range(0, kept.numel(), chunk_rows):
        part_len, part_start = lengths[lo:lo + chunk_rows], starts[lo:lo + chunk_rows]
        entries = torch.repeat_interleave(part_start - torch.cumsum(part_len, 0) + part_len, part_len) \
            + torch.arange(int(part_len.sum()))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(part_len, 0)])
        indices = rows.indices[entries]
        if summed:
            a, b, _ = segment_sum(x, y, offsets, indices, None)
        else:
            a, b = segment_mean(x, y, offsets, indices, rows.weights[entries])
        yield a, b


def solve_normal(chunks: Iterator[Tuple[torch.Tensor, torch.Tensor]], d: int) -> Solution:
    gram = torch.zeros(d, 2 * d, dtype=torch.float64)  # [A^T A | A^T B]
    b_sq, n = 0.0, 0
    for a, b in chunks:
        ab = torch.empty(a.shape[0], 2 * d, dtype=torch.float64)
        ab[:, :d], ab[:, d:] = a, b
        gram.addmm_(ab[:, :d].T, ab)
        b_sq += float(torch.linalg.vector_norm(ab[:, d:])) ** 2
        n += a.shape[0]
    g, rhs = gram[:, :d], gram[:, d:]
    factor, info = torch.linalg.cholesky_ex(g)
    if info == 0:
        m, used = torch.cholesky_solve(rhs, factor), "normal"
    else:
        m, used = torch.linalg.lstsq(g, rhs, driver="gelsy").solution, "normal+gelsy (rank-deficient A)"
    # at the least-squares solution G.M = A^T B, so ||A.M - B||^2 = ||B||^2 - <M, A^T B>
    res_sq = max(b_sq - float((m * rhs).sum()), 0.0)
    return Solution(m, math.sqrt(res_sq / b_sq) if b_sq else 0.0, n, used)


def solve_qr(chunks: Iterator[Tuple[torch.Tensor, torch.Tensor]], d: int) -> Solution:
    r = torch.zeros(0, 2 * d, dtype=torch.float64)
    n = 0
    for a, b in chunks:
        stacked = torch.empty(r.shape[0] + a.shape[0], 2 * d, dtype=torch.float64)
        stacked[:r.shape[0]] = r
        stacked[r.shape[0]:, :d], stacked[r.shape[0]:, d:] = a, b
        r = torch.linalg.qr(stacked, mode="r").R
        n += a.shape[0]
    r = torch.cat([r, torch.zeros(max(2 * d - r.shape[0], 0), 2 * d, dtype=torch.float64)])
    m = torch.linalg.lstsq(r[:d, :d], r[:d, d:], driver="gelsy").solution
    b_norm = float(torch.linalg.vector_norm(r[:, d:]))
    return Solution(m, float(torch.linalg.vector_norm(r[d:, d:])) / b_norm if b_norm else 0.0, n, "qr")


def fit_map(x: torch.Tensor, y: torch.Tensor, rows: TokenMap, solver: str = "normal",
            chunk_rows: int = 4096, summed: bool = False) -> Solution:
    """M = argmin ||R.X.M - R.Y|| in float64 (X, Y: float32 [N_old, d], contiguous); chunk_rows
    applies to the normal solver."""
    if solver == "qr":
        # each step re-factors the 2d x 2d R with the chunk: 8d rows keep that overhead at 25%, and
        # LAPACK's QR of much taller blocks is slow
        return solve_qr(design_chunks(x, y, rows, 8 * x.shape[1], summed), x.shape[1])
    return solve_normal(design_chunks(x, y, rows, chunk_rows, summed), x.shape[1])


def identity_residual(x: torch.Tensor, y: torch.Tensor, chunk_rows: int = 8192) -> float:
    """||X - Y|| / ||Y|| (swap's implicit identity map), without a temporary table."""
    diff_sq = y_sq = 0.0
    for lo in range(0, x.shape[0], chunk_rows):
        xs, ys = x[lo:lo + chunk_rows].double(), y[lo:lo + chunk_rows].double()
        diff_sq += float(torch.linalg.vector_norm(xs - ys)) ** 2
        y_sq += float(torch.linalg.vector_norm(ys)) ** 2
    return math.sqrt(diff_sq / y_sq) if y_sq else 0.0


def apply_map(table: torch.Tensor, m: Optional[torch.Tensor], out: torch.Tensor, chunk_rows: int = 16384) -> None:
    """out[:len(table)] = table.M, as a float32 GEMM (the map is float64, `out` a checkpoint
    dtype); M = None copies the rows unchanged (swap)."""
    if m is None:
        out[:table.shape[0]] = table
        return
    m32 = m.float()
    for lo in range(0, table.shape[0], chunk_rows):
        hi = min(lo + chunk_rows, table.shape[0])
        out[lo:hi] = table[lo:hi].float() @ m32
