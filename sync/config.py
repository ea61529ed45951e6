"""SyncConfig: the `[sync]` settings (stable public keys) and their validation."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sync.errors import SyncError

BACKENDS = ("folder", "drive")
_CHUNK_UNIT = 256 * 1024


def _opt(default, help: str, choices: tuple | None = None, min: float | None = None):
    """A setting with its help text and allowed values (the runner's --help reads these)."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": None})


@dataclass
class SyncConfig:
    """The `[sync]` table: where snapshots go and how transfers behave."""
    backend: str = _opt("folder", "where snapshots go: a directory or Google Drive", choices=BACKENDS)
    folder: str = _opt("", "folder backend: a directory path ('' = sync off); drive backend: a folder path "
                           "like runs/flowers or id:FOLDER_ID")
    credentials: str = _opt("", "drive: authorized-user or service-account JSON; '' = Colab/application "
                                "default credentials")
    api_endpoint: str = _opt("", "drive: API root URL; '' = Google's (set it for Drive-compatible servers)")
    ca_certs: str = _opt("", "drive: an extra CA bundle (TLS-inspecting proxies, test servers)")
    keep: int = _opt(3, "newest snapshots kept on the remote (the best by val accuracy is kept too)", min=1)
    chunk_mib: float = _opt(8.0, "drive: upload chunk size in MiB, a multiple of 0.25 (256 KiB)", min=0.25)
    flush_timeout_s: float = _opt(120.0, "seconds to wait for pending uploads at exit", min=0.0)
    retries: int = _opt(8, "tries of one network request before it counts as failed", min=1)
    backoff_s: float = _opt(1.0, "first retry delay in seconds (doubles each try, with jitter, max 60)", min=0.0)
    timeout_s: float = _opt(60.0, "drive: socket timeout of one HTTP request in seconds", min=0.1)

    @property
    def enabled(self) -> bool:
        """False when sync is off (folder backend with no folder)."""
        return not (self.backend == "folder" and self.folder == "")

    @property
    def chunk_bytes(self) -> int:
        """The upload chunk size in bytes."""
        return int(round(self.chunk_mib * 1024 * 1024))

    def validate(self) -> None:
        """Raise SyncError naming the setting and its fix when a value is unusable."""
        if self.backend not in BACKENDS:
            raise SyncError(f"setting sync.backend = {self.backend!r} is not allowed; use one of: "
                            f"{', '.join(BACKENDS)}.")
        if self.backend == "drive" and not self.folder:
            raise SyncError("setting sync.folder is empty but sync.backend = 'drive': name a Drive folder, "
                            "e.g. --set sync.folder=runs/flowers (or id:FOLDER_ID).")
        if self.backend == "drive" and self.folder.startswith("id:") and len(self.folder) == 3:
            raise SyncError("setting sync.folder = 'id:' has no folder id after 'id:'.")
        if self.keep < 1:
            raise SyncError(f"setting sync.keep = {self.keep} must be at least 1.")
        if self.chunk_bytes <= 0 or self.chunk_bytes % _CHUNK_UNIT:
            raise SyncError(f"setting sync.chunk_mib = {self.chunk_mib} must be a positive multiple of 0.25 "
                            f"(256 KiB), e.g. 8.")
        for name in ("flush_timeout_s", "backoff_s"):
            if getattr(self, name) < 0:
                raise SyncError(f"setting sync.{name} must not be negative.")
        if self.retries < 1:
            raise SyncError("setting sync.retries must be at least 1.")
        if self.timeout_s <= 0:
            raise SyncError("setting sync.timeout_s must be positive.")
        for name in ("credentials", "ca_certs"):
            path = getattr(self, name)
            if path and not Path(path).expanduser().is_file():
                raise SyncError(f"setting sync.{name} = {path!r}: no such file; fix the path or leave it empty.")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> "SyncConfig":
        """Build and validate a SyncConfig from a `[sync]` table (unknown keys are an error)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in table.items():
            if key not in known:
                raise SyncError(f"unknown setting sync.{key}; keys of [sync] are: {', '.join(known)}.")
            values[key] = _coerce(f"sync.{key}", value, type(getattr(cls(), key)))
        config = cls(**values)
        config.validate()
        return config


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Turn a TOML value into the setting's type or explain what was expected."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise SyncError(f"setting {key} = {value!r}: expected a {kind.__name__}.")


def load_toml(path: str | Path, overrides: list[str] = ()) -> tuple[SyncConfig, Path, Path]:
    """Read (SyncConfig, run_dir, cache_dir) from a run TOML file plus `sync.key=value` overrides."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SyncError(f"config file {path} does not exist; pass an existing file to --config.") from None
    except tomllib.TOMLDecodeError as e:
        raise SyncError(f"config file {path} is not valid TOML: {e}.") from None
    sync_table = dict(table.get("sync", {}))
    for text in overrides:
        key, sep, raw = text.partition("=")
        section, _, name = key.strip().partition(".")
        if not sep or section != "sync" or not name:
            raise SyncError(f"--set {text!r}: write it as sync.key=value, e.g. --set sync.keep=5.")
        try:
            sync_table[name] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            sync_table[name] = raw.strip()
    run_dir = Path(table.get("run", {}).get("dir", "runs/default"))
    cache = table.get("cache", {}).get("dir", "")
    return SyncConfig.from_mapping(sync_table), run_dir, Path(cache) if cache else run_dir / "cache"
