"""Stop at step 3, resume: the losses of steps 4-6 equal an uninterrupted run's, bit for bit, with
megatron's distributed optimizer on 2 data-parallel ranks (gloo), and each rank's random
generators continue where the uninterrupted run's are. Needs the optimizer load-path fixes of
lep_megatron.compat.optimizer_resume; a half-written save is ignored."""
import json
from pathlib import Path

import pytest

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.common.launch import torchrun
from lep_megatron.models.tiny import make_hf_model

pytestmark = pytest.mark.megatron


def test_resume_is_exact(tmp_path):
    make_hf_model(tmp_path / "hf", "llama", vocab_size=131)
    run(ConvertConfig("hf-to-mcore", tmp_path / "hf", tmp_path / "mc"))
    torchrun(2, [Path(__file__).with_name("resume_worker.py"), tmp_path / "mc", tmp_path / "runs"])
    result = json.loads((tmp_path / "runs" / "result.json").read_text())
    assert len(result["straight"]) == 6 and len(result["first"]) == 3 and len(result["rest"]) == 3
    assert result["first"] + result["rest"] == result["straight"]
    # python, numpy and torch draws after the run, per rank; the ranks' generators differ
    assert result["resumed_rng"] == result["straight_rng"]
    assert result["straight_rng"][0] != result["straight_rng"][1]
    checkpoints = tmp_path / "runs" / "resumed" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000006"
    assert (checkpoints / "step_0000003" / "lep_model.json").is_file()
