"""Inference precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` (one home for every command and the API).

Only the image tower runs in reduced precision (``torch.autocast``: matrix products and convolutions
in bf16 / fp16, accumulations and norms as autocast keeps them); its dense features are cast back to
float32 before anything is scored, so logits, softmax, thresholds and PAMR are always float32.

``auto`` picks, without guessing:

- CUDA: bf16 on devices of compute capability >= 8.0 (Ampere and later have native bf16), else fp16;
- CPU: bf16 when the processor has native bf16 instructions (the ``avx512_bf16`` or ``amx_bf16``
  flags of ``/proc/cpuinfo``); fp32 otherwise (bf16 emulated in fp32 is slower than fp32);
- anything else (MPS, unknown): fp32.

Weight casting (``load_model(..., cast_weights=True)``, ``--cast-weights``; off by default): with bf16 /
fp16, :func:`cast_image_tower` converts the image tower's parameters and buffers to that dtype once, so
``torch.autocast`` no longer re-casts ~86 M weights in every forward and the elementwise work between
the matrix products (GELU, residual additions) runs in bf16 too. The text tower, the text projection and
the scalars stay float32; the tower still runs under autocast, so a module of mixed dtypes works.
Modules marked ``keep_float32`` stay float32 (the offline model's stem, first block and ImageNet
classifier; the classifier and its dense head compute in float32 at every precision, inside
:func:`float32_region`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from textseg.errors import TextsegError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The ``flags`` of the first processor in ``cpuinfo`` (empty when the file is absent: not Linux)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm64 spellings
            return set(value.split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """True when the CPU executes bf16 natively (AVX-512 BF16 or AMX-BF16 in ``flags``; arm64 ``bf16``)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in CPU_BF16_FLAGS) or "bf16" in flags


def resolve_precision(precision: str | None, device: str | torch.device = "cpu") -> str:
    """``precision`` (``auto`` / ``fp32`` / ``bf16`` / ``fp16``; None = fp32) on ``device`` -> the
    concrete one (``fp32``, ``bf16`` or ``fp16``); see the module docstring for ``auto``."""
    precision = "fp32" if precision is None else str(precision).lower()
    if precision not in PRECISIONS:
        raise TextsegError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


# Child modules that form the image side of textseg's models (CLIP / GroupViT ``visual``, the offline
# model's and LiT's ``image``, LSeg's ``image_encoder`` / ``decoder`` / ``head_block``).
IMAGE_TOWERS = ("visual", "image", "image_encoder", "decoder", "head_block")


def cast_image_tower(model, precision: str) -> list[str]:
    """Convert the floating parameters and buffers of ``model``'s image-side children
    (:data:`IMAGE_TOWERS`) to ``precision``'s dtype once (in place); returns the names cast. fp32: no-op.
    Sets ``model.inference_cast = "weights"``; a model without such children is refused."""
    if precision == "fp32":
        return []
    dtype = DTYPES[precision]
    names = [n for n, _ in model.named_children() if n in IMAGE_TOWERS]
    if not names:
        raise TextsegError(f"model {getattr(model, 'name', type(model).__name__)!r} has no image tower to cast "
                           f"(children named {', '.join(IMAGE_TOWERS)}); drop --cast-weights")
    for n in names:
        _cast_except_kept(getattr(model, n), dtype)
    model.inference_cast = "weights"
    return names


def _cast_except_kept(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)``, except the submodules marked ``keep_float32`` (never rounded: casting them
    to bf16 and back would lose the precision they are kept for)."""
    if getattr(module, "keep_float32", False):
        return
    if not any(getattr(m, "keep_float32", False) for m in module.modules()):
        module.to(dtype)
        return
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    for child in module.children():
        _cast_except_kept(child, dtype)


def autocast(precision: str, device: str | torch.device = "cpu"):
    """A context running the image tower at ``precision`` (a resolved one) on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def float32_region(device: str | torch.device = "cpu"):
    """A context in which autocast is off: what runs inside it (a model's scoring layers) is float32 even
    when called from inside :func:`autocast` (the inputs must be float32 already)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def to_float32(x):
    """Floating tensors (also inside dicts / lists / tuples) back to float32; others unchanged."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    if isinstance(x, dict):
        return {k: to_float32(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(to_float32(v) for v in x)
    return x


def describe(model) -> dict:
    """What ``/v1/models`` reports: the model's resolved ``precision``, ``cast`` (``"weights"`` when the
    image tower's weights were converted once, else ``"autocast"``) and whether this CPU has native bf16."""
    return {"precision": getattr(model, "inference_precision", None) or "fp32",
            "cast": getattr(model, "inference_cast", None) or "autocast",
            "cpu_native_bf16": cpu_has_native_bf16()}
