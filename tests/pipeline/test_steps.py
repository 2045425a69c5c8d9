"""Pipeline bookkeeping: hydra overrides that survive the grammar, which steps rerun, the manifest."""
import json

import pytest
from hydra import compose, initialize_config_module

from lep_megatron.common.io import UserInputError
from lep_megatron.pipeline.runner import STATE_DIR, input_hash, plan, step_hash
from lep_megatron.pipeline.steps import Step, check_unique, override


@pytest.mark.parametrize("value", ["runs/a b/x.txt", "it's", "1e-3", "null", "true", "a,b", "Москва/корпус.txt",
                                   "plain/path.txt", "/abs/x-1+2", 0.003, 7, True, None, ["a", "b c", "1"]])
def test_override_values_survive_hydra(value):
    with initialize_config_module("lep_megatron.conf", version_base=None):
        cfg = compose(config_name="eval", overrides=[override("model", value), "data_dir=d", "out=o"])
    assert cfg.model == value or list(cfg.model) == value


def steps():
    return [Step("a", "tokenizer", ["x=1"], output="a"),
            Step("b", "init", ["y=2"], output="b", after=["a"]),
            Step("c", "pretrain", ["z=3"], output="c", after=["b"], resumable=True),
            Step("d", "eval", ["w=4"], output="d")]


def finish(run_dir, step):
    (run_dir / STATE_DIR).mkdir(exist_ok=True)
    (run_dir / STATE_DIR / f"{step.name}.json").write_text(json.dumps({"hash": step_hash(step)}))


def reasons(run_dir, s, force=()):
    return {step.name: reason for step, reason in plan(s, run_dir, force)}


def test_plan_skips_finished_resumes_and_reruns_dependents(tmp_path):
    s = steps()
    assert set(reasons(tmp_path, s).values()) == {"not run yet"}
    for step in s:
        finish(tmp_path, step)
    assert reasons(tmp_path, s) == dict.fromkeys("abcd")
    # forcing b redoes b and what reads it (c), not a or the independent d
    assert reasons(tmp_path, s, ["b"]) == {"a": None, "b": "forced", "c": "b reran", "d": None}
    # a changed command reruns that step and its dependents
    s[0].overrides = ["x=2"]
    assert reasons(tmp_path, s) == {"a": "its command changed", "b": "a reran", "c": "b reran", "d": None}
    # an unfinished resumable step with output on disk resumes
    s[0].overrides = ["x=1"]
    (tmp_path / STATE_DIR / "c.json").unlink()
    (tmp_path / "c").mkdir()
    assert reasons(tmp_path, s)["c"] == "resuming"


def test_plan_rejects_bad_steps(tmp_path):
    with pytest.raises(UserInputError, match="force=\\['nope'\\]: no such step"):
        plan(steps(), tmp_path, ["nope"])
    with pytest.raises(ValueError, match="repeated"):
        check_unique(steps() + [Step("a", "eval", [], output="z")])
    with pytest.raises(ValueError, match="reads \\['z'\\]"):
        check_unique([Step("a", "eval", [], output="a", after=["z"])])


def test_input_hash_sees_content_and_size(tmp_path):
    (tmp_path / "m").mkdir()
    big = tmp_path / "m" / "w.bin"
    big.write_bytes(bytes(3 << 20))
    first = input_hash(tmp_path / "m")
    assert first["files"] == 1 and first["bytes"] == 3 << 20
    data = bytearray(3 << 20)
    data[-1] = 1  # the last MiB is sampled
    big.write_bytes(bytes(data))
    assert input_hash(tmp_path / "m")["sha256_sampled"] != first["sha256_sampled"]


def test_calibration_steps_follow_the_chosen_lep_model_and_compose():
    from lep_megatron.pipeline.steps import lep_steps

    with initialize_config_module("lep_megatron.conf", version_base=None):
        cfg = compose(config_name="pipeline", overrides=[
            "run_dir=r", "base=b", "instruct=i", "corpus=ru.txt", "heldout=h.txt", "propagate.modes=[swap,conversion]",
            "calibration.mode=conversion", "+calibration.train.lr=1e-3"])
        from omegaconf import OmegaConf
        config = OmegaConf.to_container(cfg, resolve=True)
        steps = {s.name: s for s in lep_steps(config)}
        assert steps["calibrate_data"].after == [] and "copy.corpus=[ru.txt]" in steps["calibrate_data"].overrides
        assert steps["calibration_data"].after == ["calibrate_data", "propagate_conversion"]
        assert "tokenizer=lep_conversion" in steps["calibration_data"].overrides
        assert steps["calibrate"].after == ["calibration_data", "calibration_convert"] and steps["calibrate"].resumable
        assert "finetune=calibration" in steps["calibrate"].overrides and "train.lr=0.001" in steps["calibrate"].overrides
        assert steps["eval_lep_conversion_calibrated"].after == ["calibration_export"]
        check_unique(list(steps.values()))
        for name in ("calibrate_data", "calibration_data", "calibration_convert", "calibrate", "calibration_export"):
            step = steps[name]
            compose(config_name=step.stage, overrides=step.overrides)  # every key exists in the stage's config
        with pytest.raises(UserInputError, match="calibration.mode=overlap: not among propagate.modes"):
            lep_steps(dict(config, calibration=dict(config["calibration"], mode="overlap")))
