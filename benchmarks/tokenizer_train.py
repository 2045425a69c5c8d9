"""Tokenizer training throughput and peak memory: SP-BPE, SP-Unigram, HF-BPE at 32k vocab.

Each run is a fresh process (peak RSS = ru_maxrss of that child) on the Russian demo corpus
(data/corpus/train.txt, built with `python -m lep_megatron.data.debian_corpus`).

    flock /tmp/lep-bench.lock .venv/bin/python benchmarks/tokenizer_train.py
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

RUNS = {
    "sp-bpe": dict(backend="sentencepiece", model_type="bpe"),
    "sp-unigram": dict(backend="sentencepiece", model_type="unigram"),
    "hf-bpe": dict(backend="hf", model_type="bpe", family="llama3"),
}


def child(name: str, corpus: str, vocab_size: int) -> None:
    from lep_megatron.tokenizer.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(TrainConfig(corpus=[corpus], out_dir=f"{tmp}/tok", vocab_size=vocab_size, **RUNS[name]))
        seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default="data/corpus/train.txt")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--name", default="tokenizer_train", help="result name: benchmarks/results/NAME.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.corpus, args.vocab_size)
    mb = os.path.getsize(args.corpus) / 1e6
    load_at_start = os.getloadavg()
    results = {}
    for name in RUNS:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--corpus", args.corpus, "--vocab-size", str(args.vocab_size)],
                              capture_output=True, text=True, check=True)
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        run["mb_per_s"] = mb / run["seconds"]
        results[name] = run
        print(f"{name:<11} {run['seconds']:7.1f} s {run['mb_per_s']:6.2f} MB/s  peak RSS {run['peak_rss_mb']:7.0f} MB", flush=True)
    import sentencepiece
    import tokenizers

    write_result(args.name, {
        "corpus": args.corpus, "corpus_mb": mb, "vocab_size": args.vocab_size, "results": results,
        "libraries": {"sentencepiece": sentencepiece.__version__, "tokenizers": tokenizers.__version__},
        "run": {"load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
                "note": "shared 2-core developer machine; other jobs may have run concurrently"},
    })


if __name__ == "__main__":
    main()
