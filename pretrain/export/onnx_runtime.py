"""Run an `pretrain convert --to onnx` folder with onnxruntime alone: no torch, no mmpt model code.

    from pretrain.export.onnx_runtime import OnnxCLIP
    clip = OnnxCLIP("exports/onnx-int8")              # CPU; providers=["CUDAExecutionProvider", ...]
    img = clip.encode_images([PIL.Image.open("cat.jpg")])   # [1, E] float32, L2-normalised
    txt = clip.encode_texts(["a photo of a cat"])            # [1, E]
    scores = img @ txt.T

A fine-tuned classifier's export (`pretrain convert CLASSIFIER DST --to onnx`: `classifier.onnx`,
`classnames.txt`, `preprocess.json` with `"model": "classifier"`) runs through `OnnxClassifier`:

    clf = OnnxClassifier("exports/classifier-int8")
    pred = clf.predict([PIL.Image.open("cat.jpg")])      # pred.names[0], pred.scores[0] (softmax)

Each class refuses the other's folder by name.

This module imports only numpy, onnxruntime, tokenizers and PIL (and ftfy, when a folder needs CLIP's
clean-up, below), so a serving process can copy this one file next to the export folder and run it
without torch installed (tests/unit/test_export_onnx.py runs it in a subprocess where `import torch`
raises). Everything the encoders need besides the two graphs is in
the folder: `preprocess.json` (image size, mean, std, crop, context length, special ids, text clean-up,
pooling) and the `tokenizers` library's `tokenizer.json`. An export of a `data.tokenizer=clip` run carries
OpenAI CLIP's tokenizer, whose clean-up (`text_clean: "clip"`: ftfy, HTML unescaping, whitespace, lower
case) also needs the `ftfy` package, as training does.

Images are resized and centre-cropped with PIL's bicubic filter; training and `pretrain eval` resize with
torch's uint8 bicubic kernel, which rounds differently in the last bit of a few pixels, so embeddings of
images that need resizing differ from `pretrain embed`'s by a cosine of about 1 - 1e-5. Pass already
normalised arrays to `encode_pixels` to reproduce them exactly.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

__all__ = ["CLASSIFIER_MODEL", "CLASSIFIER_ONNX", "CLASSNAMES", "CPU_DISABLED_OPTIMIZERS", "IMAGE_ONNX",
           "PREPROCESS", "TEXT_CLEAN", "TEXT_ONNX", "OnnxCLIP", "OnnxClassifier", "Prediction", "clip_clean",
           "default_providers", "preprocess_images"]

IMAGE_ONNX, TEXT_ONNX, PREPROCESS, TOKENIZER = "image.onnx", "text.onnx", "preprocess.json", "tokenizer.json"
CLASSIFIER_ONNX, CLASSNAMES = "classifier.onnx", "classnames.txt"
CLASSIFIER_MODEL = "classifier"
"""`preprocess.json` / `manifest.json` `model` of a classifier's export (a CLIP export has no `model` key)."""
_PREFERRED = ("CUDAExecutionProvider", "CPUExecutionProvider")
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
"""Load-time fusions left out when a session runs on the CPU provider alone. onnxruntime fuses a residual
Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel measured ~5x slower than the two
ops it replaces at [64, 65, 128] (onnxruntime 1.32, 2-core Xeon: 2.7 ms vs 0.55 ms, one thread); GPU
sessions keep it."""


TEXT_CLEAN = ("none", "clip")
"""`preprocess.json` `text_clean` values: none (our BPE: its tokenizer.json normalises), or OpenAI CLIP's."""


def clip_clean(text: str) -> str:
    """OpenAI CLIP's caption clean-up, exactly as training applies it before the BPE
    (`data_pipelines.clip_tokenizer.clean_caption`): ftfy, HTML unescaped twice, whitespace collapsed,
    lower-cased. Repeated here so this file stays importable without the project."""
    try:
        import ftfy
    except ImportError:
        raise ImportError("this export uses OpenAI CLIP's tokenizer, whose text clean-up needs the ftfy "
                          "package (pip install ftfy), as training does") from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, then CPU (TensorRT only when asked: it builds engines per
    shape, minutes on first use)."""
    available = set(ort.get_available_providers())
    return [p for p in _PREFERRED if p in available]


def preprocess_images(images: Sequence[Image.Image], size: int, mean: np.ndarray, std: np.ndarray
                      ) -> np.ndarray:
    """float32 [B, 3, S, S] of PIL images: centred square box, bicubic resize to `size`, scaled to [0, 1],
    normalised by `mean` / `std` (`preprocess.json`'s; the same for CLIP and classifier exports)."""
    S = size
    batch = np.empty((len(images), S, S, 3), dtype=np.float32)
    for i, img in enumerate(images):
        img = img.convert("RGB") if img.mode != "RGB" else img
        w, h = img.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        batch[i] = np.asarray(img.resize((S, S), Image.Resampling.BICUBIC, box=box), dtype=np.float32)
    batch = (batch / 255.0 - mean) / std
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)


