"""The CLI end to end, and the Russian corpus builder's rules."""
import json
import subprocess
import sys

from lep_megatron.data.debian_corpus import clean_line, is_heldout


def test_cli_report_and_error(corpus_dir, originals_cache, tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "lep_megatron", "tokenizer", "report", "tokenizer=[mistral-7b]",
           f"corpus={corpus_dir / 'heldout.txt'}", f"out={out}", f"cache_dir={originals_cache}", "max_lines=500"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "mistral-7b" in proc.stdout and "chars/tok" in proc.stdout
    report = json.loads(out.read_text())["mistral-7b"]
    assert report["lines"] == 500 and report["roundtrip_ok"] and report["vocab_size"] == 32000
    proc = subprocess.run([sys.executable, "-m", "lep_megatron", "tokenizer", "train", f"out_dir={tmp_path / 't'}"], capture_output=True, text=True)
    assert proc.returncode == 2 and "tokenizer train needs corpus=..." in proc.stderr


def test_corpus_rules_and_split(corpus_dir):
    assert clean_line("  Это   строка\tна русском языке, достаточно длинная ") == "Это строка на русском языке, достаточно длинная"
    assert clean_line("This line is English prose only, not Russian") is None
    assert clean_line("коротко") is None
    assert clean_line("This line is English prose only, not Russian", "latin") == "This line is English prose only, not Russian"
    assert clean_line("Это строка на русском языке, достаточно длинная", "latin") is None
    train = (corpus_dir / "train.txt").read_text(encoding="utf-8").splitlines()
    heldout = (corpus_dir / "heldout.txt").read_text(encoding="utf-8").splitlines()
    assert not set(train) & set(heldout) and len(set(train)) == len(train)
    assert all(is_heldout(line, 50) for line in heldout[:500]) and not any(is_heldout(line, 50) for line in train[:500])
    assert 0.03 < len(heldout) / (len(train) + len(heldout)) < 0.07
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert manifest["train_bytes"] > 10_000_000 and all(s["licence"] for s in manifest["sources"])
    assert "fortunes-ru" in (corpus_dir / "README.md").read_text()
