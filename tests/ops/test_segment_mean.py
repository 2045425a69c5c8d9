"""segment_mean / segment_sum (compiled ops and the embedding_bag reference) against float64."""
import pytest
import torch

from lep_megatron.ops import (
    extension_available,
    segment_mean,
    segment_mean_reference,
    segment_sum,
    segment_sum_reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Allowed max |error| / max |reference|: fp32 accumulation for every dtype, plus one rounding
# of the result to the table dtype.
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def random_csr(new_rows: int, old_rows: int, max_len: int, weighted: bool, seed: int = 0):
    """CSR rows of every kind: empty, one entry, short, long, repeated indices."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (new_rows,), generator=g)
    lengths[:4] = torch.tensor([0, 1, max_len, 0])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.randint(0, old_rows, (int(offsets[-1]),), generator=g)
    indices[offsets[2] : offsets[2] + 3] = 7  # one row repeats an index
    weights = torch.rand(indices.numel(), generator=g) + 0.05 if weighted else None
    return offsets, indices, weights


def random_tables(old_rows: int, dim: int, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(old_rows, dim, generator=g).to(dtype) for _ in range(2))


def float64_mean(tables, offsets, indices, weights):
    return segment_mean_reference(tables[0].double(), tables[1].double(), offsets, indices, weights)


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result.double() - reference).abs().max() / reference.abs().max()).item()


IMPLEMENTATIONS = [
    pytest.param(segment_mean, id="op", marks=pytest.mark.skipif(not extension_available(), reason="no compiled ops")),
    pytest.param(segment_mean_reference, id="reference"),
]


@pytest.mark.parametrize("mean", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dim", [4096, 200, 13])  # vector blocks; 16-lane steps; scalar tail
def test_matches_float64(mean, dtype, weighted, dim):
    offsets, indices, weights = random_csr(300, 500, max_len=40, weighted=weighted)
    tables = random_tables(500, dim, dtype)
    reference = float64_mean(tables, offsets, indices, weights)
    result = mean(*tables, offsets, indices, weights)
    for got, want in zip(result, reference):
        assert got.dtype == dtype and got.shape == (300, dim)
        assert relative_error(got, want) <= TOLERANCE[dtype]
        assert torch.all(got[0] == 0) and torch.all(got[3] == 0)  # empty rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_segments(dtype):
    offsets, indices, weights = random_csr(20, 1000, max_len=600, weighted=True, seed=3)
    tables = random_tables(1000, 256, dtype)
    reference = float64_mean(tables, offsets, indices, weights)
    for got, want in zip(segment_mean(*tables, offsets, indices, weights), reference):
        assert relative_error(got, want) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_entry_rows_copy_bit_exactly(dtype):
    """Tokens shared with the original vocabulary: one entry of weight 1 -> the original row."""
    tables = random_tables(100, 4096 + 3, dtype)
    rows = torch.randperm(100)[:50]
    offsets = torch.arange(51)
    for weights in (None, torch.ones(50)):
        new_in, new_out = segment_mean(*tables, offsets, rows, weights)
        assert torch.equal(new_in, tables[0][rows]) and torch.equal(new_out, tables[1][rows])


def test_weights_are_normalised_per_row():
    tables = random_tables(10, 64, torch.float32)
    offsets, indices = torch.tensor([0, 2]), torch.tensor([3, 5])
    scaled = segment_mean(*tables, offsets, indices, torch.tensor([2.0, 6.0]))[0]
    normalised = segment_mean(*tables, offsets, indices, torch.tensor([0.25, 0.75]))[0]
    expected = 0.25 * tables[0][3].double() + 0.75 * tables[0][5].double()
    assert relative_error(scaled, expected.unsqueeze(0)) <= 1e-6
    assert relative_error(normalised, expected.unsqueeze(0)) <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_over_slices_equals_mean(dtype):
    """segment_sum on two row slices, added and divided, gives segment_mean (the TP path)."""
    offsets, indices, weights = random_csr(200, 300, max_len=12, weighted=True, seed=5)
    tables = random_tables(300, 96, dtype)
    parts = [segment_sum(tables[0][lo:hi], tables[1][lo:hi], offsets, indices, weights, lo) for lo, hi in ((0, 150), (150, 300))]
    reference_parts = [
        segment_sum_reference(tables[0][lo:hi].double(), tables[1][lo:hi].double(), offsets, indices, weights, lo)
        for lo, hi in ((0, 150), (150, 300))
    ]
    for got, want in zip(parts, reference_parts):
        assert all(t.dtype == torch.float32 for t in got)
        for g, w in zip(got, want):
            assert relative_error(g, w) <= 1e-6
    mass = parts[0][2] + parts[1][2]
    reference = float64_mean(tables, offsets, indices, weights)
    for i in range(2):
        combined = (parts[0][i] + parts[1][i]) / torch.where(mass == 0, 1.0, mass).unsqueeze(1)
        assert relative_error(combined, reference[i]) <= 1e-6


def test_rejects_bad_input():
    tables = random_tables(10, 8, torch.float32)
    offsets, indices = torch.tensor([0, 2]), torch.tensor([1, 2])
    if not extension_available():
        pytest.skip("argument checks live in the compiled ops")
    with pytest.raises(RuntimeError, match="indices must lie"):
        segment_mean(*tables, offsets, torch.tensor([1, 10]))
    with pytest.raises(RuntimeError, match="offsets must run"):
        segment_mean(*tables, torch.tensor([0, 3]), indices)
    with pytest.raises(RuntimeError, match="differ in dtype"):
        segment_mean(tables[0], tables[1].double(), offsets, indices)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        segment_mean(tables[0].double(), tables[1].double(), offsets, indices)


@pytest.mark.skipif(not extension_available(), reason="no compiled ops")
def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        table = torch.empty(10, 8, dtype=torch.bfloat16)
        offsets, indices = torch.zeros(5, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        new_in, new_out = torch.ops.lep_megatron.segment_mean(table, table, offsets, indices, None)
        sums, _, mass = torch.ops.lep_megatron.segment_sum(table, table, offsets, indices, None, 0)
    assert new_in.shape == (4, 8) and new_in.dtype == torch.bfloat16
    assert sums.shape == (4, 8) and sums.dtype == torch.float32 and mass.shape == (4,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_float64(dtype):
    assert extension_available("cuda"), "lep_megatron._C was built without CUDA"
    offsets, indices, weights = random_csr(300, 500, max_len=40, weighted=True)
    for dim in (4096, 13):
        tables = random_tables(500, dim, dtype)
        reference = float64_mean(tables, offsets, indices, weights)
        cuda = [t.cuda() for t in (*tables, offsets, indices, weights)]
        for got, want in zip(segment_mean(*cuda), reference):
            assert relative_error(got.cpu(), want) <= TOLERANCE[dtype]
        sums = segment_sum(*cuda, 250)
        want = segment_sum_reference(tables[0][250:].double(), tables[1][250:].double(), offsets, indices, weights, 250)
        for g, w in zip(sums, want):
            assert relative_error(g.cpu(), w) <= 1e-6
