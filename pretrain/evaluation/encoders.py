"""The encoders `pretrain embed` and `pretrain bench infer` run: eager PyTorch or onnxruntime, one interface.

Both take and return torch tensors on the CPU side of the pipeline (normalised images [B, 3, S, S] float32,
token ids [B, L] int64 -> L2-normalised float32 [B, E]), so the shard and file loops of
`pretrain.evaluation.embed` do not care which runs. `open_encoder` picks one from a checkpoint (torch, or
an ONNX export made on the fly into a temporary folder) or from an existing `pretrain convert --to onnx`
folder.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pretrain.export.onnx_runtime import PREPROCESS

__all__ = ["BACKENDS", "OnnxEncoder", "TorchEncoder", "is_onnx_export", "open_encoder"]

logger = logging.getLogger("mmpt.embed")

BACKENDS = ("torch", "onnx")
TORCH_DTYPES = ("fp32",)
ONNX_DTYPES = ("fp32", "fp16", "int8")


def is_onnx_export(path: str | Path) -> bool:
    """A folder written by `pretrain convert --to onnx` (it has preprocess.json and the graphs)."""
    return (Path(path) / PREPROCESS).is_file()


class TorchEncoder:
    """The eager model's own `encode_image` / `encode_text` on its device (fp32)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.to(self.device)).cpu()

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids.to(self.device)).cpu()

    def parameters(self) -> Iterator[torch.Tensor]:
        return self.model.parameters()


class OnnxEncoder:
    """An export folder through `pretrain.export.onnx_runtime.OnnxCLIP` (CPU, or CUDA where the installed
    onnxruntime has it); inputs and outputs as torch tensors for the shared loops."""

    device = torch.device("cpu")

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int = 0) -> None:
        from pretrain.export.onnx_runtime import OnnxCLIP

        self.clip = OnnxCLIP(folder, providers=providers, threads=threads)
        self.config = self.clip.config

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.clip.encode_pixels(images.cpu().numpy()))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.clip.encode_ids(ids.cpu().numpy()))

    def parameters(self) -> Iterator[torch.Tensor]:
        yield torch.empty(0)  # the CPU: where the shared loops put their inputs


def check_backend(backend: str, dtype: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    allowed = TORCH_DTYPES if backend == "torch" else ONNX_DTYPES
    if dtype not in allowed:
        raise ValueError(f"--dtype {dtype!r} with --backend {backend}: choose one of {', '.join(allowed)}"
                         + (" (fp16/int8 run through --backend onnx)" if backend == "torch" else ""))


@contextlib.contextmanager
def open_encoder(checkpoint: str | Path, backend: str = "torch", dtype: str = "fp32", quant: str = "dynamic",
                 device: str | None = None) -> Iterator[tuple[Any, Any, Any]]:
    """(encoder, tokenizer, config) of `checkpoint` for `backend`; an ONNX export folder runs as it is,
    a checkpoint with `--backend onnx` is exported into a temporary folder first (removed afterwards)."""
    from pretrain.evaluation.evaluate import load_model

    if is_onnx_export(checkpoint):
        raise ValueError(f"{checkpoint} is an ONNX export: `pretrain embed` needs the checkpoint it came "
                         "from (for the config and tokenizer) and --backend onnx exports on the fly")
    check_backend(backend, dtype)
    model, tokenizer, cfg = load_model(checkpoint)
    if backend == "torch":
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        yield TorchEncoder(model), tokenizer, cfg
        return
    from pretrain.export.onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="mmpt-onnx-") as tmp:
        logger.info("exporting %s to ONNX (%s) in %s", checkpoint, dtype, tmp)
        export_onnx(model, tokenizer, cfg, Path(tmp), dtype, quant)
        del model
        yield OnnxEncoder(tmp), tokenizer, cfg
