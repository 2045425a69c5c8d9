"""Stands in for the trainer (`python -m lep_megatron pretrain`) in the tests of launch/pretrain.sh's
preemption protocol and of lep_megatron.common.agent: it keeps the trainer's side of the contract
without a model.

Each rank installs a SIGUSR1 handler, then writes OUT/ready-<attempt>-<rank> (its SIGUSR1
disposition before the handler, its pid), and waits. FAKE_MODE picks what happens next:
  train        attempt 0: on SIGUSR1, rank 0 writes the next checkpoint (OUT/checkpoints/latest),
               every rank exits 75; a later attempt (SLURM_RESTART_COUNT > 0) "resumes",
               writes the final checkpoint and exits 0
  no_progress  on SIGUSR1 exit 75 without a new checkpoint
  crash        rank 1 exits 3 at once, the others wait (for a signal or their end)
  exit:A,B     rank r exits with the r-th code at once (no waiting; 'sleep' waits forever)
Events go to OUT/events, one line each.
"""
import os
import signal
import sys
import time
from pathlib import Path

from lep_megatron.common.exit_codes import EXIT_RESUMABLE


def disposition(sig) -> str:
    handler = signal.getsignal(sig)
    return {signal.SIG_IGN: "ignored", signal.SIG_DFL: "default"}.get(handler, "handler")


def main() -> None:
    overrides = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    out = Path(overrides.get("out_dir", os.environ.get("FAKE_OUT", ".")))
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    mode = os.environ.get("FAKE_MODE", "train")

    def event(text: str) -> None:
        with open(out / "events", "a") as f:
            f.write(f"attempt {attempt} rank {rank} node {os.environ.get('SLURMD_NODENAME', '-')}: {text}\n")

    if mode.startswith("exit:"):
        code = mode[len("exit:"):].split(",")[rank]
        event(f"exit {code}")
        if code == "sleep":
            time.sleep(3600)
        sys.exit(int(code))
    before = disposition(signal.SIGUSR1)
    got = []
    def handle(signum, frame):  # the event at once: the agent stops the other ranks once one has exited
        if not got:
            event("got SIGUSR1")
        got.append(signum)

    signal.signal(signal.SIGUSR1, handle)
    (out / f"ready-{attempt}-{rank}").write_text(f"{before} {os.getpid()}")
    event(f"ready (SIGUSR1 {before} before the handler)")
    if mode == "crash" and rank == 1:
        event("crash: exit 3")
        sys.exit(3)
    latest = checkpoints / "latest"
    step = int(latest.read_text().split("_")[1]) if latest.exists() else 0
    if attempt > 0 and mode == "train":
        event(f"resumed from step {step}")
        if rank == 0:
            latest.write_text(f"step_{step + 1:07d}\n")
        event("finished")
        sys.exit(0)
    deadline = time.time() + float(os.environ.get("FAKE_WAIT", "120"))
    while not got and time.time() < deadline:
        time.sleep(0.1)
    if not got:
        event("no signal: finished")
        sys.exit(0)
    if rank == 0 and mode == "train":
        latest.write_text(f"step_{step + 1:07d}\n")
        event(f"checkpointed step {step + 1}")
    time.sleep(1 + 0.5 * rank)  # the ranks exit one after another, as after a real save
    sys.exit(EXIT_RESUMABLE)


if __name__ == "__main__":
    main()
