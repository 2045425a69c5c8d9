"""Darumeru scoring throughput on the CPU, one process: items/s of a log-likelihood task
(nlpcoreteam/ruMMLU, 5-shot, the next-token probability of A-D: one forward per item) and a
generation task (darumeru/cp_sent_ru, 5-shot, greedy, up to 128 new tokens or a newline) with the transformers
backend and the Megatron backend on the same random Llama-style model (Mistral-7B's real 32,000
SentencePiece tokenizer, padded to 32,128 rows on the Megatron side).
    python benchmarks/eval.py [--hidden 256 --layers 4] [--generation-items 16] [--batch-size 8]
The generation fixture's items are repeated to --generation-items. The HF backend generates with
a KV cache; the Megatron backend recomputes the prefix every step (no cache), hence its gap there.
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "evaluation" / "fixtures"
LOGLIK_TASK, GENERATION_TASK = "nlpcoreteam/ruMMLU", "darumeru/cp_sent_ru"


def data_dir(tmp: Path, generation_items: int) -> Path:
    """The test fixtures with the generation task's test items repeated to `generation_items`."""
    out = tmp / "data"
    shutil.copytree(FIXTURES, out)
    test = out / "RefalMachine" / "darumeru" / "data" / "cp_sent_ru" / "test.jsonl"
    lines = test.read_text(encoding="utf-8").splitlines()
    test.write_text("\n".join((lines * generation_items)[:generation_items]) + "\n", encoding="utf-8")
    return out


def model_dirs(tmp: Path, hidden: int, layers: int):
    """(HF dir, Megatron dir) of a random Llama with the Mistral-7B tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lep_megatron.checkpoint.convert import ConvertConfig, run
    from lep_megatron.tokenizer.originals import materialize

    hf = materialize("mistral-7b", tmp / "hf")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=4096,
                                         bos_token_id=1, eos_token_id=2))
    model.save_pretrained(str(hf))
    params = sum(p.numel() for p in model.parameters())
    run(ConvertConfig("hf-to-mcore", hf, tmp / "mc"))
    return hf, tmp / "mc", params


def score(backend, data: Path, batch_size: int) -> dict:
    from lep_megatron.evaluation.prompts import BASE_FORMAT
    from lep_megatron.evaluation.runner import run_task
    from lep_megatron.evaluation.tasks import build
    from lep_megatron.evaluation.tasks.base import TaskSettings

    out = {}
    for name in (LOGLIK_TASK, GENERATION_TASK):
        result, requests, records = run_task(build(name, TaskSettings(few_shot=5)), backend, BASE_FORMAT, data,
                                             max_len=4000, batch_size=batch_size)
        row = {"items": result.requests, "seconds": round(result.seconds, 3),
               "items_per_s": round(result.requests / result.seconds, 2),
               "prompt_tokens_mean": round(sum(backend.count_tokens(r.prompt) for r in requests) / len(requests), 1),
               "score": result.score}
        out[name] = row
        print(name, type(backend).__name__, row, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--generation-items", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from lep_megatron.evaluation.backends.hf import HFBackend
    from lep_megatron.evaluation.backends.megatron import MegatronBackend

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = data_dir(tmp, args.generation_items)
        hf, mc, params = model_dirs(tmp, args.hidden, args.layers)
        results = {
            "transformers": score(HFBackend.from_pretrained(str(hf), dtype="float32", device="cpu"), data,
                                  args.batch_size),
            "megatron": score(MegatronBackend.from_checkpoint(str(mc)), data, args.batch_size),
        }
    write_result("eval", {
        "what": "Darumeru items/s, one CPU process, fp32: a log-likelihood (choice) task and a greedy generation task",
        "command": f"python benchmarks/eval.py --hidden {args.hidden} --layers {args.layers} "
                   f"--generation-items {args.generation_items} --batch-size {args.batch_size}",
        "model": {"parameters": params, "hidden": args.hidden, "layers": args.layers, "vocab": 32000,
                  "tokenizer": "Mistral-7B SentencePiece (mistral_common)"},
        "torch_threads": torch.get_num_threads(),
        # the machine is shared: other jobs' load makes every figure slower by about the same factor
        "load_average_1m_at_end": os.getloadavg()[0],
        "tasks": {"loglik": LOGLIK_TASK, "generation": GENERATION_TASK},
        "results": results,
    })


if __name__ == "__main__":
    main()
