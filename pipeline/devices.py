"""Where and in which dtype the models run: `--device` and `--dtype` resolved to torch's objects, used by
both stages and the tools."""

from __future__ import annotations

import torch

from ..errors import GooseError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GooseError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GooseError(f"device {device!r} asked for but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise GooseError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def ternary_device(device: str) -> torch.device:
    """The device of the ternary inference path (`--ternary`): the CPU, whatever `auto` would pick; any
    other choice is refused (its kernels are C)."""
    if device not in ("auto", "cpu"):
        raise GooseError(f"--ternary runs on the CPU (its kernels are C), not --device {device}")
    return torch.device("cpu")
