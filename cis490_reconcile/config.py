"""Settings: every key, its default, how it is parsed and checked, in one table.

The command line, the environment variables and the TOML keys are all derived
from SETTINGS, so a key cannot exist without a default, a check and a help
text. Sources, strongest first:

    1. flags                 --min-age 60
    2. environment           CIS490_RECONCILE_MIN_AGE=60
    3. the TOML file         min_age = 60   (--config, $CIS490_RECONCILE_CONFIG,
                                             default /etc/cis490/reconcile.toml)
    4. the default in SETTINGS

A missing default file is fine (most hosts need none); a missing named file,
an unknown key or a bad value is a ConfigError naming its source, one line.
Parsers accept strings (flags, environment) or TOML's typed values; "" from
any source switches off a setting whose field may be None, so it can undo a
weaker source.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

from . import syscalls
from .store import passed_host

LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_WINDOW, MAX_WINDOW = 8 << 20, 2 << 30  # 2 GiB: zstd --long=31, the format's largest
DEFAULT_CONFIG_FILE = Path("/etc/cis490/reconcile.toml")
ENV_PREFIX = "CIS490_RECONCILE_"
ENV_CONFIG = ENV_PREFIX + "CONFIG"
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB
MAX_SECONDS = 100 * 365 * 86400  # longer overflows select() (2**63 ns), or a retention cutoff's float


class ConfigError(Exception):
    """A bad flag, value or path: one line for the operator, exit 2."""


def _path(value: object) -> Path:
    text = str(value) if isinstance(value, str | Path) else ""
    if not text or "\0" in text or text.encode(errors="ignore").decode() != text:  # SQLite keeps it as text
        raise ValueError("expected a path (UTF-8, no NUL)")
    return Path(text)


def _seconds(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds")
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except OverflowError:  # a TOML integer beyond any float
        seconds = math.inf
    except (TypeError, ValueError):
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("expected a finite number of seconds >= 0")
    if seconds > MAX_SECONDS:
        raise ValueError(f"expected at most {MAX_SECONDS} seconds (100 years)")
    return seconds


def positive_seconds(value: object) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError("expected a number of seconds > 0")
    return seconds


def _optional_positive_seconds(value: object) -> float | None:
    """0 switches the setting off."""
    return None if value in (0, "0") else positive_seconds(value)


def _size(value: object, what: str) -> int:
    """A number of bytes, with an optional K, M or G (powers of 1024)."""
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    if isinstance(value, bool) or not text:
        raise ValueError(f"expected {what}, like 50M")
    number, suffix = (text[:-1], text[-1]) if text[-1] in _SIZE_SUFFIXES else (text, "")
    try:
        size = float(number) * _SIZE_SUFFIXES[suffix]
    except ValueError:
        raise ValueError(f"expected {what}, like 50M (K, M, G are powers of 1024)") from None
    if not math.isfinite(size) or size < 0:
        raise ValueError(f"expected {what} >= 0")
    return int(size)


_DURATION_SUFFIXES = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _retention(value: object) -> float | None:
    """Seconds, or with s, m, h or d; 0 for no retention."""
    text = str(value).strip().lower()
    if text[-1:] in _DURATION_SUFFIXES and not isinstance(value, bool):
        try:
            value = float(text[:-1]) * _DURATION_SUFFIXES[text[-1]]
        except ValueError:
            raise ValueError("expected seconds, or a number with s, m, h or d (like 30d)") from None
    return _optional_positive_seconds(value)


def _rate(value: object) -> int | None:
    """Bytes per second; 0 is no limit."""
    rate = _size(value, "bytes per second")
    if 0 < rate < 64 << 10:
        raise ValueError("expected 0 (no limit) or at least 64K per second")
    return rate or None


def _window(value: object) -> int:
    window = _size(value, "a zstd window size")
    if not MIN_WINDOW <= window <= MAX_WINDOW:
        raise ValueError("expected a zstd window size from 8M to 2G (zstd --long=31)")
    return window


def _paths(value: object) -> tuple[Path, ...]:
    """A TOML array of paths, or one string of comma-separated paths ("" for none)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(p, str | Path) for p in items):
        raise ValueError("expected a list of paths (in a flag: comma-separated)")
    return tuple(_path(p) for p in (str(p).strip() for p in items) if p)


