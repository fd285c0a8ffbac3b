"""AdamW implementations behind `optim.impl`, and the DeepSpeed pieces each one needs.

All of them run the same decoupled-weight-decay Adam on the same parameter groups and LR schedule; they
differ in kernels and in where the update runs:

- `torch`: DeepSpeed config `optimizer` AdamW with `torch_adam: true` (torch.optim.AdamW); any device.
- `torch_fused`: client optimizer torch.optim.AdamW(fused=True); CUDA, CPU (torch >= 2.4), ...
- `deepspeed_fused`: config `optimizer` AdamW without `torch_adam`: DeepSpeed FusedAdam; CUDA.
- `apex_fused`: client optimizer apex.optimizers.FusedAdam(adam_w_mode=True); CUDA + apex.
- `cpu_adam`: config `optimizer` AdamW + `zero_optimization.offload_optimizer` to CPU, for which
  DeepSpeed picks DeepSpeedCPUAdam (JIT-built with a C++ compiler on first use); ZeRO stage >= 1.

`auto` picks `deepspeed_fused` on CUDA (when DeepSpeed can build its op), else `torch_fused` where torch
has fused kernels for the device, else `torch`. Availability problems are reported as sentences naming
`optim.impl` (see `pretrain.config.check_runtime`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import torch

IMPLS = ("auto", "torch", "torch_fused", "deepspeed_fused", "apex_fused", "cpu_adam")
CLIENT_IMPLS = ("torch_fused", "apex_fused")
"""Implementations handed to DeepSpeed as a client optimizer (no `optimizer` section in its config)."""


def device_type() -> str:
    """Where training runs: DeepSpeed picks CUDA when torch sees a GPU, else its CPU accelerator."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def torch_fused_supported(device: str) -> bool:
    """Whether torch.optim.AdamW(fused=True) has kernels for `device` (CPU since torch 2.4)."""
    try:
        p = torch.zeros(2, device=device, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], lr=1e-3, fused=True).step()
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


def _deepspeed_fused_problem() -> str | None:
    if not torch.cuda.is_available():
        return "DeepSpeed FusedAdam is a CUDA kernel and torch sees no CUDA device here"
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder
    except ImportError as e:  # pragma: no cover - deepspeed is a dependency
        return f"cannot import DeepSpeed's op builder ({e})"
    builder = FusedAdamBuilder()
    if not builder.is_compatible(verbose=False):
        return "DeepSpeed reports its FusedAdam op as incompatible with this system (`ds_report`)"
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:  # pragma: no cover
        installed_ops = {}
    if not installed_ops.get("fused_adam"):  # JIT-built on first use: needs nvcc
        from torch.utils.cpp_extension import CUDA_HOME

        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
        if not (nvcc and os.path.exists(nvcc)) and not shutil.which("nvcc"):
            return ("DeepSpeed FusedAdam is not prebuilt (DS_BUILD_FUSED_ADAM=1) and nvcc is not found to "
                    "JIT-build it")
    return None


def _apex_fused_problem() -> str | None:
    if importlib.util.find_spec("apex") is None:
        return "apex is not installed (NVIDIA apex is built from source; PyPI's `apex` is unrelated)"
    try:
        from apex.optimizers import FusedAdam  # noqa: F401
    except ImportError as e:
        return f"apex is installed but apex.optimizers.FusedAdam does not import ({e})"
    if importlib.util.find_spec("amp_C") is None:
        return "apex was built without its CUDA extensions (amp_C missing)"
    if not torch.cuda.is_available():
        return "apex FusedAdam is a CUDA kernel and torch sees no CUDA device here"
    return None


def _cpu_adam_problem() -> str | None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) or shutil.which("g++"):
        return None
    try:  # a DeepSpeed wheel built with DS_BUILD_CPU_ADAM=1 needs no compiler
        from deepspeed.git_version_info import installed_ops
    except ImportError:  # pragma: no cover
        installed_ops = {}
    if installed_ops.get("cpu_adam"):
        return None
    return (f"DeepSpeedCPUAdam is JIT-compiled on first use and no C++ compiler ({compiler}, g++) is on "
            "PATH, nor was DeepSpeed installed with DS_BUILD_CPU_ADAM=1")


