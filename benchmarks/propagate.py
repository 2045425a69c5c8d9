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

Each (mode, solver) runs in a fresh process. The float64 GEMM rate (best of 3 A^T [A | B]
products of one 4096-row solve chunk, full GEMMs) is measured right before and right after the fit
(inside propagate(), not counted in its time), the float32 one (a chunk of donor rows times the
map) before and after propagate(); both are recorded and the floors use the higher (quieter) of
each pair. It times propagate(), its fit (reading the base and instruct tables + the float64
solves) and, within the fit, the streamed solves, split into design (T.I rows: segment sums,
float64 conversion), gram (the Gram products) and the rest (norms, Cholesky solve, residual).
GEMM floor of the fit = the two full Gram products per table, 2 x 2 x rows x d^2 flops, at the
float64 rate. The normal solver computes A^T B and only the upper triangle of A^T A (a symmetric
rank-k update built from GEMMs: gram_flops_fraction of those flops, 76.6% at d = 4096; the JSON says
so), so it can beat that floor. Floor of the output = donor rows x the map per table,
2 x rows x d^2 flops, at the float32 rate. Peak RSS above the process's RSS right before
propagate(), in fp32 embedding tables of the donor vocabulary (174,816 x 4096 x 4 B = 2.86 GB at
--scale 1) and, as the earlier runs reported it, of the base vocabulary (128,256 rows).

    flock /tmp/lep-bench.lock python benchmarks/propagate.py            # full shapes, ~20 min
    flock /tmp/lep-bench.lock python benchmarks/propagate.py --mode conversion   # the acceptance run alone
    python benchmarks/propagate.py --scale 0.25 --no-write              # quick look
    python benchmarks/propagate.py --scale 0.25 --mode conversion --no-write
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, write_result  # noqa: E402

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


def best_rate(fn, flops: float) -> float:
    """GFLOP/s of fn (best of 3)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return flops / min(times) / 1e9


def float64_rate(rows: int, d: int) -> float:
    """GFLOP/s of the fit's float64 Gram GEMM as a full product: A^T [A | B] of one solve chunk."""
    ab = torch.randn(rows, 2 * d, dtype=torch.float64)
    gram = torch.zeros(d, 2 * d, dtype=torch.float64)
    return best_rate(lambda: gram.addmm_(ab[:, :d].T, ab), 4 * rows * d * d)


def float32_rate(rows: int, d: int) -> float:
    """GFLOP/s of the output's float32 GEMM: a chunk of donor rows times the map."""
    x, m = torch.randn(2 * rows, d), torch.randn(d, d)
    y = torch.empty(2 * rows, d)
    return best_rate(lambda: torch.mm(x, m, out=y), 2 * 2 * rows * d * d)


def worker(work: Path, mode: str, solver: str) -> dict:
    import importlib

    P = importlib.import_module("lep_megatron.propagation.propagate")  # the module, not the function
    S = importlib.import_module("lep_megatron.propagation.solve")

    d = P.open_model("base", str(work / "base")).shape.hidden_size
    f32_before = float32_rate(4096, d)
    timings = {"fit_s": 0.0, "solve_s": 0.0, "design_s": 0.0, "gram_s": 0.0, "rate_measurement_s": 0.0}
    f64 = {}
    loads = {"before": os.getloadavg()}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            timings[key] += time.perf_counter() - t0
            return out
        return wrapper

    def fit_tables(*args, **kwargs):  # the float64 rate right before and right after the fit, untimed
        t0 = time.perf_counter()
        f64["before"] = float64_rate(4096, d)
        loads["fit_start"] = os.getloadavg()
        t1 = time.perf_counter()
        out = inner_fit(*args, **kwargs)
        t2 = time.perf_counter()
        loads["fit_end"] = os.getloadavg()
        f64["after"] = float64_rate(4096, d)
        timings["fit_s"] += t2 - t1
        timings["rate_measurement_s"] += (t1 - t0) + (time.perf_counter() - t2)
        return out

    def design_chunks(*args, **kwargs):  # time spent making the chunks, not in the consumer
        it = inner_design(*args, **kwargs)
        while True:
            t0 = time.perf_counter()
            ab = next(it, None)
            timings["design_s"] += time.perf_counter() - t0
            if ab is None:
                return
            yield ab

    depth = [0]

    def gram_update(*args, **kwargs):  # outermost calls only (it recurses)
        depth[0] += 1
        t0 = time.perf_counter()
        try:
            return inner_gram(*args, **kwargs)
        finally:
            depth[0] -= 1
            if not depth[0]:
                timings["gram_s"] += time.perf_counter() - t0

    inner_fit, inner_design, inner_gram = P.fit_tables, S.design_chunks, S.gram_update
    P.fit_tables, P.fit_map = fit_tables, timed(P.fit_map, "solve_s")
    S.design_chunks, S.gram_update = design_chunks, gram_update
    out = work / f"out-{mode}-{solver}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = P.PropagateConfig(base=str(work / "base"), instruct=str(work / "instruct"), donor=str(work / "donor"),
                            out_dir=str(out), mode=mode, solver=solver)
    reset_peak_rss()
    baseline = rss_mib()
    t0 = time.perf_counter()
    P.propagate(cfg)
    total = time.perf_counter() - t0 - timings["rate_measurement_s"]
    peak = rss_mib("VmHWM")
    loads["after"] = os.getloadavg()
    report = json.loads((out / "propagation_report.json").read_text())
    shutil.rmtree(out)
    f32_after = float32_rate(4096, d)
    return {"mode": mode, "solver": solver, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_threads": torch.get_num_threads(), "loadavg_1_5_15": loads,
            "total_s": total, **timings, "output_s": total - timings["fit_s"],
            "solve_other_s": timings["solve_s"] - timings["design_s"] - timings["gram_s"],
            "float64_gflops_before_fit": f64["before"], "float64_gflops_after_fit": f64["after"],
            "float64_gflops": max(f64["before"], f64["after"]),
            "float32_gflops_before": f32_before, "float32_gflops_after": f32_after,
            "float32_gflops": max(f32_before, f32_after),
            "gram_method": "A^T B + upper triangle of A^T A (symmetric rank-k update from GEMMs, "
                           f"diagonal leaves {S.GRAM_LEAF} wide)" if solver == "normal" else "streamed QR",
            "gram_flops_fraction": S.gram_flops(1, d) / (4 * d * d) if solver == "normal" else None,
            "rss_baseline_mib": baseline, "peak_rss_mib": peak, "peak_above_baseline_mib": peak - baseline,
            "tables": report["tables"]}


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no MemAvailable")


