"""Float64 least squares M = argmin ||A.M - B|| over row designs of two embedding tables.

A = R.X and B = R.Y, with X, Y [N_old, d] tables (base and instruct, as stored: float32 or 16-bit)
and R a CSR row design (a TokenMap: the donor's token map T for conversion, a selection of shared
ids for overlap). Neither A nor B is ever materialised whole: chunks of rows are summed with the
init stage's segment_sum op (float32 accumulation), divided by their weight mass in float64 and
written into one reused float64 buffer [A_k | B_k], which the solver folds in.

Solvers:
  normal  A^T [A | B] accumulated chunk by chunk, then Cholesky of A^T A; a rank-deficient A
          falls back to gelsy on the normal equations (still a least-squares minimiser). A^T A is
          symmetric, so only its upper block triangle is computed (GRAM_BLOCK-wide block rows,
          each one GEMM): 78% of the two full Gram products' flops at d = 4096. The residual comes
          from the Gram matrices (||B||^2 - <M, A^T B>), which cancels to ~1e-7 when the fit is exact.
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
GRAM_BLOCK = 512
"""Width of the block rows of A^T A computed per GEMM: narrower skips more of the lower triangle,
but GEMMs with fewer than ~512 output rows run below the machine's GEMM rate."""


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


def design_chunks(x: torch.Tensor, y: torch.Tensor, rows: TokenMap, out: torch.Tensor,
                  summed: bool = False) -> Iterator[torch.Tensor]:
    """float64 [k, 2d] chunks [A_k | B_k] of (R.X, R.Y), written into the leading rows of `out`
    (float64 [chunk_rows, 2d]; each chunk overwrites the last): weighted means per row of R (the
    weighted sums if `summed`). Empty rows of R are skipped: they are zero in A and B alike.
    """
    d = x.shape[1]
    kept = torch.nonzero(rows.offsets.diff() > 0).flatten()
    lengths = rows.offsets.diff()[kept]
    starts = rows.offsets[kept]
    for lo in range(0, kept.numel(), out.shape[0]):
        part_len, part_start = lengths[lo:lo + out.shape[0]], starts[lo:lo + out.shape[0]]
        entries = torch.repeat_interleave(part_start - torch.cumsum(part_len, 0) + part_len, part_len) \
            + torch.arange(int(part_len.sum()))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(part_len, 0)])
        sums_x, sums_y, mass = segment_sum(x, y, offsets, rows.indices[entries],
                                           None if summed else rows.weights[entries])
        ab = out[:part_len.numel()]
        ab[:, :d], ab[:, d:] = sums_x, sums_y
        del sums_x, sums_y
        if not summed:
            ab /= torch.where(mass == 0, 1.0, mass).double().unsqueeze(1)
        yield ab


def solve_normal(chunks: Iterator[torch.Tensor], d: int) -> Solution:
    gram = torch.zeros(d, 2 * d, dtype=torch.float64)  # [A^T A | A^T B], A^T A upper block triangle
    b_sq, n = 0.0, 0
    for ab in chunks:
        for lo in range(0, d, GRAM_BLOCK):
            hi = min(lo + GRAM_BLOCK, d)
            gram[lo:hi, lo:].addmm_(ab[:, lo:hi].T, ab[:, lo:])
        b_sq += float(torch.linalg.vector_norm(ab[:, d:])) ** 2
        n += ab.shape[0]
    g, rhs = gram[:, :d], gram[:, d:]
    g.copy_(g.triu() + g.triu(1).T)
    factor, info = torch.linalg.cholesky_ex(g)
    if info == 0:
        m, used = torch.cholesky_solve(rhs, factor), "normal"
    else:
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
