"""Hydra app of `lep-megatron pipeline` (conf/pipeline.yaml)."""
import glob
from pathlib import Path
from typing import Any, Dict

from omegaconf import OmegaConf

from lep_megatron.common.app import stage_app
from lep_megatron.common.config import flag
from lep_megatron.common.io import UserInputError
from lep_megatron.pipeline.report import write_report
from lep_megatron.pipeline.runner import plan, run_pipeline, write_record
from lep_megatron.pipeline.slurm import submit
from lep_megatron.pipeline.steps import lep_steps

ACTIONS = ("run", "slurm", "report", "step", "record")


def absolute_inputs(config: Dict[str, Any]) -> Dict[str, Any]:
    """Steps run inside the run directory: user paths become absolute (checked to exist)."""
    config = dict(config)
    for key in ("base", "instruct", "heldout"):
        if config.get(key):
            path = Path(config[key]).expanduser().absolute()
            if not path.exists():
                raise UserInputError(f"{key}={config[key]}: {path} does not exist")
            config[key] = str(path)
    files = config["corpus"].split(",") if isinstance(config["corpus"], str) else list(config["corpus"])
    resolved = []
    for pattern in files:
        pattern = str(Path(pattern.strip()).expanduser().absolute())
        if not glob.glob(pattern):
            raise UserInputError(f"corpus: {pattern} matches no file")
        resolved.append(pattern)
    config["corpus"] = ",".join(resolved)
    calibration = config.get("calibration") or {}
    for key in ("prompts", "copy_corpus"):
        if calibration.get(key):
            config["calibration"] = calibration = dict(calibration, **{key: [
                str(Path(p).expanduser().absolute()) for p in calibration[key]]})
    if config["eval"].get("data_dir"):
        config["eval"] = dict(config["eval"], data_dir=str(Path(config["eval"]["data_dir"]).expanduser().absolute()))
    return config


def run(config: Dict[str, Any], cli_overrides=()) -> None:
    config = dict(config, dry_run=flag(config.get("dry_run"), "dry_run"))
    if config["action"] not in ACTIONS:
        raise UserInputError(f"action={config['action']!r}: choose one of {', '.join(ACTIONS)}")
    run_dir = Path(config["run_dir"]).expanduser().absolute()
    if config["action"] == "report":
        print(write_report(run_dir))
        return
    config = absolute_inputs(config)
    steps = lep_steps(config)
    inputs = {k: config[k] for k in ("base", "instruct", "heldout")}
    if config["action"] == "slurm":
        jobs = submit(plan(steps, run_dir, config["force"]), run_dir, config["slurm"], cli_overrides,
                      config["dry_run"])
        print(f"{len(jobs)} jobs" + (" (dry run: nothing submitted)" if config["dry_run"] else ""))
        return
    if config["action"] in ("step", "record"):
        names = [s.name for s in steps]
        if config["step"] not in names:
            raise UserInputError(f"step={config['step']!r}: choose one of {names}")
        step = next(s for s in steps if s.name == config["step"])
        if config["action"] == "step":
            run_pipeline([step], run_dir, config, inputs, force=[step.name], check_order=False)
        else:  # the step ran outside the runner (the SLURM pretrain job): record it as finished
            if not (run_dir / step.output).exists():
                raise UserInputError(f"action=record step={step.name}: its output {run_dir / step.output} "
                                     "does not exist; run the step first")
            write_record(step, run_dir, "ran as a SLURM job", None)
        return
    run_pipeline(steps, run_dir, config, inputs, force=config["force"], dry_run=config["dry_run"])
    if not config["dry_run"]:
        table = write_report(run_dir)
        print(f"\n{table}\n\nreport: {run_dir / 'report.md'}")


@stage_app("pipeline")
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    run(OmegaConf.to_container(cfg, resolve=True), list(HydraConfig.get().overrides.task))
