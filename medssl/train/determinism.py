"""`train.deterministic: true`: PyTorch's deterministic algorithms for one training run, and a clear
message naming the op when one has no deterministic implementation (instead of a RuntimeError from deep
inside the step).

Also sets what those algorithms need: CUBLAS_WORKSPACE_CONFIG=:4096:8 (cuBLAS reads it when its handle is
made, so set it before the first CUDA matmul: a shell export is the safe way on a GPU) and cuDNN without
benchmark autotuning. Everything is put back afterwards: the flag is process-wide.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Iterator

import torch

from medssl.errors import TrainingError

CUBLAS_SETTING = ":4096:8"
_OP = re.compile(r"^(\S+) does not have a deterministic implementation")


def nondeterministic_op(err: BaseException) -> str | None:
    """The op PyTorch names when deterministic mode refuses it, else None."""
    match = _OP.search(str(err).strip())
    return match.group(1) if match else None


@contextmanager
def deterministic_algorithms(enabled: bool, where: str = "pretrain.train.deterministic") -> Iterator[None]:
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_SETTING)
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.benchmark, cudnn.deterministic)
    torch.use_deterministic_algorithms(True)
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    except RuntimeError as err:
        op = nondeterministic_op(err)
        if op is None:
            raise
        raise TrainingError(f"train.deterministic is on, but the op {op} has no deterministic implementation "
                            f"on this device", where=where,
                            fix="set train.deterministic: false (runs stay seeded, not bit-exact), or change the "
                                "setting that uses this op (e.g. another encoder or view)") from None
    finally:
        torch.use_deterministic_algorithms(before[0])
        cudnn.benchmark, cudnn.deterministic = before[1], before[2]