def _workers(value: object) -> int | None:
    """A number of worker processes; 0 means one per CPU."""
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(str(value)) > 256:
        raise ValueError("expected a number of worker processes from 0 (one per CPU) to 256")
    return int(str(value)) or None


def _host(value: object) -> str:
    if (why := passed_host(str(value))) or not isinstance(value, str):  # the scan's own rule
        raise ValueError("expected a host directory a pass visits" + (f" ({why.reason})" if why else ""))
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
        "the store: <root>/<host_id>/<episode_id>.tar.zst (dotfiles and lost+found are no hosts)",
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
        positive_seconds,
        "give up (exit 1) if the index lock is not free within this time",
        "SECONDS",
    ),
    Setting(
        "interval",
        None,
        _optional_positive_seconds,
        "run as a loop: this long between the end of one pass and the start of the next",
        "SECONDS",
    ),
    Setting(
        "max_read_rate",
        None,
        _rate,
        "read tarballs at most this fast, e.g. 50M, so the receiver keeps its disk (0: no limit)",
        "BYTES_PER_S",
    ),
    Setting(
        "max_window",
        128 << 20,
        _window,
        "verify zstd frames that declare a window up to this (zstd -d's default limit is 128M; "
        "2G for --long=31 stores); larger windows are unverifiable",
        "BYTES",
    ),
    Setting(
        "zstd_dictionaries",
        (),
        _paths,
        "zstd dictionary files (from zstd --train), matched to frames by dictionary id (comma-separated)",
        "FILES",
    ),
    Setting(
        "workers",
        None,
        _workers,
        "verify tarballs in this many processes (default 0: one per CPU; 1: in the main process)",
        "N",
    ),
    Setting(
        "state_dir",
        Path("/var/lib/cis490-reconcile"),
        _path,
        'where a pass remembers what the next one can skip ("" for nowhere; absent: nowhere)',
        "DIR",
    ),
    Setting(
        "full_every",
        86400.0,
        _optional_positive_seconds,
        "list every host directory and parse the whole index at least this often (0: only with --full)",
        "SECONDS",
    ),
    Setting(
        "metrics_file",
        None,
        _path,
        "write Prometheus metrics here after each pass (node_exporter textfile collector: *.prom)",
        "FILE",
    ),
    Setting(
        "quarantine_dir",
        None,
        _path,
        "move corrupt tarballs into DIR/<host_id>/ with a JSON sidecar, so the shipper's retry re-sends them "
        "(same filesystem as the episodes, outside them; never deletes)",
        "DIR",
    ),
    Setting(
        "retention",
        None,
        _retention,
        "tarballs older than this are pruned by design: a row older than it whose tarball is gone is "
        "counted as pruned, not reported missing (seconds, or 30d, 12h...; 0: none)",
        "SECONDS",
    ),
    Setting(
        "quarantine_min_age",
        3600.0,
        _seconds,
        "quarantine a corrupt tarball only once it has stayed unchanged this long (a receiver that writes "
        "in place and stalls leaves a file that looks cut short)",
        "SECONDS",
    ),
    Setting("log_level", "info", _level, "debug, info, warning or error", "LEVEL"),
    Setting("allow_root", False, _bool, "run as root even though the index belongs to another user"),
    Setting(
        "allow_network_fs",
        False,
        _bool,
        "run a pass even with the index, lock file, episodes or state directory on a network, cluster or "
        "FUSE filesystem, where our lock need not exclude the receiver's: rows could be appended twice or "
        "glued together",
    ),
)


@dataclass(frozen=True, slots=True)
class Config:
    episodes_root: Path
    index: Path
    lock_file: Path | None
    host: str | None
    min_age: float
    lock_timeout: float
    interval: float | None
    max_read_rate: int | None
    max_window: int
    zstd_dictionaries: tuple[Path, ...]
    workers: int | None
    state_dir: Path | None
    full_every: float | None
    metrics_file: Path | None
    quarantine_dir: Path | None
    retention: float | None
    quarantine_min_age: float
    log_level: str
    allow_root: bool
    allow_network_fs: bool

    @property
    def lock_path(self) -> Path:
        return self.lock_file or self.index