def optimizer_problem(impl: str) -> str | None:
    """Why `optim.impl=impl` cannot run on this machine (a sentence naming the key), or None."""
    problem = None
    if impl == "deepspeed_fused":
        problem = _deepspeed_fused_problem()
    elif impl == "apex_fused":
        problem = _apex_fused_problem()
    elif impl == "cpu_adam":
        problem = _cpu_adam_problem()
    elif impl == "torch_fused" and not torch_fused_supported(device_type()):
        problem = f"torch {torch.__version__} has no fused AdamW kernel for {device_type()}"
    if problem is None:
        return None
    return f"optim.impl={impl}: {problem}; use optim.impl=auto or torch"


def resolve_impl(impl: str) -> str:
    """The concrete implementation `impl` stands for on this machine (`auto` resolved)."""
    if impl not in IMPLS:
        raise ValueError(f"optim.impl: {impl!r} is not one of {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    if device_type() == "cuda" and _deepspeed_fused_problem() is None:
        return "deepspeed_fused"
    return "torch_fused" if torch_fused_supported(device_type()) else "torch"


def adamw_kwargs(optim_cfg: Any) -> dict[str, Any]:
    o = optim_cfg
    return {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}


def deepspeed_optimizer_section(impl: str, optim_cfg: Any) -> dict[str, Any] | None:
    """The DeepSpeed config's `optimizer` section for a resolved `impl`; None for client optimizers."""
    if impl in CLIENT_IMPLS:
        return None
    params: dict[str, Any] = {**adamw_kwargs(optim_cfg), "adam_w_mode": True}
    params["betas"] = list(params["betas"])
    if impl == "torch":
        params["torch_adam"] = True  # no JIT-built op
    # deepspeed_fused: DeepSpeed builds FusedAdam; cpu_adam: DeepSpeedCPUAdam, chosen by the offload
    return {"type": "AdamW", "params": params}


def offload_section(impl: str) -> dict[str, Any] | None:
    """`zero_optimization.offload_optimizer` for a resolved `impl` (only cpu_adam offloads)."""
    if impl != "cpu_adam":
        return None
    return {"device": "cpu", "pin_memory": torch.cuda.is_available()}


def client_optimizer(impl: str, optim_cfg: Any) -> Callable[[Any], torch.optim.Optimizer] | None:
    """A callable DeepSpeed applies to the parameter groups, for the client-optimizer implementations."""
    kwargs = adamw_kwargs(optim_cfg)
    if impl == "torch_fused":
        return lambda params: torch.optim.AdamW(params, fused=True, **kwargs)
    if impl == "apex_fused":
        from apex.optimizers import FusedAdam

        return lambda params: FusedAdam(params, adam_w_mode=True, **kwargs)
    return None


@contextlib.contextmanager
def deepspeed_arch_list() -> Iterator[None]:
    """Run the block with a TORCH_CUDA_ARCH_LIST that DeepSpeed's JIT op builder can parse.

    CUDA images set arch-specific targets such as `9.0a` or `10.0f` (Hopper's wgmma, Blackwell families);
    DeepSpeed 0.19.8 sorts the list with int() on each part and fails on the suffix
    (`invalid literal for int() with base 10: '0a'`), so `optim.impl=auto|deepspeed_fused` could not build
    FusedAdam on such a machine. The suffix only adds arch-specific instructions FusedAdam does not use:
    the block sees `9.0`, `10.0`, `+PTX` kept; the variable is restored afterwards."""
    original = os.environ.get("TORCH_CUDA_ARCH_LIST")
    fixed = None if original is None else re.sub(r"(\d+\.\d+)[a-z]+", r"\1", original)
    if fixed == original:
        yield
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = fixed
    try:
        yield
    finally:
        os.environ["TORCH_CUDA_ARCH_LIST"] = original
