"""fp16 and int8 versions of an fp32 ONNX encoder, with onnxruntime's own converters.

- fp16: `onnxruntime.transformers.float16.convert_float_to_float16` with fp32 inputs and outputs kept
  (callers feed and receive float32 at every dtype) and the normalisations kept in fp32 (LayerNorm and the
  final L2 norm reduce over the width, where fp16's range and rounding lose most). Meant for GPUs: on a
  CPU without native fp16 arithmetic onnxruntime runs fp16 ops slower than fp32 (docs/benchmarks.md).
- int8 dynamic: `quantize_dynamic`, int8 weights of every MatMul/Gemm (per tensor), activations quantised
  on the fly per batch. Needs no data.
- int8 static: `quantize_static` (QDQ), int8 weights per output channel and uint8 activations whose
  ranges come from calibration batches (MinMax). Needs data: `pretrain convert --calibration SHARDS`.

The patch-embedding convolution stays fp32 in both int8 modes: it is one op and ConvInteger is not faster
than fp32 Conv in onnxruntime's CPU kernels. A graph fused by `--optimizer transformers` also has its
Attention ops quantised (QAttention, dynamic mode); its contrib ops have no ONNX type inference, so their
outputs are declared float32 to the quantiser.

Measured on the rewritten graphs (`pretrain.export.onnx_fuse`) at the demo's shapes, 2-core CPU: int8
weights per output channel changed neither speed nor cosine measurably (image 1.66x vs 1.68x ONNX fp32
per CPU second, text 1.99x vs 1.97x), so dynamic stays per tensor; static QDQ stays 0.6x of dynamic.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["QUANT_MODES", "quantize", "to_fp16"]

QUANT_MODES = ("dynamic", "static")
_QUANT_OPS = ["MatMul", "Gemm"]
_FP16_KEEP = ["LayerNormalization", "ReduceL2", "ReduceSum", "Div", "Sqrt", "Pow", "ReduceMean", "Clip",
              "Max", "Softmax", "Cast", "ArgMax"]
"""Ops kept in fp32 by the fp16 conversion (normalisations and what feeds them)."""


def to_fp16(src: Path, dst: Path) -> None:
    """fp16 copy of `src`. A graph with onnxruntime contrib ops (`--optimizer transformers`) goes through
    `OnnxModel.convert_float_to_float16`, which knows their types; the plain converter mistypes what
    follows them (a Clip fed fp16 and fp32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        fused = OnnxModel(model)
        fused.convert_float_to_float16(keep_io_types=True, op_block_list=_FP16_KEEP)
        fused.save_model_to_file(str(dst))
        return
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=_FP16_KEEP)
    onnx.save(half, str(dst))


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a list of input batches."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.name = name
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self.name: x}

    def rewind(self) -> None:  # pragma: no cover - calibrators only read once here
        pass


def quantize(src: Path, dst: Path, mode: str, batches: list[np.ndarray] | None, input_name: str) -> None:
    """int8 copy of `src` at `dst`; static mode calibrates on `batches` (inputs named `input_name`)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}  # outputs of contrib ops (fused graphs)
    if mode == "dynamic":
        fused = any(n.op_type == "Attention" for n in onnx.load(str(src)).graph.node)
        ops = _QUANT_OPS + (["Attention"] if fused else [])
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                         extra_options=extra)
        return
    if mode != "static":
        raise ValueError(f"--quant {mode!r}: choose one of {', '.join(QUANT_MODES)}")
    if not batches:
        raise ValueError("--quant static: the calibration data held no readable sample")
    from onnxruntime.quantization import CalibrationMethod

    if batches[0].dtype == np.int64:  # the text tower: weights only matter; activations from captions
        batches = [np.ascontiguousarray(b, dtype=np.int64) for b in batches]
    else:
        batches = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
    quantize_static(str(src), str(dst), _Batches(input_name, batches), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=_QUANT_OPS, calibrate_method=CalibrationMethod.MinMax,
                    extra_options=extra)