def _session(path: Path, providers: Sequence[str] | None, threads: int) -> ort.InferenceSession:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a `pretrain convert --to onnx` folder")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        opts.intra_op_num_threads = threads
    chosen = list(providers or default_providers())
    cpu_only = all(p == "CPUExecutionProvider" for p in chosen)
    return ort.InferenceSession(str(path), sess_options=opts, providers=chosen,
                                disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS) if cpu_only else [])


def read_preprocess(folder: Path) -> dict[str, Any]:
    """An export folder's preprocess.json (what both runtimes read first); FileNotFoundError naming the
    folder when it is not a `pretrain convert --to onnx` output."""
    pre = folder / PREPROCESS
    if not pre.is_file():
        raise FileNotFoundError(f"{pre} not found: {folder} is not a `pretrain convert --to onnx` folder")
    return json.loads(pre.read_text(encoding="utf-8"))


class OnnxCLIP:
    """The image and text encoders of one export folder, with their tokenizer and preprocessing."""

    def __init__(self, folder: str | Path, providers: Sequence[str] | None = None, threads: int = 0,
                 towers: Sequence[str] = ("image", "text"), split: bool | None = None) -> None:
        """`split` (default: on when the sessions run on the CPU provider alone with more than one core):
        a batch of at least 2 rows per core is cut into one chunk per core, each run on a single-threaded
        session, concurrently (onnxruntime releases the GIL). On 2 cores that measured 1.07-1.10x the images/s
        of one 2-thread session over the whole batch (int8, batch 64, the demo's shapes). Smaller batches
        use the multi-threaded session. int8 dynamic quantisation scales activations per run, so a chunk's
        rows round slightly differently from the whole batch's (cosine >= 0.9997 at the demo's shapes)."""
        self.folder = Path(folder)
        self.config: dict[str, Any] = read_preprocess(self.folder)
        c = self.config
        if c.get("model") == CLASSIFIER_MODEL:
            raise ValueError(f"{self.folder} is a fine-tuned classifier's ONNX export ({CLASSIFIER_ONNX}, "
                             f"{CLASSNAMES}), not CLIP encoders: open it with OnnxClassifier")
        self.image_size, self.context_length = int(c["image_size"]), int(c["context_length"])
        self.mean = np.asarray(c["mean"], dtype=np.float32)
        self.std = np.asarray(c["std"], dtype=np.float32)
        self.sos_id, self.eos_id, self.pad_id = int(c["sos_id"]), int(c["eos_id"]), int(c["pad_id"])
        self.text_clean = str(c.get("text_clean", "none"))  # folders written before the key: our BPE
        if self.text_clean not in TEXT_CLEAN:
            raise ValueError(f"{self.folder / PREPROCESS}: text_clean {self.text_clean!r} is not one of "
                             f"{', '.join(TEXT_CLEAN)}")
        self.tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER))
        # our BPE reads "[EOS]" typed in a caption as text, as training does (not saved in tokenizer.json);
        # OpenAI CLIP's maps its special strings to their ids, as open_clip.tokenize does
        self.tokenizer.encode_special_tokens = self.text_clean == "none"
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.image = _session(self.folder / IMAGE_ONNX, providers, threads) if "image" in towers else None
        self.text = _session(self.folder / TEXT_ONNX, providers, threads) if "text" in towers else None
        chosen = list(providers or default_providers())
        self.workers = threads if threads > 0 else (os.cpu_count() or 1)
        cpu_only = all(p == "CPUExecutionProvider" for p in chosen)
        self.split = (cpu_only and self.workers > 1) if split is None else (split and self.workers > 1)
        self._single = {}  # tower -> single-threaded session for the chunks
        if self.split:
            for name, file in (("image", IMAGE_ONNX), ("text", TEXT_ONNX)):
                if name in towers:
                    self._single[name] = _session(self.folder / file, providers, 1)
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="onnx-chunk")

    # ------------------------------------------------------------------------------------- inputs
    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """int64 [B, context_length]: [SOS] tokens [EOS] then [PAD], long texts cut so they keep [EOS]
        (the same ids as the training tokenizer's `encode_batch`, OpenAI CLIP's clean-up included)."""
        L = self.context_length
        texts = [clip_clean(t) for t in texts] if self.text_clean == "clip" else list(texts)
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        out = np.full((len(encodings), L), self.pad_id, dtype=np.int64)
        out[:, 0] = self.sos_id
        for row, enc in zip(out, encodings, strict=True):
            ids = enc.ids[:L - 2]
            row[1:len(ids) + 1] = ids
            row[len(ids) + 1] = self.eos_id
        return out

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """float32 [B, 3, S, S]: centred square box, bicubic resize to S, scaled to [0, 1], normalised."""
        return preprocess_images(images, self.image_size, self.mean, self.std)

    # ------------------------------------------------------------------------------------- encoders
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Normalised images [B, 3, S, S] -> L2-normalised embeddings [B, E] (float32)."""
        if self.image is None:
            raise RuntimeError("this OnnxCLIP was opened without the image tower")
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, self.image_size, self.image_size):
            S = self.image_size
            raise ValueError(f"pixels must be [B, 3, {S}, {S}], got {pixels.shape}")
        return self._run("image", self.image, "pixel_values", pixels)

    def encode_ids(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [B, context_length] -> L2-normalised embeddings [B, E] (float32)."""
        if self.text is None:
            raise RuntimeError("this OnnxCLIP was opened without the text tower")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] != self.context_length:
            raise ValueError(f"ids must be [B, {self.context_length}], got {ids.shape}")
        return self._run("text", self.text, "input_ids", ids)

    def _run(self, tower: str, session: ort.InferenceSession, name: str, x: np.ndarray) -> np.ndarray:
        """The whole batch on `session`, or one chunk per core on the single-threaded one (see `split`)."""
        single = self._single.get(tower)
        if single is None or len(x) < 2 * self.workers:
            return session.run(None, {name: x})[0].astype(np.float32, copy=False)
        chunks = np.array_split(x, self.workers)
        outs = self._pool.map(lambda c: single.run(None, {name: np.ascontiguousarray(c)})[0], chunks)
        return np.concatenate(list(outs)).astype(np.float32, copy=False)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode_pixels(self.preprocess(images))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode_ids(self.tokenize(texts))


