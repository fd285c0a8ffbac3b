"""The parameters and buffers of a TorchScript archive (OpenAI's released CLIP `.pt` files), read as data.

`torch.jit.load` would rebuild the archive's modules and run the TorchScript code they carry (a scripted
`__setstate__` runs while the file loads), and `torch.load` with `weights_only=True` refuses TorchScript
archives. This reader runs nothing from the file. It unpickles the archive's `data.pkl` with a restricted
unpickler whose only callables are ours:

* `__torch__.*` classes (the scripted modules) become plain `ScriptObject` records of their attribute
  dict; a module whose pickled state is not a dict, or whose code declares `__setstate__`, restores
  itself through its own code, and the archive is refused naming that class;
* `torch._utils._rebuild_tensor_v2` becomes a strided view of the storage (bounds checked);
* storages (`torch.FloatStorage`, ...) are read from the archive's `data/<key>` records by name;
* `collections.OrderedDict` and TorchScript's list/type-tag helpers become plain containers;
* any other global is refused (`UnsafeCheckpointError`, naming it), as the weights-only loader does.

Which attributes are parameters and buffers (what `state_dict()` would return) is read from each class's
`__parameters__` / `__buffers__` declarations in the archive's `code/` text, which is parsed, never run;
a class without such a declaration contributes all of its tensor attributes.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint.weights_only import UnsafeCheckpointError

__all__ = ["ScriptObject", "is_torchscript", "read_torchscript_state"]

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool}
"""The storage types a TorchScript pickle names (as GLOBAL torch.<name>) and the dtype of each."""


class ScriptObject:
    """A `__torch__.*` object of the archive as data: its class name and its pickled state."""

    qualname = "__torch__"

    def __init__(self, *args: Any) -> None:  # REDUCE on a class: arguments are not used
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Storage:
    """A storage type named by the pickle (only its dtype is used)."""

    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise ValueError(f"a tensor record without storage ({type(storage).__name__})")
    try:
        return storage.as_strided(tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"a tensor record does not fit its storage: {str(exc).splitlines()[0]}") from None


def _same(value: Any, *_: Any) -> Any:
    return value


_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _same, ("torch.jit._pickle", "build_doublelist"): _same,
    ("torch.jit._pickle", "build_boollist"): _same, ("torch.jit._pickle", "build_tensorlist"): _same,
    ("torch.jit._pickle", "restore_type_tag"): _same, ("torch", "device"): str,
}
"""Every callable the restricted unpickler hands out besides the records above: all of them ours."""


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.zf, self.prefix, self.path = zf, prefix, path
        self.classes: dict[str, type[ScriptObject]] = {}
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qual = f"{module}.{name}"
            if qual not in self.classes:
                self.classes[qual] = type(name, (ScriptObject,), {"qualname": qual})
            return self.classes[qual]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(name)
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[(module, name)]
        raise UnsafeCheckpointError(f"{self.path}: refused: its TorchScript data names {module}.{name}, "
                                    "not a tensor, storage or container record; nothing in it was run")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _Storage) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise ValueError(f"{self.path}: unexpected storage record {pid!r:.120}")
        _, kind, key, _, numel = pid
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            try:
                info = self.zf.getinfo(name)
            except KeyError:
                raise ValueError(f"{self.path}: storage record {name} is missing") from None
            itemsize = torch.empty(0, dtype=kind.dtype).element_size()
            if numel < 0 or info.file_size < numel * itemsize:
                raise ValueError(f"{self.path}: {name} holds {info.file_size} bytes, fewer than its "
                                 f"{numel} x {itemsize}-byte elements (truncated?)")
            buf = bytearray(numel * itemsize)
            with self.zf.open(info) as fh:
                fh.readinto(buf)
            self.storages[key] = torch.frombuffer(buf, dtype=kind.dtype) if numel else \
                torch.empty(0, dtype=kind.dtype)
        return self.storages[key]


def is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript's code or constants records (what `torch.jit.save` writes)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


_CLASS = re.compile(r"^class (\w+)\((?:\w+)\):\n((?:[ \t].*\n?|\n)*)", re.M)


def _declarations(zf: zipfile.ZipFile, prefix: str) -> dict[str, tuple[set[str], bool]]:
    """qualified class name -> (parameter and buffer names, whether it declares `__setstate__`), parsed
    from the archive's code files (text; nothing is compiled or run)."""
    out: dict[str, tuple[set[str], bool]] = {}
    code = f"{prefix}code/"
    for name in zf.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-len(".py")].replace("/", ".")
        text = zf.read(name).decode("utf-8", errors="replace")
        for m in _CLASS.finditer(text):
            body = m.group(2)
            names: set[str] = set()
            declared = False
            for field in ("__parameters__", "__buffers__"):
                decl = re.search(rf"^\s+{field} = \[([^\]]*)\]", body, re.M)
                if decl:
                    declared = True
                    names.update(a or b for a, b in re.findall(r"\"(\w+)\"|'(\w+)'", decl.group(1)))
            setstate = re.search(r"^\s+def __setstate__\(", body, re.M) is not None
            if declared or setstate:
                out[f"{module}.{m.group(1)}"] = (names, setstate)
    return out


def _walk(obj: ScriptObject, prefix: str, decls: dict[str, tuple[set[str], bool]], path: Path,
          out: dict[str, torch.Tensor]) -> None:
    where = prefix.rstrip(".") or "the root module"
    names, setstate = decls.get(obj.qualname, (None, False))
    if setstate or not isinstance(obj.state, dict):
        raise ValueError(f"{path}: refused: TorchScript class {obj.qualname} ({where}) restores its state "
                         f"with its own __setstate__ code, which is never run; save the model's state_dict "
                         f"(torch.save(model.state_dict(), ...)) and import that instead")
    for key, value in obj.state.items():
        if isinstance(value, ScriptObject):
            _walk(value, f"{prefix}{key}.", decls, path, out)
        elif isinstance(value, torch.Tensor) and (names is None or key in names):
            out[f"{prefix}{key}"] = value


def read_torchscript_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the TorchScript archive at `path` under their `state_dict()` names,
    read without running anything in it (module docstring). ValueError (`UnsafeCheckpointError` for a
    global outside the allow-list) naming the file for anything else."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path}: not a readable TorchScript archive ({exc})") from None
    with zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a TorchScript archive this reader knows (expected one "
                             f"<name>/data.pkl, found {len(pickles)})")
        prefix = pickles[0][:-len("data.pkl")]
        if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder").strip() != b"little":
            raise ValueError(f"{path}: written on a big-endian machine; not supported")
        unpickler = _Unpickler(zf.read(pickles[0]), zf, prefix, path)
        try:
            root = unpickler.load()
        except ValueError:  # ours (UnsafeCheckpointError included), already naming the file
            raise
        except Exception as exc:  # noqa: BLE001 -- a damaged pickle raises many exception types
            raise ValueError(f"{path}: its TorchScript data cannot be read ({type(exc).__name__}: "
                             f"{exc})") from None
        if not isinstance(root, ScriptObject):
            raise ValueError(f"{path}: its TorchScript data holds a {type(root).__name__}, not a module")
        out: dict[str, torch.Tensor] = {}
        _walk(root, "", _declarations(zf, prefix), path, out)
    return out
