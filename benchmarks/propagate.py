"""Benchmark of `lep-megatron propagate` at Llama-3-8B shapes: wall time and peak RSS per mode and
solver, against this machine's float64 GEMM floor measured in the same run.

Shapes (--scale 1): base/instruct vocabulary 128,256, donor vocabulary 174,816, d 4096, bfloat16
embedding and untied head tables; the body is a few small dummy tensors. The donor's token map:
the 128,256 original tokens map to themselves, each of the 46,560 new ones averages 2-4 random
original ids. Tokenizers: synthetic byte-level vocabularies of those sizes (3 specials shared).

Each (mode, solver) runs in a fresh process. It measures the float64 GEMM rate first (best of 3
A^T [A | B] products of one solve chunk, the solve's only GEMM), then times propagate() and the
fit (reading the four tables + float64 solves) inside it. GEMM floor of the fit = the two Gram
products per table, 2 x 2 x rows x d^2 flops, at that rate. Peak RSS above the process's RSS
right before propagate(), in fp32 embedding tables of the base vocabulary (128,256 x 4096 x 4 B).

    flock /tmp/lep-bench.lock python benchmarks/propagate.py            # full shapes, several minutes
    python benchmarks/propagate.py --scale 0.25 --no-write              # quick look
"""
import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_result  # noqa: E402

