"""A tensor-factory watch for the pure maths modules' tests (test_ppo_math, test_losses)."""

from __future__ import annotations

import sys
from pathlib import Path

from torch.overrides import TorchFunctionMode

FACTORIES = {"tensor", "full", "zeros", "ones", "empty", "arange", "linspace", "eye"}


class DevicelessFactories(TorchFunctionMode):
    """Records each tensor factory that `module` calls without a device (none, or `device=None`).

    On a GPU such a tensor lands on the CPU and the next op that mixes it with the inputs fails; on this
    CPU-only machine both places are the same, so the calls are watched instead, as
    tests/stages/test_ppo_device.py does for the PPO stage.
    """

    def __init__(self, module):
        super().__init__()
        self.file = module.__file__
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1)
        name = getattr(func, "__name__", "")
        if name in FACTORIES and kwargs.get("device") is None and caller.f_code.co_filename == self.file:
            self.calls.append(f"{Path(self.file).name}:{caller.f_lineno} torch.{name}")
        return func(*args, **kwargs)
