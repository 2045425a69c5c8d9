"""TP-sharded averaging init (gloo, 2 processes) against the unsharded segment_mean."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lep_megatron.embeddings.sharded_init import init_sharded_embeddings, padded_vocab_size
from lep_megatron.ops import segment_mean
from lep_megatron.tokenizer.token_map import TokenMap

OLD_VOCAB, NEW_VOCAB, DIM, DIVISIBLE_BY = 300, 411, 48, 64


def make_problem(dtype: torch.dtype):
    """Original tables padded as Megatron pads them, and a token map: the first 300 new tokens
    are the original ones (one entry, weight 1), then empty rows and 2-5 piece averages."""
    g = torch.Generator().manual_seed(0)
    padded_old = padded_vocab_size(OLD_VOCAB, DIVISIBLE_BY, 2)
    tables = [torch.zeros(padded_old, DIM, dtype=dtype) for _ in range(2)]
    for t in tables:
        t[:OLD_VOCAB] = torch.randn(OLD_VOCAB, DIM, generator=g).to(dtype)
    lengths = torch.cat([torch.ones(OLD_VOCAB, dtype=torch.long), torch.randint(0, 6, (NEW_VOCAB - OLD_VOCAB,), generator=g)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.cat([torch.arange(OLD_VOCAB), torch.randint(0, OLD_VOCAB, (int(lengths[OLD_VOCAB:].sum()),), generator=g)])
    weights = torch.rand(indices.numel(), generator=g) + 0.1
    weights /= torch.zeros(NEW_VOCAB).index_add_(0, torch.repeat_interleave(torch.arange(NEW_VOCAB), lengths), weights).repeat_interleave(lengths)
    weights[:OLD_VOCAB] = 1.0
    return tables, TokenMap(offsets=offsets, indices=indices, weights=weights, old_vocab_size=OLD_VOCAB)


def unsharded(tables, token_map):
    new_in, new_out = segment_mean(tables[0][:OLD_VOCAB], tables[1][:OLD_VOCAB], token_map.offsets, token_map.indices, token_map.weights)
    padded = padded_vocab_size(NEW_VOCAB, DIVISIBLE_BY, 2)
    pad = lambda t: torch.cat([t, t.new_zeros(padded - NEW_VOCAB, DIM)])  # noqa: E731
    return pad(new_in), pad(new_out)


def _worker(rank: int, world_size: int, port: int, dtype: torch.dtype, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        tables, token_map = make_problem(dtype)
        rows = tables[0].shape[0] // world_size
        shards = [t[rank * rows : (rank + 1) * rows].clone() for t in tables]
        new_in, new_out = init_sharded_embeddings(
            *shards, token_map, rank=rank, world_size=world_size, group=dist.group.WORLD, make_vocab_size_divisible_by=DIVISIBLE_BY
        )
        torch.save((new_in, new_out), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tp2_equals_unsharded(tmp_path, dtype):
    mp.spawn(_worker, args=(2, free_port(), dtype, str(tmp_path)), nprocs=2, join=True)
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    sharded_in, sharded_out = (torch.cat([s[i] for s in shards]) for i in range(2))
    tables, token_map = make_problem(dtype)
    want_in, want_out = unsharded(tables, token_map)
    padded = padded_vocab_size(NEW_VOCAB, DIVISIBLE_BY, 2)
    assert sharded_in.shape == (padded, DIM) and sharded_in.dtype == dtype
    # Shared tokens (and empty rows, padding rows) are exact; averages agree to fp32 rounding
    # of the summation order, then one rounding to the dtype.
    assert torch.equal(sharded_in[:OLD_VOCAB], tables[0][:OLD_VOCAB])
    assert torch.equal(sharded_out[:OLD_VOCAB], tables[1][:OLD_VOCAB])
    assert torch.all(sharded_in[NEW_VOCAB:] == 0) and torch.all(sharded_out[NEW_VOCAB:] == 0)
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8
    for got, want in ((sharded_in, want_in), (sharded_out, want_out)):
        assert ((got.double() - want.double()).abs().max() / want.double().abs().max()).item() <= tolerance


def test_single_rank_equals_segment_mean():
    tables, token_map = make_problem(torch.float32)
    got = init_sharded_embeddings(*tables, token_map, rank=0, world_size=1, make_vocab_size_divisible_by=DIVISIBLE_BY)
    padded = padded_vocab_size(NEW_VOCAB, DIVISIBLE_BY, 1)
    new_in, new_out = segment_mean(tables[0][:OLD_VOCAB], tables[1][:OLD_VOCAB], token_map.offsets, token_map.indices, token_map.weights)
    assert got[0].shape == (padded, DIM)
    assert torch.equal(got[0][:NEW_VOCAB], new_in) and torch.equal(got[1][:NEW_VOCAB], new_out)


def test_padded_vocab_size():
    assert padded_vocab_size(128256, 128, 1) == 128256
    assert padded_vocab_size(174816, 128, 8) == 175104
    assert padded_vocab_size(32000, 128, 3) == 32256


def test_shards_too_small():
    tables, token_map = make_problem(torch.float32)
    with pytest.raises(ValueError, match="cannot hold"):
        init_sharded_embeddings(tables[0][:100], tables[1][:100], token_map, rank=0, world_size=2)
