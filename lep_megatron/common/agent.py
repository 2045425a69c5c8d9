"""torchrun for SLURM jobs that stop and resume: `python -m lep_megatron.common.agent <torchrun args>`.

The same arguments and behaviour as `torchrun` (torch.distributed.run), with two differences
that launch/pretrain.sh relies on:

- SIGUSR1 is ignored by this agent. SLURM's `--signal=USR1@N` (without `B:`) signals every
  process of the job step, the agent included; torchrun's agent would die of it (the default
  action) and take its workers down before they checkpoint. The workers inherit the ignored
  disposition until the trainer installs its own handler, so a signal during start-up is not
  fatal either (the trainer sees it only from then on).
- Exit codes: torchrun exits 1 whatever its workers exited with. Here, when at least one worker
  exited with EXIT_RESUMABLE (75: checkpointed, stopped early, resume later) and none exited
  with another positive code (workers the agent itself stopped after the first exit count as
  killed by a signal, negative), the agent exits 75 too; any other failure is torchrun's own
  (its error report, exit code 1).
"""
import signal
import sys
from typing import Mapping, Optional, Sequence

from lep_megatron.common.exit_codes import EXIT_RESUMABLE


def failure_exit_code(exit_codes: Sequence[int]) -> Optional[int]:
    """EXIT_RESUMABLE when the failed workers' exit codes say "checkpointed, resume": at least one
    75 and no other positive code (negative: killed by a signal, e.g. by the agent once the first
    worker had exited); None otherwise (a real failure)."""
    if EXIT_RESUMABLE in exit_codes and all(c == EXIT_RESUMABLE or c < 0 for c in exit_codes):
        return EXIT_RESUMABLE
    return None


def _exit_codes(failures: Mapping) -> list:
    return [int(f.exitcode) for f in failures.values()]


def main(argv: Optional[Sequence[str]] = None) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

    args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        record(torchrun.run)(args)  # as torchrun's main(): the root failure's error file for the scheduler
    except ChildFailedError as err:
        codes = _exit_codes(err.failures)
        code = failure_exit_code(codes)
        if code is None:
            raise  # torchrun's own report of the failure
        print(f"lep_megatron.common.agent: workers exited {sorted(set(codes))}: resumable, exit {code}",
              file=sys.stderr, flush=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