class Prediction(NamedTuple):
    """`OnnxClassifier.predict`'s answer for a batch of B images over C classes."""

    indices: np.ndarray
    """int64 [B]: the top-1 class of each image (a row of classnames.txt)."""
    names: list[str]
    """The top-1 class names."""
    scores: np.ndarray
    """float32 [B]: the top-1 class's softmax probability."""
    probabilities: np.ndarray
    """float32 [B, C]: softmax over every class."""


class OnnxClassifier:
    """A fine-tuned classifier's export (`pretrain finetune --task classify`, then `pretrain convert --to
    onnx`): `classifier.onnx` (pixel_values -> logits), its class names and image preprocessing."""

    def __init__(self, folder: str | Path, providers: Sequence[str] | None = None, threads: int = 0) -> None:
        self.folder = Path(folder)
        self.config: dict[str, Any] = read_preprocess(self.folder)
        c = self.config
        if c.get("model") != CLASSIFIER_MODEL:
            raise ValueError(f"{self.folder} is a CLIP export ({IMAGE_ONNX}, {TEXT_ONNX}), not a fine-tuned "
                             "classifier's: open it with OnnxCLIP")
        self.image_size = int(c["image_size"])
        self.mean = np.asarray(c["mean"], dtype=np.float32)
        self.std = np.asarray(c["std"], dtype=np.float32)
        names = self.folder / CLASSNAMES
        if not names.is_file():
            raise FileNotFoundError(f"{names} not found: the classifier export {self.folder} is incomplete")
        lines = names.read_text(encoding="utf-8").split("\n")
        self.classnames: list[str] = lines[:-1] if lines and lines[-1] == "" else lines
        self.session = _session(self.folder / CLASSIFIER_ONNX, providers, threads)
        classes = self.session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != len(self.classnames):
            raise ValueError(f"{names} holds {len(self.classnames)} class names but {CLASSIFIER_ONNX} "
                             f"outputs {classes} logits: the folder's files do not belong together")

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """float32 [B, 3, S, S], exactly as `OnnxCLIP.preprocess` (centre crop, bicubic, normalised)."""
        return preprocess_images(images, self.image_size, self.mean, self.std)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Normalised images [B, 3, S, S] -> class logits [B, C] (float32, `ClassifierModel.logits`)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        S = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, S, S):
            raise ValueError(f"pixels must be [B, 3, {S}, {S}], got {pixels.shape}")
        return self.session.run(None, {"pixel_values": pixels})[0].astype(np.float32, copy=False)

    def predict_pixels(self, pixels: np.ndarray) -> Prediction:
        """Top-1 class, its name and softmax probability of each normalised image."""
        logits = self.logits(pixels).astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        top = logits.argmax(axis=1).astype(np.int64)
        return Prediction(top, [self.classnames[i] for i in top], probs[np.arange(len(top)), top], probs)

    def predict(self, images: Sequence[Image.Image]) -> Prediction:
        return self.predict_pixels(self.preprocess(images))
