"""Benchmark of `lep-megatron propagate` at Llama-3-8B shapes: wall time and peak RSS per mode and
solver, against this machine's GEMM floor measured in the same process.

Shapes (--scale 1): base/instruct vocabulary 128,256, donor vocabulary 174,816, d 4096, bfloat16
embedding and untied head tables; the body is a few small dummy tensors. --scale s multiplies the
vocabularies only (d stays 4096, so the per-row costs are the real ones). The donor's token map:
the original tokens map to themselves; the new ones average random original ids, as many as
PIECES_PER_NEW_TOKEN says: the distribution of the real Llama-3 tokenizer extended with a 64k
Russian SentencePiece BPE trained on data/corpus/train.txt (`lep-megatron tokenizer extend
original=llama-3 new_vocab_size=64000`: 54,769 new tokens, 2.76 pieces on average). Tokenizers:
synthetic byte-level vocabularies of those sizes (3 specials shared).

Each (mode, solver) runs in a fresh process. It measures the float64 GEMM rate (best of 3
A^T [A | B] products of one 4096-row solve chunk) and the float32 one (a chunk of donor rows times
the map), before and after the run, keeping the better; then times propagate(), its fit (reading
the base and instruct tables + the float64 solves) and, within the fit, the streamed solves.
GEMM floor of the fit = the two full Gram products per table, 2 x 2 x rows x d^2 flops, at the
float64 rate (the normal solver computes only the upper block triangle of A^T A: 78% of those
flops, so it can beat the floor); floor of the output = donor rows x the map per table,
2 x rows x d^2 flops, at the float32 rate. Peak RSS above the process's RSS right before
propagate(), in fp32 embedding tables of the donor vocabulary (174,816 x 4096 x 4 B = 2.86 GB at
--scale 1) and, as the earlier runs reported it, of the base vocabulary (128,256 rows).

    flock /tmp/lep-bench.lock python benchmarks/propagate.py            # full shapes, ~20 min
    python benchmarks/propagate.py --scale 0.25 --no-write              # quick look
"""
import argparse
import json
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
RUNS = (("swap", "normal"), ("overlap", "normal"), ("conversion", "normal"), ("sum_conversion", "normal"),
        ("conversion", "qr"))
# pieces per new token -> how many of the 54,769 new tokens of the real extension (see above) have that many
PIECES_PER_NEW_TOKEN = {2: 26371, 3: 18532, 4: 7408, 5: 1825, 6: 441, 7: 98, 8: 42, 9: 32, 10: 14, 11: 5, 12: 1}