OLD_VOCAB, NEW_VOCAB, DIM = 128256, 174816, 4096
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
RUNS = (("swap", "normal"), ("overlap", "normal"), ("conversion", "normal"), ("conversion", "qr"))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def save_tokenizer(out: Path, n_pieces: int, chat_template: str = None) -> None:
    """A byte-level BPE tokenizer.json with n_pieces distinct pieces (no merges) and SPECIALS."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from lep_megatron.tokenizer import vocab as V

    alphabet = [V.byte_to_unicode()[b] for b in range(ord("a"), ord("z") + 1)]
    pieces, n = {}, 0
    while len(pieces) < n_pieces:
        word, k = "", n
        while True:
            word, k = alphabet[k % 26] + word, k // 26
            if not k:
                break
        pieces["Ġ" + word] = len(pieces)
        n += 1
    tok = Tokenizer(models.BPE(vocab=pieces, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    spec = json.loads(tok.to_str())
    extra = {"chat_template": chat_template} if chat_template else {}
    V.save_tokenizer_dir(out, spec, V.tokenizer_config(spec, SPECIALS[0], SPECIALS[-1], **extra))


def make_model(out: Path, embed: torch.Tensor, head: torch.Tensor, n_pieces: int, chat_template: str = None) -> None:
    from lep_megatron.checkpoint.hf_io import ShardedSafetensorsWriter

    out.mkdir(parents=True)
    d = embed.shape[1]
    config = {"model_type": "llama", "vocab_size": embed.shape[0], "hidden_size": d, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": n_pieces, "eos_token_id": n_pieces + 2}
    (out / "config.json").write_text(json.dumps(config))
    writer = ShardedSafetensorsWriter(out, max_shard_bytes=2 * 2**30)
    writer.add("model.embed_tokens.weight", embed)
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        writer.add(name, torch.ones(d, dtype=torch.bfloat16))
    writer.add("lm_head.weight", head)
    writer.close()
    save_tokenizer(out, n_pieces, chat_template)


def setup(work: Path, old: int, new: int, d: int) -> None:
    """base, instruct (I_S = I_B + noise) and donor dirs with the donor's token map."""
    from lep_megatron.tokenizer.token_map import TokenMap, tokenizer_fingerprint

    g = torch.Generator().manual_seed(0)
    table = lambda rows: (0.02 * torch.randn(rows, d, generator=g)).to(torch.bfloat16)  # noqa: E731
    base_in, base_out = table(old), table(old)
    make_model(work / "base", base_in, base_out, old - len(SPECIALS))
    noisy = lambda t: (t.float() + 0.002 * torch.randn(t.shape, generator=g)).to(torch.bfloat16)  # noqa: E731
    template = "{% for m in messages %}<|begin_of_text|>{{ m['content'] }}<|eot_id|>{% endfor %}"
    make_model(work / "instruct", noisy(base_in), noisy(base_out), old - len(SPECIALS), template)
    del base_in, base_out
    make_model(work / "donor", table(new), table(new), new - len(SPECIALS))
    lengths = torch.cat([torch.ones(old, dtype=torch.long), torch.randint(2, 5, (new - old,), generator=g)])
    firsts = torch.arange(old)
    indices = torch.cat([firsts, torch.randint(0, old - len(SPECIALS), (int(lengths[old:].sum()),), generator=g)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    weights = (1.0 / lengths.float()).repeat_interleave(lengths)
    TokenMap(offsets, indices, weights, old, meta={"new_tokenizer": tokenizer_fingerprint(work / "donor")}).save(
        work / "donor" / "token_map.safetensors")


def gemm_gflops(rows: int, d: int) -> float:
    a = torch.randn(rows, 2 * d, dtype=torch.float64)
    acc = torch.zeros(d, 2 * d, dtype=torch.float64)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        acc.addmm_(a[:, :d].T, a)
        best = min(best, time.perf_counter() - t0)
    return 4 * rows * d * d / best / 1e9


def worker(work: Path, mode: str, solver: str) -> dict:
    import importlib

    P = importlib.import_module("lep_megatron.propagation.propagate")  # the module, not the function

    gflops = gemm_gflops(4096, P.Model.open("base", str(work / "base")).shape.hidden_size)
    fit_s = []
    fit_tables = P.fit_tables

    def timed_fit(*args):
        t0 = time.perf_counter()
        out = fit_tables(*args)
        fit_s.append(time.perf_counter() - t0)
        return out

    P.fit_tables = timed_fit
    out = work / f"out-{mode}-{solver}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = P.PropagateConfig(base=str(work / "base"), instruct=str(work / "instruct"), donor=str(work / "donor"),
                            out_dir=str(out), mode=mode, solver=solver)
    baseline = rss_mib()
    t0 = time.perf_counter()
    P.propagate(cfg)
    total = time.perf_counter() - t0
    report = json.loads((out / "propagation_report.json").read_text())
    shutil.rmtree(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "solver": solver, "total_s": total, "fit_s": fit_s[0], "gemm_gflops": gflops,
            "rss_baseline_mib": baseline, "peak_rss_mib": peak, "peak_above_baseline_mib": peak - baseline,
            "tables": report["tables"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="scale vocabularies and d (quick runs: 0.25)")
    parser.add_argument("--work-dir", default="/tmp/lep-bench-propagate")
    parser.add_argument("--runs", default=",".join(f"{m}:{s}" for m, s in RUNS), help="mode:solver,...")
    parser.add_argument("--no-write", action="store_true", help="print only, leave benchmarks/results alone")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "SOLVER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work_dir)
    if args.worker:
        print(json.dumps(worker(work, *args.worker)))
        return
    old, new, d = (max(int(n * args.scale), 64) for n in (OLD_VOCAB, NEW_VOCAB, DIM))
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    setup(work, old, new, d)
    results = {"shapes": {"old_vocab": old, "new_vocab": new, "dim": d, "dtype": "bfloat16", "tables": 2},
               "setup_s": time.perf_counter() - t0, "runs": [],
               "acceptance": {"conversion_fit_within_1.3x_floor": "fit_over_floor <= 1.3 for conversion:normal",
                              "peak_rss": "peak_above_baseline_fp32_tables <= 4"}}
    fp32_table_mib = old * d * 4 / 2**20
    try:
        for run in args.runs.split(","):
            mode, solver = run.split(":")
            cmd = [sys.executable, __file__, "--work-dir", str(work), "--worker", mode, solver]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{run} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows = sum(t["rows_used"] for t in r["tables"].values()) if mode != "swap" else 0
            r["gemm_floor_s"] = 4 * rows * d * d / (r["gemm_gflops"] * 1e9)
            if rows:
                r["fit_over_floor"] = r["fit_s"] / r["gemm_floor_s"]
                r["floor_fraction_achieved"] = r["gemm_floor_s"] / r["fit_s"]
            r["peak_above_baseline_fp32_tables"] = r["peak_above_baseline_mib"] / fp32_table_mib
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
            if not args.no_write:  # after every run: the slow ones may be cut short
                write_result("propagate", results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
