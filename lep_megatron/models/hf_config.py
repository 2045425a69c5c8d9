"""Read a Hugging Face config.json into the transformer shape that every stage shares."""
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from lep_megatron.common.io import UserInputError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str, key: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise UserInputError(f"{key}={name!r} is not a supported dtype; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


@dataclass(frozen=True)
class HFModelShape:
    """The architecture of a Llama-family decoder as its HF config.json describes it."""

    model_type: str
    """HF model_type: one of SUPPORTED_MODEL_TYPES."""
    vocab_size: int
    """Rows of embed_tokens / lm_head in the HF checkpoint (no Megatron padding)."""
    hidden_size: int
    """Model width d."""
    intermediate_size: int
    """SwiGLU inner width (each of gate and up)."""
    num_layers: int
    """Number of decoder layers."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """Key/value heads (GQA query groups)."""
    head_dim: int
    """Per-head width; may differ from hidden_size / num_attention_heads."""
    rms_norm_eps: float
    """RMSNorm epsilon."""
    rope_theta: float
    """RoPE base."""
    rope_scaling: Optional[dict]
    """Llama-3 style rope scaling {factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}, or None."""
    max_position_embeddings: int
    """Longest sequence the model was trained for."""
    tie_word_embeddings: bool
    """lm_head shares embed_tokens (small Qwen2)."""
    qkv_bias: bool
    """q/k/v projections carry a bias (Qwen2)."""
    torch_dtype: str
    """dtype the checkpoint was saved in."""
    sliding_window: Optional[int] = None
    """Mistral's attention window; megatron's local spec attends fully, which is the same model
    for sequences up to this length (the trainer checks its seq_length against it)."""

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserInputError(
                f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def query_groups(self) -> int:
        return self.num_key_value_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "HFModelShape":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserInputError(
                f"{source}: model_type={model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key):
            if cfg.get(key) is None:
                raise UserInputError(f"{source}: required key {key!r} is missing")
            return cfg[key]

        for key in ("mlp_bias", "attention_bias"):
            if model_type != "qwen2" and cfg.get(key):
                raise UserInputError(f"{source}: {key}=true is not supported for {model_type}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UserInputError(f"{source}: hidden_act={cfg['hidden_act']!r} is not supported (only silu)")
        heads = need("num_attention_heads")
        rope_scaling = _llama3_rope_scaling(cfg, source)
        rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or need("hidden_size") // heads,
            rms_norm_eps=need("rms_norm_eps"),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> "HFModelShape":
        return cls.from_hf_config(read_config(model_dir), source=str(Path(model_dir) / "config.json"))


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserInputError(f"{path} not found: in_dir must be a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path} is not valid JSON: {e}") from e


def _llama3_rope_scaling(cfg: dict, source: str) -> Optional[dict]:
    """transformers 4.x writes `rope_scaling`, 5.x `rope_parameters` (which also holds rope_theta)."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UserInputError(f"{source}: rope_scaling type {kind!r} is not supported (only llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in rs]
    if missing:
        raise UserInputError(f"{source}: rope_scaling is missing {missing}")
    return {k: rs[k] for k in keys}
