"""Settings: every key, its default, how it is parsed and checked, in one table.

The command line is generated from SETTINGS, so a key cannot exist without a
default, a check and a help text. Parsers accept strings (flags) or already
typed values, and raise ConfigError with a message fit for one line.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .store import is_safe_name

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A bad flag, value or path: one line for the operator, exit 2."""


def _path(value: object) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError("expected a path")
    return Path(value)


def _seconds(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds")
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("expected a finite number of seconds >= 0")
    return seconds


def _positive_seconds(value: object) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError("expected a number of seconds > 0")
    return seconds


def _host(value: object) -> str:
    if not isinstance(value, str) or not is_safe_name(value):
        raise ValueError("expected a host directory name (no '/', no leading '.', no control characters)")
    return value


def _level(value: object) -> str:
    if value not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return str(value)


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError("expected true or false")


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    default: object
    parse: Callable[[object], object]
    help: str
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def is_switch(self) -> bool:
        return self.parse is _bool


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "episodes_root",
        Path("/var/lib/cis490/episodes"),
        _path,
        "the store: <root>/<host_id>/<episode_id>.tar.zst",
        "DIR",
    ),
    Setting(
        "index",
        Path("/var/lib/cis490/index.jsonl"),
        _path,
        "the append-only index the receiver writes",
        "FILE",
    ),
    Setting(
        "lock_file",
        None,
        _path,
        "file the receiver locks around its appends (default: the index itself)",
        "FILE",
    ),
    Setting("host", None, _host, "reconcile only this host_id", "HOST"),
    Setting(
        "min_age",
        300.0,
        _seconds,
        "leave files changed less than this long ago for a later pass (in-flight guard)",
        "SECONDS",
    ),
    Setting(
        "lock_timeout",
        30.0,
        _positive_seconds,
        "give up (exit 1) if the index lock is not free within this time",
        "SECONDS",
    ),
    Setting("log_level", "info", _level, "debug, info, warning or error", "LEVEL"),
    Setting("allow_root", False, _bool, "run as root even though the index belongs to another user"),
)


@dataclass(frozen=True, slots=True)
class Config:
    episodes_root: Path
    index: Path
    lock_file: Path | None
    host: str | None
    min_age: float
    lock_timeout: float
    log_level: str
    allow_root: bool

    @property
    def lock_path(self) -> Path:
        return self.lock_file or self.index


def build(values: Mapping[str, object]) -> Config:
    """A Config from raw values (missing keys take their defaults)."""
    unknown = set(values) - {s.key for s in SETTINGS}
    if unknown:
        raise ConfigError(f"unknown setting {sorted(unknown)[0]!r}")
    parsed = {}
    for setting in SETTINGS:
        if setting.key not in values:
            parsed[setting.key] = setting.default
            continue
        try:
            parsed[setting.key] = setting.parse(values[setting.key])
        except ValueError as e:
            raise ConfigError(f"{setting.flag} {values[setting.key]!r}: {e}") from None
    return Config(**parsed)  # type: ignore[arg-type]


def check_paths(cfg: Config) -> None:
    """Paths must make sense before a pass starts: the root a directory, the
    index a regular file (or absent, in an existing directory)."""
    if not cfg.episodes_root.is_dir():
        raise ConfigError(f"--episodes-root {cfg.episodes_root}: not a directory")
    for flag, path in (("--index", cfg.index), ("--lock-file", cfg.lock_path)):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            if not path.parent.is_dir():
                raise ConfigError(f"{flag} {path}: directory {path.parent} does not exist") from None
            continue
        except OSError as e:
            raise ConfigError(f"{flag} {path}: {e.strerror}") from None
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{flag} {path}: not a regular file")


def check_user(cfg: Config) -> None:
    """Refuse root when the index belongs to someone else: rows appended as
    root are fine, but a lock or index file root creates, or a habit of
    running as root, breaks the receiver that runs as its own user."""
    if os.geteuid() != 0 or cfg.allow_root:
        return
    target = cfg.index if cfg.index.exists() else cfg.index.parent
    owner = target.stat().st_uid
    if owner != 0:
        raise ConfigError(
            f"refusing to run as root: {target} belongs to uid {owner}; run as that user "
            f"(sudo -u '#{owner}' cis490-reconcile ...) or pass --allow-root"
        )
