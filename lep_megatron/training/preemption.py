"""When training stops or saves on its own: signals, a wall-clock budget and time-based saves,
decided the same way on every rank.

SLURM sends SIGUSR1 to every process of the job steps `--signal=USR1@N` seconds before the time
limit, and SIGTERM on preemption or scancel. A handler only records the signal; after each step
the ranks all-reduce what they saw (Megatron-LM's DistributedSignalHandler does the same), so
they all save the same step and then exit together with EXIT_RESUMABLE.

SLURM signals every process of the step, the helper processes that checkpoint saves start
("spawn": a fresh interpreter, where a Python handler does not carry over) included; they would
die of it and take the save with them. So the signals are also blocked: a blocked signal stays
pending instead of being delivered, and the mask is inherited by every process started from then
on. `decide` takes a pending signal as it takes a handled one.
"""
import signal
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import psutil
import torch
import torch.distributed as dist

from lep_megatron.common.exit_codes import EXIT_RESUMABLE

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass
class Decision:
    """What every rank does after a step."""

    stop: Optional[str]
    """Why training stops now (a signal's name, or the wall-clock budget); None: go on."""
    save: bool
    """Checkpoint this step because save_interval_minutes passed since the last save."""


class StopWatch:
    """Records stop signals and decides, in agreement over the ranks, when to stop and when a
    time-based save is due. `exit_duration_minutes` counts from the start of this process (what
    a job's --time counts, start-up included); 0 disables it, as does 0 for the save interval."""

    def __init__(self, exit_duration_minutes: float = 0.0, save_interval_minutes: float = 0.0,
                 signals: Sequence[int] = STOP_SIGNALS):
        self.exit_duration_s = exit_duration_minutes * 60
        self.save_interval_s = save_interval_minutes * 60
        self.signals = tuple(signals)
        self.process_start = psutil.Process().create_time()
        self.last_save = time.time()
        self.received: Optional[int] = None
        self._previous = {}
        self._previous_mask = set()

    def __enter__(self) -> "StopWatch":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        self._previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        return self

    def __exit__(self, *exc) -> None:
        self._take_pending()  # before unblocking: a pending signal would hit the old dispositions
        signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _take_pending(self) -> None:
        while set(self.signals) & signal.sigpending():
            info = signal.sigtimedwait(self.signals, 0)
            if info is None:
                break
            self._record(info.si_signo, None)

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            print(f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting",
                  flush=True)

    def saved(self) -> None:
        """A checkpoint was just written: the save interval counts from now."""
        self.last_save = time.time()

    def decide(self) -> Decision:
        """Collective: the same decision on every rank (the signal any rank got, the largest clocks)."""
        self._take_pending()
        now = time.time()
        seen = torch.tensor([-1 if self.received is None else self.received, now - self.process_start,
                             now - self.last_save], dtype=torch.float64)
        if dist.is_initialized():
            device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
            seen = seen.to(device)
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        signum, elapsed, since_save = seen.tolist()
        stop = None
        if signum >= 0:
            stop = signal.Signals(int(signum)).name
        elif self.exit_duration_s and elapsed >= self.exit_duration_s:
            stop = f"train.exit_duration_minutes={self.exit_duration_s / 60:g} reached"
        return Decision(stop=stop, save=bool(self.save_interval_s and since_save >= self.save_interval_s))


class ResumableExit(SystemExit):
    """Training stopped at a checkpoint it resumes from: the process exits with EXIT_RESUMABLE
    (launch/pretrain.sh requeues the job on it) unless a caller catches it."""

    def __init__(self, step: int, reason: str):
        super().__init__(EXIT_RESUMABLE)
        self.step, self.reason = step, reason

    def __str__(self) -> str:
        return f"stopped after step {self.step} ({self.reason}), checkpointed; exit code {EXIT_RESUMABLE}: resume it"
