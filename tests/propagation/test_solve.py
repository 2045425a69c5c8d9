"""The streamed float64 solvers against torch.linalg.lstsq (gelsy) on the dense T.I, with and
without noise, on the real token map of the synthetic setup."""
import pytest
import torch

from lep_megatron.embeddings.initialize import EMBED
from lep_megatron.ops import segment_mean_reference, segment_sum_reference
from lep_megatron.propagation.solve import fit_map
from lep_megatron.tokenizer.token_map import TokenMap
from tests.propagation.conftest import read_tensors


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def reference_rows(design: TokenMap, table: torch.Tensor, summed: bool = False) -> torch.Tensor:
    """Non-empty rows of R.table in float64 (the reference ops accumulate float64 tables in float64)."""
    t = table.double()
    if summed:
        rows = segment_sum_reference(t, t, design.offsets, design.indices, None)[0]
    else:
        rows = segment_mean_reference(t, t, design.offsets, design.indices, design.weights)[0]
    return rows[design.offsets.diff() > 0]


@pytest.fixture(scope="module")
def problem(lep):
    x = read_tensors(lep["base"])[EMBED].float().contiguous()
    tm = TokenMap.load(lep["donor"] / "token_map.safetensors")
    overlap = TokenMap(offsets=torch.arange(x.shape[0] + 1), indices=torch.arange(x.shape[0]),
                       weights=torch.ones(x.shape[0]), old_vocab_size=x.shape[0])
    return x, {"conversion": tm, "overlap": overlap}, lep["D"]


@pytest.mark.parametrize("rows", ["conversion", "overlap"])
def test_error_grows_with_noise_and_matches_reference(problem, rows):
    x, designs, d_true = problem
    design = designs[rows]
    a = reference_rows(design, x)
    g = torch.Generator().manual_seed(0)
    noise_dir = torch.randn(x.shape, generator=g, dtype=torch.float64)
    errors = []
    for noise in (0.0, 1e-3, 1e-2, 1e-1):
        y = x.double() @ d_true
        y = (y + noise * float(y.std()) * noise_dir).float()
        b = reference_rows(design, y)
        ref = torch.linalg.lstsq(a, b, driver="gelsy").solution
        ref_residual = rel(a @ ref, b)
        for solver in ("normal", "qr"):
            sol = fit_map(x, y.contiguous(), design, solver, chunk_rows=5000)
            assert rel(sol.map, ref) < 1e-7, (solver, noise)
            # the normal solver's residual (||B||^2 - <M, A^T B>) cancels to ~sqrt(eps) at zero noise
            assert sol.residual == pytest.approx(ref_residual, rel=1e-4, abs=1e-6)
            assert sol.rows == int((design.offsets.diff() > 0).sum())
        errors.append(rel(sol.map, d_true))
    assert errors[0] < 1e-6
    # bounded by the noise level and growing with it
    assert all(e < 0.2 * noise for e, noise in zip(errors[1:], (1e-3, 1e-2, 1e-1)))
    assert errors == sorted(errors)


def test_summed_rows_weigh_long_decompositions(problem):
    x, designs, d_true = problem
    tm = designs["conversion"]
    y = (x.double() @ d_true).float()
    summed = fit_map(x, y, tm, summed=True)
    assert rel(summed.map, d_true) < 1e-6
    y_noisy = y + 0.01 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    a, b = reference_rows(tm, x, summed=True), reference_rows(tm, y_noisy, summed=True)
    ref = torch.linalg.lstsq(a, b, driver="gelsy").solution
    assert rel(fit_map(x, y_noisy, tm, summed=True).map, ref) < 1e-7


def test_rank_deficient_design_falls_back(problem):
    x, _, d_true = problem
    few = TokenMap(offsets=torch.arange(33), indices=torch.arange(100, 132), weights=torch.ones(32),
                   old_vocab_size=x.shape[0])
    y = (x.double() @ d_true).float()
    for solver in ("normal", "qr"):
        sol = fit_map(x, y, few, solver)
        # 32 rows cannot pin down a 64 x 64 map, but any minimiser fits them exactly
        assert rel(x[100:132].double() @ sol.map, y[100:132].double()) < 1e-6 and sol.residual < 1e-3
    assert sol.solver == "qr" and fit_map(x, y, few).solver.startswith("normal+gelsy")


@pytest.mark.parametrize("solver", ["normal", "qr"])
def test_bfloat16_tables_fit_as_their_float32_values(problem, solver):
    """propagate fits the tables as stored (bf16 for most checkpoints): the map of their float32
    copies (checked against the float64 reference above) up to float64 rounding."""
    x, designs, d_true = problem
    x16 = x.bfloat16()
    y16 = (x.double() @ d_true).bfloat16()
    for design in designs.values():
        got = fit_map(x16, y16, design, solver, chunk_rows=5000)
        want = fit_map(x16.float(), y16.float(), design, solver, chunk_rows=5000)
        assert rel(got.map, want.map) < 1e-12 and got.residual == pytest.approx(want.residual, rel=1e-9)


def test_blocked_gram_and_sub_chunks_match_one_block(problem, monkeypatch):
    """The Gram's recursive upper triangle (diagonal leaves of GRAM_LEAF) and the segment op's
    sub-chunks of SEGMENT_ROWS give the map of one whole block per chunk, at sizes that divide
    nothing evenly; the flop count is 3/4 of the two full products plus the leaves' lower halves."""
    from lep_megatron.propagation import solve

    x, designs, d_true = problem
    y = (x.double() @ d_true + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2),
                                                 dtype=torch.float64)).float()
    d = x.shape[1]
    for design in designs.values():
        monkeypatch.setattr(solve, "GRAM_LEAF", d)
        monkeypatch.setattr(solve, "SEGMENT_ROWS", 10**9)
        whole = fit_map(x, y, design, chunk_rows=777)
        monkeypatch.setattr(solve, "GRAM_LEAF", 7)
        monkeypatch.setattr(solve, "SEGMENT_ROWS", 13)
        blocked = fit_map(x, y, design, chunk_rows=777)
        assert rel(blocked.map, whole.map) < 1e-12 and blocked.residual == pytest.approx(whole.residual, rel=1e-9)
        assert blocked.rows == whole.rows
    assert solve.gram_flops(1, 4096, 256) == 2 * (4096**2 + (4096**2 + 4096 * 256) // 2)
    assert solve.gram_flops(1, d, d) == 4 * d * d
