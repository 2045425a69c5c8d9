"""Tiny random models of each supported family: the demo's and the tests' stand-ins for real
checkpoints (no pretrained weights ship in any package; nothing is fetched from a hub)."""
import shutil
from pathlib import Path

import torch


def tiny_hf_config(arch: str, vocab_size: int = 131, tie: bool = None, layers: int = 4):
    """A small config of each family, with the family's distinguishing features switched on:
    Llama-3 rope scaling, Mistral GQA + sliding window, Qwen2 q/k/v bias + tied embeddings."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32, "rope_theta": 500000.0}
        return LlamaConfig(**common, rope_scaling=rope, rope_theta=500000.0, tie_word_embeddings=bool(tie))
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=4096, rope_theta=1e6, tie_word_embeddings=bool(tie))
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True if tie is None else tie, rope_theta=1e6)
    raise ValueError(arch)


def make_hf_model(out_dir: Path, arch: str, vocab_size: int = 131, tie: bool = None, seed: int = 0,
                  layers: int = 4, max_shard_size=None, tokenizer_size: int = None, tokenizer_dir: Path = None):
    """Save a random tiny model (weights scaled up so logits differ visibly) and a tokenizer:
    the one in `tokenizer_dir` (e.g. a real model's), else a word-level one."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch, vocab_size, tie, layers))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            else:
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), **kwargs)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, Path(out_dir) / f.name)
    else:
        save_word_tokenizer(out_dir, tokenizer_size or min(vocab_size, 100))
    return model.eval()


def save_word_tokenizer(out_dir: Path, size: int) -> None:
    """A word-level tokenizer with `size` tokens (ids 0..2 are <unk>, <s>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out_dir))


def write_random_checkpoint(out_dir: Path, config: dict, max_shard_bytes: int = 2 * 2**30, seed: int = 0) -> int:
    """An HF checkpoint of random tensors (std 0.02, config's torch_dtype) for `config`, written
    one tensor at a time, so its size is bounded by disk only (benchmarks, memory tests); returns
    the bytes of weights written."""
    import json

    from lep_megatron.checkpoint.hf_io import ShardedSafetensorsWriter
    from lep_megatron.models.hf_config import HFModelShape, parse_dtype
    from lep_megatron.models.state_dict_adapter import StateDictAdapter

    shape = HFModelShape.from_hf_config(config)
    dtype = parse_dtype(shape.torch_dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    shapes = StateDictAdapter(shape, shape.vocab_size).hf_shapes()
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    writer.expect((name, s, dtype) for name, s in shapes.items())
    g = torch.Generator().manual_seed(seed)
    for name, s in shapes.items():
        writer.add(name, (torch.randn(s, generator=g) * 0.02).to(dtype))
    writer.close()
    (out_dir / "config.json").write_text(json.dumps(config))
    return writer.total_bytes
