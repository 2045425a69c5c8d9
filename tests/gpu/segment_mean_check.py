"""GPU check of the segment-mean CUDA kernel: correctness on random data against float64, and
achieved bandwidth at Llama-3 shapes (128,256 x 4096 -> 174,816 rows, both tables) next to a
device-to-device copy of the same number of bytes, in bfloat16 and float32.

Uses lep_megatron._C when it was built with CUDA (tests/gpu/run_all.sh builds it), else builds
the csrc/ sources with torch.utils.cpp_extension.load. Writes JSON to the path given as the
first argument, else $OUT/segment_mean_check.json (OUT defaults to ./gpu_results).
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout, installed or not


def load_ops():
    from lep_megatron import ops

    if ops.extension_available("cuda"):
        return ops, "lep_megatron._C"
    if hasattr(torch.ops.lep_megatron, "segment_mean"):
        sys.exit("lep_megatron._C is loaded but was built without CUDA: rebuild it, or remove it")
    from torch.utils.cpp_extension import load

    started = time.perf_counter()
    load(
        name="lep_megatron_segment_mean",
        sources=[str(p) for p in sorted((ROOT / "csrc").glob("*.cpp")) + sorted((ROOT / "csrc" / "cuda").glob("*.cu"))],
        extra_cflags=["-O3", "-fopenmp"],
        extra_cuda_cflags=["-O3", "--use_fast_math"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )
    from lep_megatron.ops.segment_mean import register_fake_implementations

    register_fake_implementations()
    return ops, f"torch.utils.cpp_extension.load ({time.perf_counter() - started:.0f} s)"


def random_csr(new_rows, old_rows, max_len, g):
    lengths = torch.randint(0, max_len + 1, (new_rows,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.randint(0, old_rows, (int(offsets[-1]),), generator=g)
    return offsets, indices, torch.rand(indices.numel(), generator=g) + 0.05


def correctness(ops):
    g = torch.Generator().manual_seed(0)
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}
    results = {}
    for dtype in tolerance:
        for dim in (4096, 200, 13):
            offsets, indices, weights = random_csr(2000, 3000, 40, g)
            tables = [torch.randn(3000, dim, generator=g).to(dtype) for _ in range(2)]
            want = ops.segment_mean_reference(tables[0].double(), tables[1].double(), offsets, indices, weights)
            got = ops.segment_mean(*(t.cuda() for t in (*tables, offsets, indices, weights)))
            err = max(((a.cpu().double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
            lo = 1000
            want_sum = ops.segment_sum_reference(tables[0][lo:].double(), tables[1][lo:].double(), offsets, indices, weights, lo)
            got_sum = ops.segment_sum(*(t.cuda() for t in (tables[0][lo:], tables[1][lo:], offsets, indices, weights)), lo)
            err_sum = max(((a.cpu().double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got_sum, want_sum))
            shared = ops.segment_mean(tables[0].cuda(), tables[1].cuda(), torch.arange(11).cuda(), torch.arange(10).cuda(), None)
            exact = bool(torch.equal(shared[0].cpu(), tables[0][:10]) and torch.equal(shared[1].cpu(), tables[1][:10]))
            ok = err <= tolerance[dtype] and err_sum <= 1e-6 and exact
            results[f"{str(dtype).split('.')[-1]}/dim{dim}"] = {
                "max_rel_error_mean": err, "max_rel_error_sum": err_sum, "single_entry_rows_exact": exact, "ok": ok,
            }
    return results


def time_cuda(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def bandwidth(ops):
    old_rows, new_rows, dim, shared = 128256, 174816, 4096, 128256
    g = torch.Generator().manual_seed(1)
    lengths = torch.cat([torch.ones(shared, dtype=torch.long), torch.randint(2, 5, (new_rows - shared,), generator=g)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.cat([torch.arange(shared), torch.randint(0, old_rows, (int(lengths[shared:].sum()),), generator=g)])
    weights = (1.0 / lengths.float()).repeat_interleave(lengths)
    offsets, indices, weights = offsets.cuda(), indices.cuda(), weights.cuda()
    results = {"old_rows": old_rows, "new_rows": new_rows, "dim": dim, "nnz": indices.numel()}
    for dtype in (torch.bfloat16, torch.float32):
        tables = [torch.randn(old_rows, dim, device="cuda", dtype=dtype) for _ in range(2)]
        size = tables[0].element_size()
        moved = 2 * (indices.numel() + new_rows) * dim * size  # rows read + rows written, both tables
        kernel_s = time_cuda(lambda: ops.segment_mean(*tables, offsets, indices, weights))
        wq = weights.to(dtype)
        bag_s = time_cuda(lambda: [F.embedding_bag(indices, t, offsets, mode="sum", per_sample_weights=wq, include_last_offset=True) for t in tables])
        src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_s = time_cuda(lambda: dst.copy_(src))
        del src, dst, tables
        torch.cuda.empty_cache()
        results[str(dtype).split(".")[-1]] = {
            "bytes_moved": moved,
            "segment_mean_ms": kernel_s * 1e3,
            "segment_mean_GBps": moved / kernel_s / 1e9,
            "embedding_bag_ms": bag_s * 1e3,
            "copy_same_bytes_ms": copy_s * 1e3,
            "copy_GBps": moved / copy_s / 1e9,
            "fraction_of_copy": copy_s / kernel_s,
        }
    return results


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("OUT", "gpu_results")) / "segment_mean_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        sys.exit("segment_mean_check: no CUDA GPU")
    ops, source = load_ops()
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "extension": source,
        "correctness": correctness(ops),
        "bandwidth": bandwidth(ops),
    }
    report["ok"] = all(c["ok"] for c in report["correctness"].values())
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
