"""A Megatron checkpoint as the donor: propagate reads its embedding and head from the dist
checkpoint (vocabulary padded for TP2, padding dropped) and writes what it writes from the same
donor exported to HF."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.checkpoint.megatron_io import CheckpointMeta
from lep_megatron.common.io import UserInputError
from lep_megatron.propagation import PropagateConfig, propagate
from tests.propagation.conftest import read_tensors

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def donors(lep, tmp_path_factory):
    d = tmp_path_factory.mktemp("megatron_donor")
    run(ConvertConfig("hf-to-mcore", str(lep["donor"]), str(d / "mc"), tp=2))
    run(ConvertConfig("mcore-to-hf", str(d / "mc"), str(d / "export")))
    return d / "mc", d / "export"


def outputs_equal(a, b) -> None:
    ta, tb = read_tensors(a), read_tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    for side in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert (a / side).read_text() == (b / side).read_text(), side
    ra, rb = (json.loads((d / "propagation_report.json").read_text()) for d in (a, b))
    assert ra["tables"] == rb["tables"] and ra["vocab_size"] == rb["vocab_size"] == ra["donor_rows"] + 2


@pytest.mark.parametrize("mode", ["conversion", "swap"])
def test_megatron_donor_equals_its_hf_export(lep, donors, tmp_path, mode):
    mc, export = donors
    meta = CheckpointMeta.read(mc)
    # stored with padding rows (a multiple of 128 x TP2) that must not reach the output
    assert meta.padded_vocab_size % 256 == 0 and meta.padded_vocab_size > meta.vocab_size
    token_map = str(lep["donor"] / "token_map.safetensors")  # neither checkpoint carries init's map
    outs = []
    for donor in (mc, export):
        out = tmp_path / donor.name
        propagate(PropagateConfig(base=str(lep["base"]), instruct=str(lep["instruct"]), donor=str(donor),
                                  out_dir=str(out), mode=mode, token_map=token_map))
        outs.append(out)
    outputs_equal(*outs)
    assert read_tensors(outs[0])["model.embed_tokens.weight"].shape[0] == meta.vocab_size + 2


def test_megatron_donor_from_the_cli_builds_its_token_map(lep, donors, tmp_path):
    """A fresh process (no process group) and no token map: T is built from the checkpoint's hf/ tokenizer."""
    mc, export = donors
    for donor in (mc, export):
        proc = subprocess.run(
            [sys.executable, "-m", "lep_megatron", "propagate", f"base={lep['base']}", f"instruct={lep['instruct']}",
             f"donor={donor}", f"out_dir={tmp_path / donor.name}"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    outputs_equal(tmp_path / mc.name, tmp_path / export.name)


def test_megatron_inputs_rejected(lep, donors, tmp_path):
    mc, _ = donors
    out = tmp_path / "out"
    for key in ("base", "instruct"):
        cfg = dict(base=str(lep["base"]), instruct=str(lep["instruct"]), donor=str(lep["donor"]), out_dir=str(out))
        with pytest.raises(UserInputError, match=rf"{key}=.* is a Megatron checkpoint; only the donor"):
            propagate(PropagateConfig(**dict(cfg, **{key: str(mc)})))
        assert not out.exists()
    no_tok = tmp_path / "no_tok"
    shutil.copytree(mc, no_tok)
    (no_tok / "hf" / "tokenizer.json").unlink()
    with pytest.raises(UserInputError, match=r"donor=.*no_tok: no hf/tokenizer.json"):
        propagate(PropagateConfig(base=str(lep["base"]), instruct=str(lep["instruct"]), donor=str(no_tok),
                                  out_dir=str(out)))
    assert not out.exists()
