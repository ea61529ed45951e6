"""The one settings mechanism of runner and sync: typed fields, TOML + `--set` input, coercion, checks.

A configuration is a dataclass whose fields are sections (dataclasses of settings declared with
`setting(...)`); the dataclasses themselves are the registry of keys and the one place defaults are
declared. Values from a TOML file that are paths are resolved against that file's folder, values from
`--set` against the current directory, so a run behaves the same from any working directory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Callable

from common.errors import ProjectError

DEFAULT_RUN_DIR = "runs/default"
DEFAULT_CACHE_SUBDIR = "cache"  # cache.dir = '' means RUN_DIR/cache

_EXPECTED = {"str": "a string", "int": "an integer (a whole number such as 8000)",
             "float": "a number (such as 0.001)", "bool": "true or false"}


class SettingError(ProjectError):
    """A setting that cannot be used as given; the message names the key (and file) and the fix."""


def setting(default, help: str, choices: tuple | None = None, min: float | None = None,
            max: float | None = None, path: bool | Callable[[Any], bool] = False):
    """A settings field: default, help text, allowed values, range, and whether it is a filesystem path
    (True, or a predicate on the section, e.g. only when another key says so)."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max,
                                            "path": path})


def sections(root) -> dict[str, Any]:
    """The sections of a configuration object, by name."""
    return {f.name: getattr(root, f.name) for f in dataclasses.fields(root)}


