"""Fixes for megatron-core's DistributedOptimizer load path with the torch AdamW fallback (no
apex / Transformer Engine: every CPU, and GPU clusters without them). Without them a training
run cannot resume from a checkpoint, or resumes with silently different losses. Applied wherever
that fallback is in use, GPU or not; tests/training/test_resume.py fails without any one of them.

1. A fresh optimizer has no state until its first step, and building the loading request calls
   state_dict(), which asserts on the (absent) step counters: give it state with a step at lr 0
   on zero gradients, which changes no parameter (`initialise_state`).
2. _set_main_param_and_optimizer_states copies into the main parameters, leaves that require
   grad, outside no_grad, and expects a `step` entry that the checkpoint's tensors do not carry.
3. After load_state_dict every parameter must hold the checkpoint's step in a tensor of its own:
   megatron hands all parameters one shared tensor (torch AdamW then increments it once per
   parameter), and on this path the counters left by fix 1 survive the load.
"""
import functools

import torch
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

_applied = False


def needed() -> bool:
    return not distrib_optimizer.HAVE_APEX_OR_TE


def _set_states_under_no_grad_keeping_step(original):
    @functools.wraps(original)
    def wrapper(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        if "step" in state and "step" not in tensors:
            tensors = dict(tensors, step=state["step"])
        with torch.no_grad():
            return original(self, model_param, tensors)

    return wrapper


def _own_step_per_parameter(original):
    @functools.wraps(original)
    def wrapper(self, state_dict):
        result = original(self, state_dict)
        steps = {group["step"] for group in state_dict["optimizer"]["param_groups"] if "step" in group}
        if len(steps) == 1:
            step = float(steps.pop())
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step, dtype=state["step"].dtype)
        return result

    return wrapper


def apply() -> None:
    """Install fixes 2 and 3 once, if the torch AdamW fallback is in use."""
    global _applied
    if _applied or not needed():
        return
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_states_under_no_grad_keeping_step(
        DistributedOptimizer._set_main_param_and_optimizer_states)
    DistributedOptimizer.load_state_dict = _own_step_per_parameter(DistributedOptimizer.load_state_dict)
    _applied = True


def initialise_state(model, optimizer) -> None:
    """Fix 1: one optimizer step at lr 0 on zero gradients, before loading into `optimizer`."""
    if not needed():
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    model.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
