"""Synthetic LEP setups on a tiny Mistral with the real Mistral tokenizer: base B, instruct S made
as I_S = I_B.D_true and O_S = O_B.U_true (same body, ChatML tokens added), a donor A from
`lep-megatron init` with the tokenizer extended by Russian pieces, its rows then perturbed."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer

from lep_megatron.embeddings.initialize import EMBED, HEAD, InitConfig, initialize
from lep_megatron.tokenizer import vocab as V

OLD_VOCAB, DIM = 32000, 64
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def random_map(seed: int) -> torch.Tensor:
    """A well-conditioned d x d map (singular values in [0.5, 1.5])."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    return q1 @ torch.diag(torch.linspace(0.5, 1.5, DIM, dtype=torch.float64)) @ q2


def read_tensors(model_dir: Path) -> dict:
    tensors = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        if not shard.name.startswith(("token_map", "propagation")):
            tensors.update(load_file(str(shard)))
    return tensors


def rewrite_tensors(model_dir: Path, tensors: dict) -> None:
    for f in list(Path(model_dir).glob("model*.safetensors")) + list(Path(model_dir).glob("model.safetensors.index.json")):
        f.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(model_dir) / "model.safetensors"),
              metadata={"format": "pt"})


def make_instruct(base: Path, out: Path, d_true, u_true, noise: float = 0.0, seed: int = 1) -> None:
    """S: the base body, I_S = I_B.D (+ noise), O_S = O_B.U (U None: tied), two ChatML rows."""
    out.mkdir()
    g = torch.Generator().manual_seed(seed)
    tensors = read_tensors(base)
    for name, m in ((EMBED, d_true), (HEAD, u_true)):
        if name not in tensors:
            continue
        t = tensors[name].double() @ m
        t += noise * float(t.std()) * torch.randn(t.shape, generator=g, dtype=torch.float64)
        tensors[name] = torch.cat([t, torch.randn(len(CHAT_TOKENS), DIM, generator=g, dtype=torch.float64)]).float()
    rewrite_tensors(out, tensors)
    config = json.loads((base / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, vocab_size=OLD_VOCAB + 2, eos_token_id=OLD_VOCAB + 1)))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, OLD_VOCAB + 1]}))
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
    spec = json.loads(tok.to_str())
    V.save_tokenizer_dir(out, spec, V.tokenizer_config(spec, "<s>", "<|im_end|>", "<unk>", chat_template=CHATML))


def make_donor(base: Path, ext: Path, out: Path, seed: int = 2) -> None:
    """`lep-megatron init` of the base for the extended tokenizer, rows then perturbed (as training would)."""
    initialize(InitConfig(base=str(base), tokenizer=str(ext), out_dir=str(out)))
    g = torch.Generator().manual_seed(seed)
    tensors = read_tensors(out)
    for name in (EMBED, HEAD):
        if name in tensors:
            tensors[name] = tensors[name] + 0.1 * torch.randn(tensors[name].shape, generator=g)
    rewrite_tensors(out, tensors)


@pytest.fixture(scope="session")
def lep(tmp_path_factory, tiny_mistral):
    """Directories of base, ext (tokenizer), donor, instruct (exact maps) and the true maps."""
    d = tmp_path_factory.mktemp("lep")
    base = tiny_mistral["base"]
    make_donor(base, tiny_mistral["ext"], d / "donor")
    d_true, u_true = random_map(10), random_map(11)
    make_instruct(base, d / "instruct", d_true, u_true)
    return {"dir": d, "base": base, "ext": tiny_mistral["ext"], "donor": d / "donor", "instruct": d / "instruct",
            "D": d_true, "U": u_true, "original": tiny_mistral["original"]}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
