"""How a pseudo-gradient leaves a site: fp32, fp16, or int8 / 1-bit sign with one scale per chunk and error
feedback.

The payload is self-describing bytes (a small header, then the values), so what a site sends is exactly
what the byte counter counts and what the other sites decode. int8 keeps one fp32 scale per `CHUNK`
values (max |x| / 127 of the chunk): a single outlier then only coarsens its own 1024 neighbours.
Rounding error is not lost: `ErrorFeedback` adds what the last encoding dropped to the next round's
values (as in 1-bit Adam / EF-SGD), so over several rounds the sum of what was sent tracks the sum of the
true pseudo-gradients. fp16 keeps 11 significant bits; its error is below the noise of training and it
gets no feedback.

`sign` sends one bit per value (its sign) and one fp32 scale per chunk, the chunk's mean |x|: the scale
that minimises the L2 error of a sign vector (scaled sign compression, EF-SignSGD, Karimireddy et al.
2019; 1-bit Adam). It is 0.129 bytes per value against int8's 1.004, so the same byte budget buys ~7.8x
the rounds; with error feedback nothing is lost, only delayed. Why trade precision for rounds: on the
demo, the drift of the sites between rounds costs far more than rounding (docs/benchmarks.md, "#19").

Only finite values are encoded: one inf would make its chunk's int8/sign scale inf and the whole chunk (and,
through error feedback, the residual of every later round) NaN, so `encode` refuses NaN and inf, naming how
many. fp16 saturates at its largest finite value, +-65504, instead of overflowing to inf (it has no error
feedback: what lies beyond is lost, and a pseudo-gradient that large means the site's training diverged).
"""

from __future__ import annotations

import struct

import numpy as np
import torch

CHUNK = 1024
"""Values per int8 or sign scale."""
FP16_MAX = 65504.0
"""Largest finite fp16 value: what the fp16 codec saturates at."""
_HEADER = struct.Struct("<4sQ")  # codec name (padded), number of values
CODECS = ("none", "fp16", "int8", "sign")
LOSSY = ("int8", "sign")
"""Codecs whose rounding error `ErrorFeedback` carries to the next round."""


def encode(values: torch.Tensor, codec: str) -> bytes:
    """`values` (a flat fp32 tensor on any device, every value finite) as payload bytes under `codec`."""
    x = values.detach().float().cpu().reshape(-1)
    n = x.numel()
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"cross-site payload: {bad} of the {n} values to encode ({codec}) are NaN or inf; "
                         "only finite values can be sent")
    head = _HEADER.pack(codec.encode().ljust(4, b" "), n)
    if codec == "none":
        return head + x.numpy().tobytes()
    if codec == "fp16":
        return head + x.clamp(-FP16_MAX, FP16_MAX).half().numpy().tobytes()
    if codec == "int8":
        q, scales = _quantize(x)
        return head + scales.numpy().tobytes() + q.numpy().tobytes()
    if codec == "sign":
        padded = torch.nn.functional.pad(x, (0, (-n) % CHUNK)).view(-1, CHUNK)
        # the mean |x| of each chunk's real values, summed in float64: 1024 values near the fp32 maximum
        # would overflow an fp32 sum to inf, while their mean is finite
        scales = padded.double().abs().sum(dim=1) / _chunk_sizes(n).double()
        bits = np.packbits((x >= 0).numpy())  # 1: x >= 0, 0: x < 0; eight values per byte
        return head + scales.float().numpy().tobytes() + bits.tobytes()
    raise ValueError(f"cross_site.compress: unknown codec {codec!r} (one of {', '.join(CODECS)})")


def decode(payload: bytes) -> torch.Tensor:
    """The flat fp32 tensor a payload carries (CPU)."""
    if len(payload) < _HEADER.size:
        raise ValueError(f"cross-site payload of {len(payload)} bytes: shorter than its "
                         f"{_HEADER.size}-byte header")
    name, n = _HEADER.unpack_from(payload)
    body = memoryview(payload)[_HEADER.size:]
    codec = name.decode(errors="replace").strip()
    if codec in CODECS and len(body) != _body_size(codec, n):
        raise ValueError(f"cross-site payload: {codec} of {n} values needs {_body_size(codec, n)} bytes "
                         f"after the header, got {len(body)} (truncated or corrupted)")
    if codec == "none":
        return torch.from_numpy(np.frombuffer(body, dtype=np.float32, count=n).copy())
    if codec == "fp16":
        return torch.from_numpy(np.frombuffer(body, dtype=np.float16, count=n).astype(np.float32))
    if codec == "int8":
        chunks = -(-n // CHUNK)
        scales = torch.from_numpy(np.frombuffer(body, dtype=np.float32, count=chunks).copy())
        q = torch.from_numpy(np.frombuffer(body, dtype=np.int8, count=n, offset=4 * chunks).copy())
        return _dequantize(q, scales, n)
    if codec == "sign":
        chunks = -(-n // CHUNK)
        scales = torch.from_numpy(np.frombuffer(body, dtype=np.float32, count=chunks).copy())
        bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8, count=-(-n // 8), offset=4 * chunks))[:n]
        return _dequantize(torch.from_numpy(bits.astype(np.float32) * 2 - 1), scales, n)
    raise ValueError(f"cross-site payload with unknown codec {codec!r}")


def _body_size(codec: str, n: int) -> int:
    """Bytes after the header of a payload of `n` values."""
    chunks = -(-n // CHUNK)
    return {"none": 4 * n, "fp16": 2 * n, "int8": 4 * chunks + n, "sign": 4 * chunks + -(-n // 8)}[codec]


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per chunk: (int8 values, fp32 scales). A chunk of zeros gets scale 0."""
    n = x.numel()
    padded = torch.nn.functional.pad(x, (0, (-n) % CHUNK)).view(-1, CHUNK)
    scales = padded.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(padded / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1)[:n].contiguous(), scales.float().contiguous()


def _chunk_sizes(n: int) -> torch.Tensor:
    """How many real (unpadded) values each chunk of `n` holds: CHUNK, ..., CHUNK, the remainder."""
    sizes = torch.full((-(-n // CHUNK),), float(CHUNK))
    if n % CHUNK:
        sizes[-1] = n % CHUNK
    return sizes


def _dequantize(q: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    padded = torch.nn.functional.pad(q.float(), (0, (-n) % CHUNK)).view(-1, CHUNK)
    return (padded * scales[:, None]).reshape(-1)[:n].contiguous()


class ErrorFeedback:
    """Encode with memory: `encode(x)` sends x + the residual of the last round and keeps what the lossy
    codec dropped. Only int8 and sign keep a residual (fp16's rounding is far below training noise, fp32 is
    exact). The residual is part of the outer state (checkpointed with it)."""

    def __init__(self, codec: str, numel: int, device: torch.device | str = "cpu") -> None:
        self.codec = codec
        self.residual = torch.zeros(numel if codec in LOSSY else 0, dtype=torch.float32, device=device)

    def encode(self, values: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """(payload, what the other sites will decode from it) for `values` plus the carried residual. A
        ValueError (values not finite, or a decoded value that is not) leaves the residual as it was: a NaN
        in it would be added to every later round."""
        carried = values + self.residual if self.residual.numel() else values
        payload = encode(carried, self.codec)
        sent = decode(payload).to(values.device)
        if not bool(torch.isfinite(sent).all()):
            raise ValueError(f"cross-site payload ({self.codec}): values of magnitude up to "
                             f"{float(carried.abs().max()):.3g} decode to inf; nothing was sent")
        if self.residual.numel():
            self.residual = carried - sent
        return payload, sent