def coerce(key: str, value: Any, kind: str) -> Any:
    """Turn a TOML or --set value into the field's type ('str', 'int', 'float', 'bool'), or explain."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise SettingError(f"setting {key} = {value!r}: it must be a finite number (nan and inf are "
                               f"not allowed).")
        return float(value)
    elif kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind == "str" and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise SettingError(f"setting {key} = {value!r}: expected {_EXPECTED[kind]}.")


def check(key: str, value: Any, meta: dict) -> None:
    """Refuse a value outside the field's choices or range."""
    choices, lo, hi = meta.get("choices"), meta.get("min"), meta.get("max")
    if choices and value not in choices:
        raise SettingError(f"setting {key} = {value!r} is not allowed; use one of: {', '.join(map(str, choices))}.")
    if lo is not None and value < lo:
        raise SettingError(f"setting {key} = {value!r} is too small; it must be at least {lo}.")
    if hi is not None and value > hi:
        raise SettingError(f"setting {key} = {value!r} is too large; it must be at most {hi}.")


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` → (key, value typed as TOML reads it; a bare string otherwise)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SettingError(f"--set {text!r}: write it as section.key=value, e.g. --set train.steps=8000.")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare string such as a path
    return key.strip(), value


def read_toml(path: str | Path) -> dict:
    """The tables of a TOML settings file; SettingError naming the file when it is missing or invalid."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingError(f"config file {path} does not exist; pass an existing file to --config "
                           f"(see configs/ for examples).") from None
    except IsADirectoryError:
        raise SettingError(f"config file {path} is a folder; pass a .toml file to --config (such as "
                           f"configs/flowers.toml).") from None
    except UnicodeDecodeError as e:
        raise SettingError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                           f"UTF-8.") from None
    except PermissionError:
        raise SettingError(f"config file {path} cannot be read (permission denied); make it readable or pass "
                           f"another file to --config.") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingError(f"config file {path} is not valid TOML: {e}.") from None
    for name, section in table.items():
        if not isinstance(section, dict):
            raise SettingError(f"{path}: '{name}' must be a [section] table, not a bare value.")
    return table


class Loader:
    """Applies settings to one configuration object, remembering where each path came from."""

    def __init__(self, root, known_sections: tuple[str, ...] | None = None):
        self.root = root
        self.known = known_sections  # None: every section of root; otherwise others are ignored
        self._bases: dict[str, Path] = {}

    def apply(self, key: str, value: Any, source: str, base: Path) -> None:
        """Coerce, check and set one `section.key`; `base` is the folder relative paths are taken from."""
        section_name, _, name = key.partition(".")
        found = sections(self.root)
        if section_name not in found or not name:
            raise SettingError(f"{source}: unknown setting '{key}'. Sections are: {', '.join(found)} "
                               f"(run `python resume.py --print-config` to see every key).")
        section = found[section_name]
        fields = {f.name: f for f in dataclasses.fields(section)}
        if name not in fields:
            raise SettingError(f"{source}: unknown setting '{key}'. Keys of [{section_name}] are: "
                               f"{', '.join(fields)}.")
        kind = typing.get_type_hints(type(section))[name].__name__
        coerced = coerce(key, value, kind)
        check(key, coerced, fields[name].metadata)
        setattr(section, name, coerced)
        self._bases[key] = base

    def apply_file(self, path: str | Path) -> None:
        """Apply every `[section] key = value` of a TOML file (paths relative to the file's folder)."""
        path = Path(path)
        base = path.resolve().parent
        for section_name, table in read_toml(path).items():
            if self.known is not None and section_name not in self.known:
                continue
            for name, value in table.items():
                self.apply(f"{section_name}.{name}", value, str(path), base)

    def apply_overrides(self, overrides: list[str]) -> None:
        """Apply `--set section.key=value` items (paths relative to the current directory)."""
        for text in overrides:
            key, value = parse_override(text)
            if self.known is not None and key.partition(".")[0] not in self.known:
                raise SettingError(f"--set {text!r}: only {', '.join(f'{s}.*' for s in self.known)} settings "
                                   f"apply here.")
            self.apply(key, value, "--set", Path.cwd())

    def resolve_paths(self) -> None:
        """Make every relative path setting absolute against the folder it came from (defaults: cwd)."""
        for section_name, section in sections(self.root).items():
            if self.known is not None and section_name not in self.known:
                continue
            for f in dataclasses.fields(section):
                is_path = f.metadata.get("path", False)
                value = getattr(section, f.name)
                if not value or not (is_path(section) if callable(is_path) else is_path):
                    continue
                key = f"{section_name}.{f.name}"
                setattr(section, f.name, absolute(value, self._bases.get(key, Path.cwd())))


def absolute(value: str, base: Path) -> str:
    """A path setting made absolute against `base` (`~` expanded); a URL (gs://...) is kept as it is."""
    if "://" in value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (Path(base) / path).resolve())


def load(root, path: str | Path | None, overrides: list[str] = (),
         known_sections: tuple[str, ...] | None = None):
    """Fill `root` from a TOML file (optional) and `--set` overrides; return it with paths resolved."""
    loader = Loader(root, known_sections)
    if path is not None:
        loader.apply_file(path)
    loader.apply_overrides(list(overrides))
    loader.resolve_paths()
    return root


def _entries(root):
    """(key, default, help text with its choices and range) of every setting, in declaration order."""
    for section_name, section in sections(root).items():
        for f in dataclasses.fields(section):
            meta = f.metadata
            extra = [f"one of: {', '.join(map(str, meta['choices']))}"] if meta.get("choices") else []
            lo, hi = meta.get("min"), meta.get("max")
            if lo is not None or hi is not None:
                extra.append(f"{lo} to {hi}" if lo is not None and hi is not None else
                             f"at least {lo}" if lo is not None else f"at most {hi}")
            text = meta.get("help", "") + (f" ({'; '.join(extra)})" if extra else "")
            yield f"{section_name}.{f.name}", getattr(section, f.name), text


def describe(root) -> str:
    """Every setting with its default and help text, one line each (for --help)."""
    return "\n".join(f"  {key} = {default!r}: {text}" for key, default, text in _entries(root))


def markdown_reference(root) -> str:
    """Every setting as a Markdown table per section (key, default, meaning): the settings reference page."""
    out, current = [], None
    for key, default, text in _entries(root):
        section = key.partition(".")[0]
        if section != current:
            out += ["", f"## [{section}]", "", "| key | default | meaning |", "| --- | --- | --- |"]
            current = section
        out.append(f"| `{key}` | `{json.dumps(default)}` | {text.replace('|', '/')} |")
    return "\n".join(out).lstrip("\n") + "\n"


def to_toml(root) -> str:
    """Every setting as TOML that `load` reads back to the same values."""
    out = []
    for section_name, section in dataclasses.asdict(root).items():
        out.append(f"[{section_name}]")
        for key, value in section.items():
            out.append(f"{key} = {json.dumps(value)}")
        out.append("")
    return "\n".join(out)
