"""The loss-spike / NaN guard: which steps are skipped, and the stop after N in a row."""
import math

import pytest

from lep_megatron.training import trainer
from lep_megatron.training.trainer import LossGuard


@pytest.fixture(autouse=True)
def single_rank(monkeypatch):
    monkeypatch.setattr(trainer.dist, "get_rank", lambda: 0)


def test_skips_non_finite_and_spikes_then_recovers():
    guard = LossGuard(spike_factor=2.0, max_skipped=3, window=3)
    decisions = [guard.skip(x) for x in (4.0, 3.0, math.nan, 20.0, 2.5, math.inf, 2.4)]
    assert decisions == [False, False, True, True, False, True, False]
    # the spike test uses the mean of the last 3 accepted losses: (3.0 + 2.5 + 2.4) / 3
    assert guard.recent == [3.0, 2.5, 2.4] and guard.skip(2 * 7.9 / 3 + 0.01)


def test_stops_after_max_skipped_in_a_row():
    guard = LossGuard(spike_factor=0, max_skipped=2)
    assert guard.skip(1e9) is False  # spike test disabled: only non-finite losses are skipped
    assert guard.skip(math.nan) is True
    with pytest.raises(RuntimeError, match="2 steps in a row"):
        guard.skip(math.nan)