def rss_mib(field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak since start or the last reset_peak_rss) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def reset_peak_rss() -> None:
    """VmHWM := VmRSS (Linux >= 4.0), so that the GEMM-rate buffers freed before don't count."""
    Path("/proc/self/clear_refs").write_text("5")


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
    pieces = torch.tensor(list(PIECES_PER_NEW_TOKEN))
    drawn = torch.multinomial(torch.tensor(list(PIECES_PER_NEW_TOKEN.values()), dtype=torch.float), new - old,
                              replacement=True, generator=g)
    lengths = torch.cat([torch.ones(old, dtype=torch.long), pieces[drawn]])
    firsts = torch.arange(old)
    indices = torch.cat([firsts, torch.randint(0, old - len(SPECIALS), (int(lengths[old:].sum()),), generator=g)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    weights = (1.0 / lengths.float()).repeat_interleave(lengths)
    TokenMap(offsets, indices, weights, old, meta={"new_tokenizer": tokenizer_fingerprint(work / "donor")}).save(
        work / "donor" / "token_map.safetensors")


def gemm_rates(rows: int, d: int) -> dict:
    """GFLOP/s of the fit's float64 Gram GEMM and of the output's float32 GEMM (best of 3 each)."""
    def best(fn, flops):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return flops / min(times) / 1e9

    ab = torch.randn(rows, 2 * d, dtype=torch.float64)
    gram = torch.zeros(d, 2 * d, dtype=torch.float64)
    f64 = best(lambda: gram.addmm_(ab[:, :d].T, ab), 4 * rows * d * d)
    del ab, gram
    x, m = torch.randn(2 * rows, d), torch.randn(d, d)
    y = torch.empty(2 * rows, d)
    f32 = best(lambda: torch.mm(x, m, out=y), 2 * 2 * rows * d * d)
    return {"float64_gflops": f64, "float32_gflops": f32}


def worker(work: Path, mode: str, solver: str) -> dict:
    import importlib

    P = importlib.import_module("lep_megatron.propagation.propagate")  # the module, not the function

    d = P.open_model("base", str(work / "base")).shape.hidden_size
    rates_before = gemm_rates(4096, d)
    timings = {"fit_s": 0.0, "solve_s": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            timings[key] += time.perf_counter() - t0
            return out
        return wrapper

    P.fit_tables, P.fit_map = timed(P.fit_tables, "fit_s"), timed(P.fit_map, "solve_s")
    out = work / f"out-{mode}-{solver}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = P.PropagateConfig(base=str(work / "base"), instruct=str(work / "instruct"), donor=str(work / "donor"),
                            out_dir=str(out), mode=mode, solver=solver)
    reset_peak_rss()
    baseline = rss_mib()
    t0 = time.perf_counter()
    P.propagate(cfg)
    total = time.perf_counter() - t0
    peak = rss_mib("VmHWM")
    report = json.loads((out / "propagation_report.json").read_text())
    shutil.rmtree(out)
    rates_after = gemm_rates(4096, d)
    rates = {k: max(rates_before[k], rates_after[k]) for k in rates_before}
    return {"mode": mode, "solver": solver, "total_s": total, **timings, "output_s": total - timings["fit_s"],
            "gemm_rates_before": rates_before, "gemm_rates_after": rates_after, **rates,
            "rss_baseline_mib": baseline, "peak_rss_mib": peak, "peak_above_baseline_mib": peak - baseline,
            "tables": report["tables"]}


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no MemAvailable")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="scale the vocabularies (quick runs: 0.25)")
    parser.add_argument("--work-dir", default="/tmp/lep-bench-propagate")
    parser.add_argument("--runs", default=",".join(f"{m}:{s}" for m, s in RUNS), help="mode:solver,...")
    parser.add_argument("--no-write", action="store_true", help="print only, leave benchmarks/results alone")
    parser.add_argument("--keep-inputs", action="store_true", help="reuse the work dir's models if there, keep them")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "SOLVER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work_dir)
    if args.worker:
        print(json.dumps(worker(work, *args.worker)))
        return
    old, new, d = int(OLD_VOCAB * args.scale), int(NEW_VOCAB * args.scale), DIM
    # the peak of a run (~1.3 donor-vocabulary fp32 tables, see README) with room for the page cache
    need_gib = 2.0 * new * d * 4 / 2**30
    t0 = time.perf_counter()
    if not (args.keep_inputs and (work / "donor" / "token_map.safetensors").is_file()):
        shutil.rmtree(work, ignore_errors=True)
        setup(work, old, new, d)
    results = {"shapes": {"old_vocab": old, "new_vocab": new, "dim": d, "dtype": "bfloat16", "tables": 2,
                          "pieces_per_new_token": PIECES_PER_NEW_TOKEN},
               "setup_s": time.perf_counter() - t0, "runs": [],
               "acceptance": {"conversion_fit_within_1.3x_floor": "fit_over_floor <= 1.3 for conversion:normal",
                              "peak_rss": "peak_above_baseline_fp32_tables <= 4"}}
    table_mib, old_table_mib = new * d * 4 / 2**20, old * d * 4 / 2**20
    try:
        for run in args.runs.split(","):
            mode, solver = run.split(":")
            if mem_available_gib() < need_gib:
                raise SystemExit(f"{run}: only {mem_available_gib():.1f} GiB available, {need_gib:.1f} needed; "
                                 "rerun when the machine is quieter")
            cmd = [sys.executable, __file__, "--work-dir", str(work), "--worker", mode, solver]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{run} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            fit_rows = sum(t["rows_used"] for t in r["tables"].values()) if mode != "swap" else 0
            r["fit_floor_s"] = 4 * fit_rows * d * d / (r["float64_gflops"] * 1e9)
            r["output_floor_s"] = 2 * new * d * d * len(r["tables"]) / (r["float32_gflops"] * 1e9) \
                if mode != "swap" else 0.0
            if fit_rows:
                r["fit_over_floor"] = r["fit_s"] / r["fit_floor_s"]
                r["floor_fraction_achieved"] = r["fit_floor_s"] / r["fit_s"]
                r["total_over_floor"] = r["total_s"] / (r["fit_floor_s"] + r["output_floor_s"])
            r["peak_above_baseline_fp32_tables"] = r["peak_above_baseline_mib"] / table_mib
            r["peak_above_baseline_old_vocab_fp32_tables"] = r["peak_above_baseline_mib"] / old_table_mib
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
            if not args.no_write:  # after every run: the slow ones may be cut short
                write_result("propagate" if args.scale == 1 else f"propagate_scale{args.scale:g}", results)
    finally:
        if not args.keep_inputs:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