def merged(name: str, results: dict) -> dict:
    """results with the runs of the existing results file (same shapes) that this invocation did not
    redo, in RUNS order: `--mode conversion` replaces the conversion run and keeps the others."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return results
    old = json.loads(path.read_text())
    if old.get("shapes") != json.loads(json.dumps(results["shapes"])):  # (JSON keys are strings)
        return results
    redone = {(r["mode"], r["solver"]) for r in results["runs"]}
    runs = [r for r in old.get("runs", []) if (r["mode"], r["solver"]) not in redone] + results["runs"]
    order = {run: i for i, run in enumerate(RUNS)}
    runs.sort(key=lambda r: order.get((r["mode"], r["solver"]), len(order)))
    return dict(results, runs=runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="scale the vocabularies (quick runs: 0.25)")
    parser.add_argument("--work-dir", default="/tmp/lep-bench-propagate")
    parser.add_argument("--runs", default=",".join(f"{m}:{s}" for m, s in RUNS), help="mode:solver,...")
    parser.add_argument("--mode", help="run these modes only (comma-separated), normal solver: --mode conversion "
                        "is --runs conversion:normal; the results file keeps its other runs")
    parser.add_argument("--no-write", action="store_true", help="print only, leave benchmarks/results alone")
    parser.add_argument("--keep-inputs", action="store_true", help="reuse the work dir's models if there, keep them")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "SOLVER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work_dir)
    if args.worker:
        print(json.dumps(worker(work, *args.worker)))
        return
    runs = [tuple(run.split(":")) for run in args.runs.split(",")]
    if args.mode:
        runs = [(mode, "normal") for mode in args.mode.split(",")]
    old, new, d = int(OLD_VOCAB * args.scale), int(NEW_VOCAB * args.scale), DIM
    result_name = "propagate" if args.scale == 1 else f"propagate_scale{args.scale:g}"
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
        for mode, solver in runs:
            run = f"{mode}:{solver}"
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
                # against the higher (quieter) of the rates right before and right after the fit
                r["fit_over_floor"] = r["fit_s"] / r["fit_floor_s"]
                for when in ("before", "after"):
                    r[f"fit_over_floor_at_rate_{when}_fit"] = r["fit_s"] * r[f"float64_gflops_{when}_fit"] * 1e9 \
                        / (4 * fit_rows * d * d)
                r["floor_fraction_achieved"] = r["fit_floor_s"] / r["fit_s"]
                r["total_over_floor"] = r["total_s"] / (r["fit_floor_s"] + r["output_floor_s"])
            r["peak_above_baseline_fp32_tables"] = r["peak_above_baseline_mib"] / table_mib
            r["peak_above_baseline_old_vocab_fp32_tables"] = r["peak_above_baseline_mib"] / old_table_mib
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
            if not args.no_write:  # after every run: the slow ones may be cut short
                write_result(result_name, merged(result_name, results))
    finally:
        if not args.keep_inputs:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
