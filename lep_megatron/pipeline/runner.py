"""Run pipeline steps in a run directory: skip finished ones, resume killed ones, redo forced ones.

state/<step>.json records a finished step (its command and a hash of it); a step reruns when it
has no record, when its command changed, when it is forced, or when a step it reads from reran.
Single-rank steps run in this process (the stage's hydra config composed from conf/, the same
code path as the command line, without re-importing torch for every stage); multi-rank steps
run under torchrun. manifest.json holds the resolved config, input hashes, package versions,
the git revision and every step's timing.
"""
import contextlib
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from lep_megatron.cli import STAGES
from lep_megatron.common.io import UserInputError
from lep_megatron.pipeline.steps import Step, check_unique

STATE_DIR = "state"
MANIFEST = "manifest.json"
PACKAGES = ("lep-megatron", "torch", "megatron-core", "transformers", "tokenizers", "safetensors", "hydra-core")


def step_hash(step: Step) -> str:
    return hashlib.sha256(json.dumps([step.stage, step.overrides, step.ranks]).encode()).hexdigest()[:16]


def plan(steps: Sequence[Step], run_dir: Path, force: Iterable[str] = (), check_order: bool = True) -> List[tuple]:
    """[(step, reason to run it or None to skip)] in order."""
    if check_order:
        check_unique(steps)
    force = set(force)
    unknown = force - {s.name for s in steps}
    if unknown:
        raise UserInputError(f"force={sorted(unknown)}: no such step; steps are {[s.name for s in steps]}")
    rerun, out = set(), []
    for step in steps:
        record = run_dir / STATE_DIR / f"{step.name}.json"
        reason = None
        if step.name in force:
            reason = "forced"
        elif not record.is_file():
            reason = "resuming" if step.resumable and (run_dir / step.output).exists() else "not run yet"
        elif json.loads(record.read_text())["hash"] != step_hash(step):
            reason = "its command changed"
        elif any(a in rerun for a in step.after):
            reason = f"{', '.join(a for a in step.after if a in rerun)} reran"
        if reason:
            rerun.add(step.name)
        out.append((step, reason))
    return out


@contextlib.contextmanager
def working_dir(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_in_process(step: Step) -> None:
    """The stage's hydra app body on its composed config (cwd: the run directory)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    app = importlib.import_module(STAGES[step.stage]).main
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name=step.stage, overrides=step.overrides)
    else:
        with initialize_config_module("lep_megatron.conf", version_base=None):
            cfg = compose(config_name=step.stage, overrides=step.overrides)
    try:
        app.run(cfg)
    finally:
        # a stage that made a process group (pretrain, convert) leaves none behind for the next one
        if "megatron.core" in sys.modules:
            from lep_megatron.parallel import shutdown
            shutdown()


def run_step(step: Step, run_dir: Path) -> None:
    if step.ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(step.ranks),
               "-m", "lep_megatron"] + step.argv()
        returncode = subprocess.run(cmd, cwd=run_dir).returncode  # output streams to the console
        if returncode:
            raise RuntimeError(f"step {step.name} failed with exit code {returncode}: {' '.join(cmd)}")
    else:
        with working_dir(run_dir):
            run_in_process(step)


def git_revision() -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def package_versions() -> Dict[str, Optional[str]]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def input_hash(path: Path, sample: int = 1 << 20) -> Dict[str, Any]:
    """Identity of an input file or directory without reading multi-GB weights whole: sha256 of
    each file's size + first and last MiB (small files are hashed whole)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    total = 0
    for f in files:
        size = f.stat().st_size
        total += size
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(sample))
            if size > 2 * sample:
                fh.seek(-sample, os.SEEK_END)
                digest.update(fh.read(sample))
    return {"path": str(path), "files": len(files), "bytes": total, "sha256_sampled": digest.hexdigest()}


def write_manifest(run_dir: Path, config: Dict[str, Any], inputs: Dict[str, Path], steps: List[Dict]) -> None:
    manifest_path = run_dir / MANIFEST
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest = {
        "created": previous.get("created", datetime.now(timezone.utc).isoformat(timespec="seconds")),
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(), "python": sys.version.split()[0], "packages": package_versions(),
        "config": config,
        "inputs": {k: input_hash(v) for k, v in inputs.items() if v and Path(v).exists()},
        "steps": {**previous.get("steps", {}), **{s["name"]: s for s in steps}},
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    os.replace(tmp, manifest_path)


def write_record(step: Step, run_dir: Path, reason: str, started: Optional[float]) -> Dict:
    """state/<step>.json: the step finished (`started`: None when it ran elsewhere, unclocked)."""
    record = {"name": step.name, "command": step.command(), "hash": step_hash(step), "reason": reason,
              "started": None if started is None
              else datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
              "wall_s": None if started is None else round(time.time() - started, 2)}
    path = run_dir / STATE_DIR / f"{step.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return record


def run_pipeline(steps: Sequence[Step], run_dir: Path, config: Dict[str, Any], inputs: Dict[str, Path],
                 force: Iterable[str] = (), dry_run: bool = False, check_order: bool = True) -> List[Dict]:
    """Run what needs running, in order; returns the records of this invocation's steps.
    check_order=False runs a subset whose inputs other jobs made (a SLURM step job)."""
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STATE_DIR).mkdir(exist_ok=True)
    schedule = plan(steps, run_dir, force, check_order)
    records = []
    write_manifest(run_dir, config, inputs, records)
    for i, (step, reason) in enumerate(schedule, 1):
        head = f"[{i}/{len(schedule)}] {step.name}"
        if reason is None:
            print(f"{head}: done earlier, skipped", flush=True)
            continue
        print(f"{head}: {reason} -> {step.command()}" + (f"  ({step.ranks} ranks)" if step.ranks > 1 else ""),
              flush=True)
        if dry_run:
            continue
        record_path = run_dir / STATE_DIR / f"{step.name}.json"
        record_path.unlink(missing_ok=True)
        output = run_dir / step.output
        if reason != "resuming" and step.resumable and output.exists():
            shutil.rmtree(output)  # a forced or changed pretrain starts over, not from old checkpoints
        started = time.time()
        try:
            run_step(step, run_dir)
        except UserInputError as err:
            raise UserInputError(f"step {step.name} ({step.command()}): {err}") from err
        record = write_record(step, run_dir, reason, started)
        records.append(record)
        write_manifest(run_dir, config, inputs, records)
        print(f"{head}: finished in {record['wall_s']:.1f} s", flush=True)
    return records
