"""Typed configs: dataclasses filled from YAML files, strictly.

An unknown or misspelt key, or a value of the wrong type, is a ConfigError that names the key
and the file. Checkpoints store `to_dict(cfg)` so that a model can be rebuilt with no flags.
A field may set a lower bound, `field(default=8, metadata={"min": 1})`. The file must be a
non-empty UTF-8 YAML mapping; every problem is one line naming the file (and the line).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def _check(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp in (list, tuple):                      # bare annotation: items unchecked
        origin = tp
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_check(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else typing.Any
        vals = [_check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(vals) if origin is tuple else vals
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):             # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data, where: str = ""):
    """Build dataclass `cls` from a mapping; every key must be a field of `cls`. `where` is
    the dotted path of `data` inside the whole config, for messages."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {data!r}")
    prefix = f"{where}." if where else ""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(fields)})"
            raise ConfigError(f"unknown key '{prefix}{key}' for {cls.__name__}{hint}")
        kwargs[key] = _check(hints[key], value, f"{prefix}{key}")
        low = fields[key].metadata.get("min")     # field(default=..., metadata={"min": 1})
        if low is not None and isinstance(kwargs[key], (int, float)) and not kwargs[key] >= low:
            raise ConfigError(f"{prefix}{key}: must be at least {low}, got {kwargs[key]!r}")
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where or 'config'}: missing required key(s) {missing} for {cls.__name__}")
    return cls(**kwargs)


def _set_path(data: dict, dotted: str, value, item: str = ""):
    keys = dotted.split(".")
    for i, k in enumerate(keys[:-1]):
        data = data.setdefault(k, {})
        if not isinstance(data, dict):
            raise ConfigError(f"override {item or dotted!r}: '{'.'.join(keys[:i + 1])}' is a value, not a "
                              "section with keys")
    data[keys[-1]] = value


def _yaml_error(where: str, e: yaml.YAMLError) -> ConfigError:
    """One line naming the place (line and column when YAML knows them) and the problem;
    PyYAML's own message spans several lines with a caret under the excerpt."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        where = f"{where}, line {mark.line + 1}, column {mark.column + 1}"
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    if isinstance(e, yaml.reader.ReaderError):           # a character YAML does not allow
        where, problem = f"{where}, character {e.position + 1}", e.reason
        if isinstance(e.character, int):
            problem += f" (#x{e.character:04x})"
    text = problem or " ".join(str(e).split()) or type(e).__name__
    if context and problem:
        text = f"{text} ({context})"
    return ConfigError(f"{where}: not valid YAML: {text}")


def read_utf8(path: Path, where: str, error=ValueError) -> str:
    """A text file's content; an unreadable file or text that is not UTF-8 is one `error`
    naming `where` (the file, or the flag that gave it)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{where}: cannot read the file ({e.strerror or type(e).__name__})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                    "save the file as UTF-8") from None


def read_yaml(path: Path):
    """The YAML document of a config file: a mapping. An empty file, text that is not UTF-8,
    invalid YAML or another top level is a one-line ConfigError naming the file."""
    text = read_utf8(path, str(path), ConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(str(path), e) from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty (or only comments); a config file sets keys such as "
                          "the ones in configs/")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a single {type(data).__name__} value"
        raise ConfigError(f"{path}: the top level is {kind}; a config file is a mapping of keys (key: value)")
    return data


def load_config(cls, path=None, overrides=()):
    """Read YAML `path` (or start from defaults) and apply "a.b=value" overrides (YAML values)."""
    data = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = read_yaml(path)
        source = str(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise _yaml_error(f"override {item!r}", e) from None
        _set_path(data, key.strip(), value, item)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
