"""StopWatch in one process: a stop signal is taken whether it is handled or left pending, and a
process started while it watches (as dist_checkpointing's "spawn" helpers are) survives the
signal that SLURM sends to every process of the job step."""
import multiprocessing
import os
import signal
import time

from lep_megatron.training.preemption import StopWatch


def test_signal_stops_and_spawned_helpers_survive_it():
    with StopWatch() as watch:
        helper = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(2,))
        helper.start()
        time.sleep(1)  # the helper's interpreter is up
        os.kill(helper.pid, signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        helper.join(30)
        assert helper.exitcode == 0  # without the blocked mask it dies of the signal: -10
        assert watch.decide().stop == "SIGUSR1"
    # the previous dispositions are back and nothing is left pending
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL and not signal.sigpending()


def test_budget_and_interval():
    with StopWatch(exit_duration_minutes=1e-9, save_interval_minutes=0) as watch:
        decision = watch.decide()
    assert decision.stop.startswith("train.exit_duration_minutes") and not decision.save
    with StopWatch(save_interval_minutes=1e-9) as watch:
        time.sleep(0.01)
        assert watch.decide().save and watch.decide().stop is None
