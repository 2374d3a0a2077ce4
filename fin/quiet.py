"""Silence the notices torch, TorchRec and fbgemm print on every run: deprecations of their own internals
and planner hints, nothing a user of fin can act on. Our own warnings are left alone."""

from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = r"(torch|torchrec|fbgemm_gpu|torchmetrics)(\.|$)"


def quiet_library_notices() -> None:
    """For this process, and (through PYTHONWARNINGS) for worker processes it starts."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    warnings.filterwarnings("ignore", message=r"Please use DTensor instead", category=FutureWarning)
    # a spawned worker imports TorchRec before it runs any of our code: filter there by category
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    for name in ("torchrec.distributed.planner", "torch.fx._symbolic_trace", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.ERROR)
