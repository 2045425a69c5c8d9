"""hf-to-mcore writes the checkpoint block by block from the HF files: with blocks far smaller than
the tensors (QKV blocks cutting through query groups, vocabulary blocks through the padding
boundary), megatron's own dist_checkpointing.load reads back exactly the hand-built layout."""
import pickle

import pytest
import torch

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.checkpoint.hf_io import SafetensorsReader
from lep_megatron.checkpoint.megatron_io import CheckpointMeta, load_model
from lep_megatron.checkpoint.streaming import save_from_hf
from lep_megatron.common.launch import torchrun
from lep_megatron.models import HFModelShape, build_stage_model
from lep_megatron.models.tiny import make_hf_model
from lep_megatron.parallel import init_distributed

pytestmark = pytest.mark.megatron


def stored_chunks(ckpt_dir, key):
    with open(ckpt_dir / ".metadata", "rb") as f:
        return len(pickle.load(f).state_dict_metadata[key].chunks)


def loaded_params(ckpt_dir, shape, padded):
    model = build_stage_model(shape, padded, torch.float32, perform_initialization=False)
    load_model(model, ckpt_dir)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def test_small_blocks_load_as_the_hand_built_layout(tmp_path):
    make_hf_model(tmp_path / "hf", "qwen2", vocab_size=131, layers=2)  # tied, q/k/v bias, 2 query groups
    run(ConvertConfig("hf-to-mcore", tmp_path / "hf", tmp_path / "whole", tp=2))
    meta = CheckpointMeta.read(tmp_path / "whole")
    shape, padded = HFModelShape.from_dir(tmp_path / "hf"), meta.padded_vocab_size
    init_distributed(1, 1)
    reader = SafetensorsReader(tmp_path / "hf")
    # 1000 bytes: 3 rows of a 64-wide fp32 table, so blocks cut through everything
    save_from_hf(reader, shape, padded, torch.float32, tmp_path / "blocks", meta, max_chunk_bytes=1000)
    assert stored_chunks(tmp_path / "blocks", "embedding.word_embeddings.weight") == -(-padded // 3)
    assert stored_chunks(tmp_path / "whole", "embedding.word_embeddings.weight") == 1

    got, whole = loaded_params(tmp_path / "blocks", shape, padded), loaded_params(tmp_path / "whole", shape, padded)
    assert sorted(got) == sorted(whole)
    for name in got:
        assert torch.equal(got[name], whole[name]), name
    hf = {k: reader.get(k) for k in reader.keys()}
    emb = got["embedding.word_embeddings.weight"]
    assert torch.equal(emb[:131], hf["model.embed_tokens.weight"]) and not emb[131:].any()
    hd, per_group = shape.head_dim, shape.num_attention_heads // shape.num_key_value_heads * shape.head_dim
    for layer in range(2):
        p, m = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        for kind in ("weight", "bias"):
            q, k, v = (hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv")
            want = torch.cat([torch.cat([q[g * per_group:(g + 1) * per_group], k[g * hd:(g + 1) * hd],
                                         v[g * hd:(g + 1) * hd]]) for g in range(shape.num_key_value_heads)])
            assert torch.equal(got[m + f"self_attention.linear_qkv.{kind}"], want), (layer, kind)
        fc1 = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        assert torch.equal(got[m + "mlp.linear_fc1.weight"], fc1)
        assert torch.equal(got[m + "mlp.linear_fc2.weight"], hf[p + "mlp.down_proj.weight"])
        assert torch.equal(got[m + "self_attention.linear_proj.weight"], hf[p + "self_attn.o_proj.weight"])


@pytest.mark.slow
def test_torchrun_ranks_write_their_shards_tied_across_stages(tmp_path):
    """4 ranks at TP2xPP2 each write their own boxes (the tied output layer of the last stage is a
    replica of the first stage's embedding, written once); exporting gives back every tensor."""
    make_hf_model(tmp_path / "hf", "qwen2", vocab_size=261)
    torchrun(4, ["-m", "lep_megatron", "convert", "hf-to-mcore", f"in_dir={tmp_path / 'hf'}",
                 f"out_dir={tmp_path / 'mc'}", "parallel.tp=2", "parallel.pp=2"])
    assert sorted(p.name for p in (tmp_path / "mc").glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    run(ConvertConfig("mcore-to-hf", tmp_path / "mc", tmp_path / "back"))
    want, got = SafetensorsReader(tmp_path / "hf"), SafetensorsReader(tmp_path / "back")
    assert sorted(want.keys()) == sorted(got.keys())
    for name in want.keys():
        assert torch.equal(got.get(name), want.get(name)), name
