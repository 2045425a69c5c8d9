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
  embedding_bag  decompose() -> CSR, torch.nn.functional.embedding_bag(mode="sum") with
                 per-row weights 1/K in the table dtype (bfloat16 weights for bfloat16 tables);
  segment_mean   decompose() -> CSR, lep_megatron.ops.segment_mean (the C++ kernel).
decompose() is what `lep-megatron tokenizer map` does (token_map.build_token_map): a token
that spells exactly one original token is that token, without running the tokenizer; only the
others are encoded, in one batch. Each worker then checks, outside the timing, that the CSR is
identical to encoding every text (what the loop does).
Bandwidth of the averaging step = (rows read + rows written, both tables) / time, next to a
tensor copy of 1 GiB measured in the same process: clone() (into fresh memory, page faults
included, like the averaging's outputs) and copy_() into memory already written (plain bandwidth).

    python benchmarks/init.py [--llama3-tiktoken PATH] [--corpus data/corpus/train.txt] [--thp]

The tiktoken file: `pip download --no-deps llama-models==0.3.0` and unzip
llama_models/llama3/tokenizer.model from the wheel (or have llama-models installed).
Writes benchmarks/results/init_<host>.json (benchmarks/common.py's writer).

Transparent huge pages: torch asks for them (THP_MEM_ALLOC_ENABLE=1) only with --thp; the
workers run with the variable unset otherwise, whatever the caller's environment. On the 2-core
VM the results were measured on, fresh huge pages come from memory the guest has handed back
to the host (virtio-balloon free page reporting) and cost ~4 ms each to fault in, so the first
averaging pass (the one timed) took 2-3x longer with them; only repeats, on recycled huge
pages, got faster.
"""
import argparse
import base64
import itertools
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

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


# A text's UTF-8 bytes (read as latin-1 characters) -> its byte-level BPE piece.
TO_PIECE = str.maketrans({chr(b): c for b, c in byte_to_unicode().items() if chr(b) != c})


def decompose(tok, texts):
    """CSR (offsets, indices, lengths) of the original ids each text encodes to.

    A text whose byte-level piece is in the original vocabulary is that single token: with
    ignore_merges (Llama-3), a pre-token found in the vocabulary encodes to itself, and such a
    text is one pre-token. (The worker checks the whole CSR against encoding every text.) Only
    the rest, the genuinely new tokens, go through the tokenizer, in one batch; the CSR is put
    together with numpy, without a Python list per row.
    """
    vocab = tok.get_vocab(with_added_tokens=True)
    single = np.fromiter((vocab.get(t.encode().decode("latin-1").translate(TO_PIECE), -1) for t in texts), dtype=np.int64, count=len(texts))
    todo = np.flatnonzero(single < 0)
    encoded = [e.ids for e in tok.encode_batch([texts[i] for i in todo], add_special_tokens=False)]
    lengths = np.ones(len(texts), dtype=np.int64)
    lengths[todo] = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    indices = np.empty(int(offsets[-1]), dtype=np.int64)
    known = single >= 0
    indices[offsets[:-1][known]] = single[known]
    new_lengths = lengths[todo]
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(new_lengths.sum()))
    # position of each encoded id: its row's offset + its place in the row
    indices[np.repeat(offsets[todo] - (np.cumsum(new_lengths) - new_lengths), new_lengths) + np.arange(flat.size)] = flat
    return torch.from_numpy(offsets), torch.from_numpy(indices), torch.from_numpy(lengths)


def encode_every_text(tok, texts):
    """The CSR of encoding every text, as the loop does (the check of decompose)."""
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    lengths = torch.tensor([len(i) for i in ids])
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]), torch.tensor([i for row in ids for i in row])


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
        offsets, indices, lengths = decompose(tok, texts)
        weights = (1.0 / lengths.clamp_min(1).float()).repeat_interleave(lengths)
        decomposed = time.perf_counter()
        if method == "embedding_bag":
            w = weights.to(dtype)
            average = lambda: [  # noqa: E731
                F.embedding_bag(indices, t, offsets, mode="sum", per_sample_weights=w, include_last_offset=True) for t in (old_in, old_out)
            ]
        else:
            average = lambda: segment_mean(old_in, old_out, offsets, indices, weights)  # noqa: E731
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        new_in, new_out = average()
        averaged = time.perf_counter()
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        result.update(decomposition_s=decomposed - started, averaging_s=averaged - decomposed, total_s=averaged - started)
        # CPU seconds of the timed pass, all threads: system time is mostly the page faults of
        # the fresh outputs (on a VM, several times more when the memory was handed back to the
        # host since it was last used: then the first pass is slower than the repeats).
        result["averaging_cpu_s"] = {"user": cpu_after.ru_utime - cpu_before.ru_utime, "system": cpu_after.ru_stime - cpu_before.ru_stime}
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
        # clone() writes fresh memory, as the averaging does (page faults included); copy_ into
        # memory already written is the plain bandwidth, without page faults.
        dst = torch.empty_like(big).fill_(0)
        touched = []
        for _ in range(3):
            t0 = time.perf_counter()
            dst.copy_(big)
            touched.append(time.perf_counter() - t0)
        touched_gbps = 2 * big.numel() * big.element_size() / min(touched) / 1e9
        result.update(
            averaging_repeats_s=repeats,
            averaging_GBps=moved / min(repeats) / 1e9,
            copy_GBps=copy_gbps,
            fraction_of_copy=moved / min(repeats) / 1e9 / copy_gbps,
            copy_into_touched_memory_GBps=touched_gbps,
            fraction_of_copy_into_touched_memory=moved / min(repeats) / 1e9 / touched_gbps,
            mean_length_new=float(lengths[OLD_VOCAB:].float().mean()),
            shared_tokens_one_piece=int((lengths[:OLD_VOCAB] == 1).sum()),
        )
        expected = encode_every_text(tok, texts)
        if not (torch.equal(offsets, expected[0]) and torch.equal(indices, expected[1])):
            raise SystemExit("decompose() differs from encoding every text")
        result["decomposition_equals_encoding_every_text"] = True
    result.update(nnz=nnz, peak_rss_mib=peak_rss_mib(), rss_before_mib=rss_before)
    return result


def run_info(thp: bool) -> dict:
    """What the machine was doing: load, threads, huge pages (common.machine_info has the rest)."""
    thp_mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {
        "host": socket.gethostname(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "THP_MEM_ALLOC_ENABLE": "1" if thp else None,
        "transparent_hugepage": thp_mode.read_text().strip() if thp_mode.is_file() else None,
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
    parser.add_argument("--name", default=f"init_{socket.gethostname()}", help="result name: benchmarks/results/NAME.json")
    parser.add_argument("--thp", action="store_true", help="workers run with THP_MEM_ALLOC_ENABLE=1 (torch asks for huge pages)")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "DTYPE", "TEXTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiktoken_path = find_tiktoken(args.llama3_tiktoken)
    if args.worker:
        print(json.dumps(run_method(*args.worker[:2], Path(args.worker[2]), tiktoken_path)))
        return
    report = {"run": run_info(args.thp), "shapes": {"old_vocab": OLD_VOCAB, "new_vocab": NEW_VOCAB, "dim": DIM, "tables": 2}}
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if args.thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    started = time.perf_counter()
    tok = llama3_tokenizer(tiktoken_path)
    texts = new_token_texts(tok, Path(args.corpus))
    report["setup"] = {
        "tokenizer": f"Llama-3 tiktoken BPE ({tiktoken_path.name}) as a tokenizers BPE, 128,256 ids",
        "new_tokens": f"original 128,256 + first {NEW_VOCAB - OLD_VOCAB} pieces absent from Llama-3 of a 64k byte-level BPE trained on {Path(args.corpus).name}",
        "setup_s": time.perf_counter() - started,
        "notes": "2 shared cores: other jobs ran beside this one (load averages in run); each method in a fresh process",
    }
    texts_file = tempfile.NamedTemporaryFile("w", suffix=".texts.json", delete=False)
    texts_path = Path(texts_file.name)
    with texts_file:
        json.dump(texts, texts_file)
    results = {}
    try:
        for dtype in ("float32", "bfloat16"):
            for method in ("loop", "embedding_bag", "segment_mean"):
                cmd = [sys.executable, __file__, "--llama3-tiktoken", str(tiktoken_path), "--worker", method, dtype, str(texts_path)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
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
    report["run"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    write_result(args.name, report)


if __name__ == "__main__":
    main()
