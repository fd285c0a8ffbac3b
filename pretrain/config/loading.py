"""YAML + dotted overrides -> a validated `Config`.

Unknown keys and values of the wrong type raise `ConfigError` naming the key and what would have been
valid, so a typo in a 500-node job fails in a second rather than silently using a default.
"""

from __future__ import annotations

import dataclasses
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pretrain.config.schema import Config, ConfigError
from pretrain.config.validation import validate


def embedded_config_path(name: str = "demo.yaml") -> Path:
    """Path of a recipe shipped inside the package (configs/ in the repo)."""
    return Path(str(resources.files("pretrain.configs").joinpath(name)))


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is dict:  # e.g. optim.lr_mult: pattern -> multiplier; a YAML mapping, replaced as a whole
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping such as {{pattern: value}} (on the command line: "
                              f"'{key}={{text.*: 0.1}}'), got {type(value).__name__} {value!r}")
        return {_coerce(f"{key} key", k, key_tp): _coerce(f"{key}[{k!r}]", v, item_tp)
                for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' in {where}; valid keys: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key, tp, value = prefix + name, hints[name], data[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {', '.join(_field_names(tp))}")
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


class _StrictLoader(yaml.SafeLoader):
    """`yaml.safe_load`, but a key given twice in one mapping is an error naming both lines: PyYAML keeps
    the last one silently, so a second `train:` section further down would drop the first. Keys a merge
    (`<<: *base`) brings in may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            mark = key_node.start_mark
            if first is not None:
                raise ConfigError(f"{mark.name}, line {mark.line + 1}: key '{key}' is given twice in the "
                                  f"same mapping (first on line {first.line + 1}); YAML would keep only the "
                                  "last one")
            seen[key] = mark
        return super().construct_mapping(node, deep)


def _strict_load(stream: Any) -> Any:
    """One YAML document through `_StrictLoader` (what `yaml.safe_load` does with SafeLoader)."""
    loader = _StrictLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_value(text: str, where: str) -> Any:
    try:
        return _strict_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot parse value: {e}") from None
    except ConfigError as e:  # a key given twice in the value's mapping
        raise ConfigError(f"{where}: {e}") from None


def _split_override(text: str) -> tuple[list[str], str]:
    """`a.b.c=value` -> (["a", "b", "c"], "value"), the value as typed."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    return key.split("."), raw


def _quoted(raw: str) -> bool:
    text = raw.strip()
    return len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""


def override_value(text: str, raw: str, tp: Any) -> Any:
    """The value of override `text` (raw part `raw`) for a key of type `tp`.

    A string key takes the text as typed, so paths and patterns stay whole: `run.dir=/exp #3/run`,
    `run.dir=%x-%j`, `cross_site.site=no`, `data.train=@bucket/x` (YAML would cut the first at ` #`,
    reject the next two as directives or tags and turn `no` into false). Quote it (`'...'` or `"..."`)
    to have YAML read the quotes away, e.g. escapes in double quotes. Any other key is YAML-typed:
    `x=3` an int, `x=[1,2]` a list, `x=true` a bool.
    """
    if tp is str and not _quoted(raw):
        return raw
    value = _yaml_value(raw, f"override '{text}'") if raw.strip() else ""
    return raw if value is None else value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], YAML-parsed value) so `x=3` is an int and `x=[1,2]` a list.

    Type-blind: `load_config` goes through `override_value`, which keeps string keys' text as typed."""
    keys, raw = _split_override(text)
    value = _yaml_value(raw, f"override '{text}'") if raw.strip() else ""
    return keys, raw if value is None else value


def _set_nested(tree: dict[str, Any], path: list[str], raw: str, cls: type, full: str, text: str) -> None:
    """Insert override `text`'s value (typed for its key) at `path`, validating each segment against the
    schema for a clear error."""
    node, scls = tree, cls
    for i, part in enumerate(path):
        names = _field_names(scls)
        if part not in names:
            where = ".".join(path[:i]) or "top level"
            raise ConfigError(f"unknown config key '{full}': '{part}' is not in {where}; "
                              f"valid keys: {', '.join(names)}")
        tp = typing.get_type_hints(scls)[part]
        if i == len(path) - 1:
            if _is_dataclass_type(tp):
                raise ConfigError(f"'{full}' is a section; set one of its keys: "
                                  f"{', '.join(_field_names(tp))}")
            node[part] = override_value(text, raw, tp)
        else:
            if not _is_dataclass_type(tp):
                raise ConfigError(f"'{'.'.join(path[:i + 1])}' is not a section in '{full}'")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{'.'.join(path[:i + 1])}' must be a mapping")
            scls = tp


def read_yaml(path: str | Path) -> Any:
    """A recipe file's YAML (safe: nothing in it runs). Syntax errors, undecodable bytes and duplicate keys
    raise ConfigError naming the file (and line), not a traceback."""
    p = Path(path)
    try:
        with p.open(encoding="utf-8") as fh:  # a stream: YAML's error marks name the file
            return _strict_load(fh)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({e.strerror or e})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                world_size: int | None = None) -> Config:
    """Read YAML (safe_load: nothing in it runs), apply `dotted.key=value` overrides, validate (against
    `world_size` too when given, so every problem is listed in one error)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = read_yaml(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = loaded
    for ov in overrides:
        keys, raw = _split_override(ov)
        _set_nested(tree, keys, raw, Config, ".".join(keys), ov)
    cfg = _build(Config, tree, "")
    validate(cfg, world_size=world_size)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. the copy stored in a checkpoint): checked as a config,
    not as a run about to start (`schedule=False`), so a checkpoint saved before a schedule check existed
    still loads."""
    cfg = _build(Config, tree, "")
    validate(cfg, schedule=False)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