class Loaded(NamedTuple):
    """The effective config and, per key, where its value came from."""

    config: Config
    sources: Mapping[str, str]
    config_file: Path | None  # the file that was read, if any


_BY_KEY = {s.key: s for s in SETTINGS}
_OPTIONAL = frozenset(f.name for f in fields(Config) if str(f.type).endswith("| None"))  # "" is None


def build(values: Mapping[str, object]) -> Config:
    """A Config from raw values named by key (missing keys take their defaults)."""
    return resolve([("value", values)]).config


def resolve(layers: Sequence[tuple[str, Mapping[str, object]]]) -> Loaded:
    """Merge layers, weakest first; each is (source, {key: raw value})."""
    parsed: dict[str, object] = {s.key: s.default for s in SETTINGS}
    sources = dict.fromkeys(parsed, "default")
    for source, values in layers:
        for key, raw in values.items():
            setting = _BY_KEY.get(key)
            if setting is None:  # named as _read_toml names the file (load refuses unknown variables)
                where = source if source == "value" else f"config file {source}"
                raise ConfigError(f"{where}: unknown setting {key!r} (see 'cis490-reconcile config')")
            try:
                parsed[key] = None if raw == "" and key in _OPTIONAL else setting.parse(raw)
            except ValueError as e:
                raise ConfigError(f"{_where(source, setting, raw)}: {e}") from None
            sources[key] = source
    return Loaded(Config(**parsed), sources, None)  # type: ignore[arg-type]


def load(flags: Mapping[str, object], config_file: Path | None, environ: Mapping[str, str]) -> Loaded:
    """Flags over environment over the TOML file over defaults."""
    named = config_file or (Path(environ[ENV_CONFIG]) if environ.get(ENV_CONFIG) else None)
    path = named or DEFAULT_CONFIG_FILE
    layers: list[tuple[str, Mapping[str, object]]] = []
    file_values = _read_toml(path, required=named is not None)
    if file_values is not None:
        layers.append((str(path), file_values))
    env_values: dict[str, object] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and name != ENV_CONFIG:
            key = name.removeprefix(ENV_PREFIX).lower()
            if key not in _BY_KEY:
                raise ConfigError(f"environment: unknown variable {name} (see 'cis490-reconcile config')")
            env_values[key] = value
    layers += [("environment", env_values), ("flag", flags)]
    loaded = resolve(layers)
    return Loaded(loaded.config, loaded.sources, path if file_values is not None else None)


def _read_toml(path: Path, required: bool) -> dict[str, object] | None:
    try:
        data = syscalls.read_regular(path, MAX_CONFIG_BYTES)  # never a FIFO's endless wait nor /dev/zero
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path}: no such file") from None
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"config file {path}: {e.strerror if isinstance(e, OSError) else e}") from None
    # imported only when there is a file: start-up time counts for a no-op pass
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    try:
        values: dict[str, object] = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: not valid TOML: {e}") from None
    for key, value in values.items():
        if isinstance(value, dict):
            key = json.dumps(key)[1:-1]  # a quoted key may hold a newline; the error stays one line
            raise ConfigError(f"config file {path}: unexpected table [{key}]; keys go at the top level")
    return values


def _where(source: str, setting: Setting, raw: object) -> str:
    if source == "flag":
        return f"{setting.flag} {raw!r}"
    if source == "environment":
        return f"{ENV_PREFIX}{setting.key.upper()}={raw!r}"
    if source == "value":
        return f"{setting.key} {raw!r}"
    return f"config file {source}: {setting.key} = {raw!r}"


def render(loaded: Loaded) -> str:
    """The effective config as TOML, each key with where it came from."""
    file_note = loaded.config_file or f"{DEFAULT_CONFIG_FILE} (absent)"
    lines = [f"# effective configuration; config file: {file_note}"]
    for field in fields(Config):
        value = getattr(loaded.config, field.name)
        source = loaded.sources[field.name]
        if value is None and _BY_KEY[field.name].default is None:
            lines.append(f"# {field.name} is not set  # {source}")
        else:  # off where the default is on: "" keeps it off when this is read back as the file
            lines.append(f"{field.name} = {_toml_value(value)}  # {source}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(str(item)) for item in value) + "]"
    return json.dumps(str(value))  # a TOML basic string
