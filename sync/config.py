"""SyncConfig: the `[sync]` settings (stable public keys) and their validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common import settings
from common.settings import DEFAULT_CACHE_SUBDIR, DEFAULT_RUN_DIR
from common.settings import setting as _opt
from sync.errors import SyncError

BACKENDS = ("folder", "drive")
_CHUNK_UNIT = 256 * 1024


@dataclass
class SyncConfig:
    """The `[sync]` table: where snapshots go and how transfers behave."""
    backend: str = _opt("folder", "where snapshots go: a directory or Google Drive", choices=BACKENDS)
    folder: str = _opt("", "folder backend: a directory path ('' = sync off); drive backend: a folder path "
                           "like runs/flowers or id:FOLDER_ID", path=lambda section: section.backend == "folder")
    credentials: str = _opt("", "drive: authorized-user or service-account JSON; '' = Colab/application "
                                "default credentials", path=True)
    api_endpoint: str = _opt("", "drive: API root URL; '' = Google's (set it for Drive-compatible servers)")
    ca_certs: str = _opt("", "drive: an extra CA bundle (TLS-inspecting proxies, test servers)", path=True)
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

    def check_environment(self) -> None:
        """Raise SyncError when a file these settings name does not exist here (checked when a run starts,
        not when a stored config is read, so a stored config loads on any machine)."""
        for name in ("credentials", "ca_certs"):
            path = getattr(self, name)
            if path and not Path(path).expanduser().is_file():
                raise SyncError(f"setting sync.{name} = {path!r}: no such file; fix the path or leave it empty.")

    @classmethod
    def from_settings(cls, table: Mapping[str, Any] = {}, overrides: list[str] = ()) -> "SyncConfig":
        """Build and validate a SyncConfig from `[sync]` values and `--set sync.key=value` items."""
        loader = settings.Loader(_SyncOnly(), ("sync",))
        for key, value in table.items():
            loader.apply(f"sync.{key}", value, "sync settings", Path.cwd())
        loader.apply_overrides(list(overrides))
        loader.resolve_paths()
        loader.root.sync.validate()
        return loader.root.sync


@dataclass
class _SyncOnly:
    """The part of a run's settings that sync reads by itself."""
    sync: SyncConfig = field(default_factory=SyncConfig)


def load_toml(path: str | Path, overrides: list[str] = ()) -> tuple[SyncConfig, Path, Path]:
    """Read (SyncConfig, run_dir, cache_dir) from a run TOML file plus `sync.key=value` overrides."""
    config = settings.load(_SyncOnly(), path, overrides, known_sections=("sync",)).sync
    table, base = settings.read_toml(path), Path(path).resolve().parent
    config.validate()
    run_dir = Path(settings.absolute(str(table.get("run", {}).get("dir", DEFAULT_RUN_DIR)), base))
    cache = str(table.get("cache", {}).get("dir", ""))
    return config, run_dir, Path(settings.absolute(cache, base)) if cache else run_dir / DEFAULT_CACHE_SUBDIR
