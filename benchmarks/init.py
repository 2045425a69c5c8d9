"""Benchmark of the averaging initialization at Llama-3 shapes, three ways side by side.

Original vocabulary: the real Llama-3 tokenizer (tiktoken ranks from the llama-models package,
128,000 BPE tokens + 256 specials = 128,256 rows), converted to a Hugging Face fast tokenizer.
New vocabulary, "Extended" as in the paper: the 128,256 original tokens, then pieces of a
byte-level BPE trained on the project's Russian corpus that Llama-3 lacks, up to 174,816 rows
(46,560 new tokens). Tables: random [128,256, 4096] input embedding and LM head.

Methods, each timed on decomposition (text of every new token -> original ids) + averaging of
both tables, each in a fresh process for its peak RSS:
  loop           what the paper's reference code does: per token, tokenizer.encode, then the
                 mean of the rows of both tables (float32), stored in the table dtype;
  embedding_bag  encode_batch -> CSR, torch.nn.functional.embedding_bag(mode="sum") with
                 per-row weights 1/K in the table dtype (bfloat16 weights for bfloat16 tables);
  segment_mean   encode_batch -> CSR, lep_megatron.ops.segment_mean (the C++ kernel).
Bandwidth of the averaging step = (rows read + rows written, both tables) / time, next to a
tensor copy (clone) of 1 GiB measured in the same process.

    python benchmarks/init.py [--llama3-tiktoken PATH] [--corpus data/corpus/train.txt]

The tiktoken file: `pip download --no-deps llama-models==0.3.0` and unzip
llama_models/llama3/tokenizer.model from the wheel (or have llama-models installed).
Writes benchmarks/results/init_<host>.json.
"""
import argparse
import base64
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
OLD_VOCAB, NEW_VOCAB, DIM = 128256, 174816, 4096
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_to_unicode():
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def llama3_tokenizer(tiktoken_path: Path):
    """Llama-3's tiktoken BPE as a tokenizers.Tokenizer (the layout of its tokenizer.json)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    to_char = byte_to_unicode()
    ranks = {}
    for line in tiktoken_path.read_text().splitlines():
        token, rank = line.split()
        ranks["".join(to_char[b] for b in base64.b64decode(token))] = int(rank)
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(merges)]
    tok = Tokenizer(models.BPE(vocab=ranks, merges=merges, ignore_merges=True, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(254)]
    tok.add_special_tokens(specials)
    return tok


def new_token_texts(tok, corpus: Path):
    """Texts of the Extended vocabulary's tokens: the original ones, then new Russian pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    texts = [tok.decode([i], skip_special_tokens=False) for i in range(OLD_VOCAB)]
    russian = Tokenizer(models.BPE())
    russian.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    russian.decoder = decoders.ByteLevel()
    russian.train([str(corpus)], trainers.BpeTrainer(vocab_size=64000, show_progress=False))
    known = set(tok.get_vocab())
    pieces = sorted(russian.get_vocab().items(), key=lambda kv: kv[1])
    # Pieces that are parts of a UTF-8 character decode to U+FFFD: not a text of their own.
    new = [text for piece, i in pieces if piece not in known for text in [russian.decode([i])] if "\ufffd" not in text]
    if len(new) < NEW_VOCAB - OLD_VOCAB:
        raise SystemExit(f"only {len(new)} new pieces from {corpus}; need {NEW_VOCAB - OLD_VOCAB}")
    return texts + new[: NEW_VOCAB - OLD_VOCAB]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(method: str, dtype_name: str, texts_path: Path, tiktoken_path: Path) -> dict:
    """One measurement, in this (fresh) process."""
    from lep_megatron.ops import segment_mean

    dtype = getattr(torch, dtype_name)
    tok = llama3_tokenizer(tiktoken_path)
    texts = json.loads(texts_path.read_text())
    g = torch.Generator().manual_seed(0)
    old_in, old_out = (torch.randn(OLD_VOCAB, DIM, generator=g).to(dtype) for _ in range(2))
    rss_before = peak_rss_mib()
    result = {}
    started = time.perf_counter()
    if method == "loop":
        new_in = torch.empty(NEW_VOCAB, DIM, dtype=dtype)
        new_out = torch.empty(NEW_VOCAB, DIM, dtype=dtype)
        for t, text in enumerate(texts):
            ids = tok.encode(text, add_special_tokens=False).ids
            new_in[t] = old_in[ids].float().mean(0).to(dtype)
            new_out[t] = old_out[ids].float().mean(0).to(dtype)
        result["total_s"] = time.perf_counter() - started
        nnz = None
    else:
        encodings = tok.encode_batch(texts, add_special_tokens=False)
        lengths = torch.tensor([len(e.ids) for e in encodings])
        indices = torch.tensor([i for e in encodings for i in e.ids])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        weights = (1.0 / lengths.clamp_min(1).float()).repeat_interleave(lengths)
        decomposed = time.perf_counter()
        if method == "embedding_bag":
            w = weights.to(dtype)
            average = lambda: [  # noqa: E731
                F.embedding_bag(indices, t, offsets, mode="sum", per_sample_weights=w, include_last_offset=True) for t in (old_in, old_out)
            ]
        else:
            average = lambda: segment_mean(old_in, old_out, offsets, indices, weights)  # noqa: E731
        new_in, new_out = average()
        averaged = time.perf_counter()
        result.update(decomposition_s=decomposed - started, averaging_s=averaged - decomposed, total_s=averaged - started)
        del new_in, new_out
        repeats = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = average()
            repeats.append(time.perf_counter() - t0)
            del out
        nnz = indices.numel()
        moved = 2 * (nnz + NEW_VOCAB) * DIM * old_in.element_size()
        big = torch.randn(2**30 // old_in.element_size() // DIM, DIM, generator=g).to(dtype)
        copies = []
        for _ in range(3):
            t0 = time.perf_counter()
            c = big.clone()
            copies.append(time.perf_counter() - t0)
            del c
        copy_gbps = 2 * big.numel() * big.element_size() / min(copies) / 1e9
        result.update(
            averaging_repeats_s=repeats,
            averaging_GBps=moved / min(repeats) / 1e9,
            copy_GBps=copy_gbps,
            fraction_of_copy=moved / min(repeats) / 1e9 / copy_gbps,
            mean_length_new=float(lengths[OLD_VOCAB:].float().mean()),
            shared_tokens_one_piece=int((lengths[:OLD_VOCAB] == 1).sum()),
        )
    result.update(nnz=nnz, peak_rss_mib=peak_rss_mib(), rss_before_mib=rss_before)
    return result


def machine_info() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return {
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def find_tiktoken(path):
    if path:
        return Path(path)
    try:
        import llama_models

        return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    except ImportError:
        raise SystemExit("pass --llama3-tiktoken PATH (llama_models/llama3/tokenizer.model from the llama-models wheel)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama3-tiktoken")
    parser.add_argument("--corpus", default=str(ROOT / "data" / "corpus" / "train.txt"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"init_{socket.gethostname()}.json"))
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "DTYPE", "TEXTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiktoken_path = find_tiktoken(args.llama3_tiktoken)
    if args.worker:
        print(json.dumps(run_method(*args.worker[:2], Path(args.worker[2]), tiktoken_path)))
        return
    report = {"machine": machine_info(), "shapes": {"old_vocab": OLD_VOCAB, "new_vocab": NEW_VOCAB, "dim": DIM, "tables": 2}}
    started = time.perf_counter()
    tok = llama3_tokenizer(tiktoken_path)
    texts = new_token_texts(tok, Path(args.corpus))
    report["setup"] = {
        "tokenizer": f"Llama-3 tiktoken BPE ({tiktoken_path.name}) as a tokenizers BPE, 128,256 ids",
        "new_tokens": f"original 128,256 + first {NEW_VOCAB - OLD_VOCAB} pieces absent from Llama-3 of a 64k byte-level BPE trained on {Path(args.corpus).name}",
        "setup_s": time.perf_counter() - started,
        "notes": "2 shared cores: other jobs ran beside this one (load average in machine); each method in a fresh process",
    }
    texts_path = Path(args.out).with_suffix(".texts.json")
    texts_path.write_text(json.dumps(texts))
    results = {}
    try:
        for dtype in ("float32", "bfloat16"):
            for method in ("loop", "embedding_bag", "segment_mean"):
                cmd = [sys.executable, __file__, "--llama3-tiktoken", str(tiktoken_path), "--worker", method, dtype, str(texts_path)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results.setdefault(dtype, {})[method] = json.loads(out.strip().splitlines()[-1])
                print(dtype, method, results[dtype][method], flush=True)
            r = results[dtype]
            r["speedup_vs_loop"] = {m: r["loop"]["total_s"] / r[m]["total_s"] for m in ("embedding_bag", "segment_mean")}
            r["averaging_speedup_vs_embedding_bag"] = min(r["embedding_bag"]["averaging_repeats_s"]) / min(
                r["segment_mean"]["averaging_repeats_s"]
            )
    finally:
        texts_path.unlink()
    report["results"] = results
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["machine"]["THP_MEM_ALLOC_ENABLE"] = os.environ.get("THP_MEM_ALLOC_ENABLE")
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
