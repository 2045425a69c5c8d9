"""Bad input: a clear error naming the file/key and the fix, and nothing left in out_dir."""
import json
import os
import subprocess
import sys

import pytest

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.common.io import UserInputError
from lep_megatron.models.tiny import make_hf_model, save_word_tokenizer

pytestmark = pytest.mark.megatron


@pytest.fixture
def hf_dir(tmp_path):
    make_hf_model(tmp_path / "hf", "llama", vocab_size=131, max_shard_size="200KB")
    return tmp_path / "hf"


def edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def assert_fails(cfg: ConvertConfig, *fragments):
    with pytest.raises(UserInputError) as err:
        run(cfg)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    out = cfg.out_dir
    assert not os.path.exists(out) or not os.listdir(out), "out_dir must stay empty"
    leftovers = [p for p in os.listdir(os.path.dirname(out)) if ".partial" in p or ".tmp-" in p]
    assert not leftovers, leftovers


def test_config_and_weights_disagree(hf_dir, tmp_path):
    edit_config(hf_dir, hidden_size=96)  # weights are 64 wide
    assert_fails(ConvertConfig("hf-to-mcore", hf_dir, tmp_path / "out"), "config and weights disagree")


def test_vocab_in_config_disagrees_with_embedding(hf_dir, tmp_path):
    edit_config(hf_dir, vocab_size=140)
    assert_fails(ConvertConfig("hf-to-mcore", hf_dir, tmp_path / "out"), "model.embed_tokens.weight", "vocab_size=140")


def test_unsupported_architecture(hf_dir, tmp_path):
    edit_config(hf_dir, model_type="gpt2")
    assert_fails(ConvertConfig("hf-to-mcore", hf_dir, tmp_path / "out"), "config.json", "model_type='gpt2'")


@pytest.mark.parametrize("tp,what", [(3, "num_attention_heads=4"), (4, "num_key_value_heads=2")])
def test_tp_not_dividing_heads_or_groups(hf_dir, tmp_path, tp, what):
    assert_fails(ConvertConfig("hf-to-mcore", hf_dir, tmp_path / "out", tp=tp), f"parallel.tp={tp}", what)


def test_pp_not_dividing_layers(hf_dir, tmp_path):
    assert_fails(ConvertConfig("hf-to-mcore", hf_dir, tmp_path / "out", pp=3), "parallel.pp=3", "num_hidden_layers=4")


def test_tokenizer_larger_than_embedding(hf_dir, tmp_path):
    save_word_tokenizer(hf_dir, 140)
    assert_fails(ConvertConfig("hf-to-mcore", hf_dir, tmp_path / "out"), "140 tokens", "131 rows")


def test_missing_shard(hf_dir, tmp_path):
    shard = sorted(hf_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_fails(ConvertConfig("hf-to-mcore", hf_dir, tmp_path / "out"), str(shard), "missing")


def test_truncated_shard(hf_dir, tmp_path):
    shard = sorted(hf_dir.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_fails(ConvertConfig("hf-to-mcore", hf_dir, tmp_path / "out"), str(shard))


def test_out_dir_not_empty_without_overwrite(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UserInputError, match="overwrite=true"):
        run(ConvertConfig("hf-to-mcore", hf_dir, out))
    assert os.listdir(out) == ["keep.txt"]
    run(ConvertConfig("hf-to-mcore", hf_dir, out, overwrite=True))
    assert (out / "lep_model.json").is_file() and not (out / "keep.txt").exists()


def test_not_a_megatron_checkpoint(hf_dir, tmp_path):
    assert_fails(ConvertConfig("mcore-to-hf", hf_dir, tmp_path / "out"), "lep_model.json", "hf-to-mcore")


def test_cli_reports_error_and_exit_code(hf_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lep_megatron", "convert", "hf-to-mcore", f"in_dir={hf_dir}",
         f"out_dir={tmp_path / 'out'}", "parallel.tp=3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "lep-megatron convert: error: parallel.tp=3 does not divide" in proc.stderr
    assert not (tmp_path / "out").exists()
