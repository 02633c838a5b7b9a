"""Config sources and their precedence: flags > environment > TOML file > defaults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Receiver

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from cis490_reconcile import config, preflight
from cis490_reconcile.config import ConfigError


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "reconcile.toml"
    toml.write_text('min_age = 60\nlock_timeout = 5\nlog_level = "debug"\nmax_read_rate = "10M"\n')
    env = {"CIS490_RECONCILE_LOCK_TIMEOUT": "7", "CIS490_RECONCILE_LOG_LEVEL": "warning"}
    loaded = config.load({"log_level": "error"}, toml, env)
    cfg = loaded.config
    assert (cfg.min_age, cfg.lock_timeout, cfg.log_level) == (60.0, 7.0, "error")
    assert cfg.max_read_rate == 10 << 20
    assert cfg.interval is None
    assert loaded.sources["min_age"] == str(toml)
    assert loaded.sources["lock_timeout"] == "environment"
    assert loaded.sources["log_level"] == "flag"
    assert loaded.sources["index"] == "default"


def test_the_environment_names_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "other.toml"
    toml.write_text("interval = 300\n")
    loaded = config.load({}, None, {"CIS490_RECONCILE_CONFIG": str(toml)})
    assert loaded.config.interval == 300.0 and loaded.config_file == toml


def test_a_missing_default_file_is_fine_a_missing_named_file_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    assert config.load({}, None, {}).config_file is None
    with pytest.raises(ConfigError, match=r"config file .*named.toml: no such file"):
        config.load({}, tmp_path / "named.toml", {})


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("min_agee = 3\n", {}, r"^config file .*reconcile.toml: unknown setting 'min_agee'"),
        ("min_age = -3\n", {}, r"config file .*reconcile.toml: min_age = -3: expected a finite number"),
        ("min_age = [\n", {}, r"not valid TOML"),
        ("[paths]\nindex = 'x'\n", {}, r"unexpected table \[paths\]"),
        ("", {"CIS490_RECONCILE_MIN_AEG": "1"}, r"unknown variable CIS490_RECONCILE_MIN_AEG"),
        ("", {"CIS490_RECONCILE_MAX_READ_RATE": "fast"}, r"CIS490_RECONCILE_MAX_READ_RATE='fast': expected"),
        ("log_level = 3\n", {}, r"log_level = 3: expected one of debug"),
        ("allow_root = 'maybe'\n", {}, r"expected true or false"),
    ],
)
def test_bad_sources_name_themselves(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    toml = tmp_path / "reconcile.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load({}, toml, env)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("50M", 50 << 20),
        ("50MiB", 50 << 20),
        ("1.5G", 3 << 29),
        ("65536", 65536),
        (0, None),
        ("0", None),
        ("", None),
    ],
)
def test_read_rates(raw: object, expected: int | None) -> None:
    assert config.build({"max_read_rate": raw}).max_read_rate == expected


@pytest.mark.parametrize("raw", ["1K", "-5M", "5X", " ", True, "inf"])
def test_bad_read_rates(raw: object) -> None:
    with pytest.raises(ConfigError, match="max_read_rate"):
        config.build({"max_read_rate": raw})


def test_interval_zero_switches_the_loop_off() -> None:
    assert config.build({"interval": "0"}).interval is None
    assert config.build({"interval": "2.5"}).interval == 2.5


# a value for every optional setting (its field may be None, or, for the list, be empty)
OPTIONAL = {
    "lock_file": '"/srv/receiver.lock"',
    "host": '"h1"',
    "interval": "60",
    "max_read_rate": '"50M"',
    "workers": "2",
    "state_dir": '"/srv/state"',
    "full_every": "600",
    "metrics_file": '"/srv/reconcile.prom"',
    "quarantine_dir": '"/srv/quarantine"',
    "retention": '"30d"',
    "zstd_dictionaries": '["/srv/fleet.dict"]',
}


def _config(tmp_path: Path, text: str, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    toml = tmp_path / "reconcile.toml"
    toml.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "cis490_reconcile", "config", "--config", str(toml), *flags],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=30,
    )


@pytest.mark.parametrize("source", ["flag", "environment", "file"])
@pytest.mark.parametrize("key", sorted(OPTIONAL))
def test_an_empty_value_switches_an_optional_setting_off_from_every_source(
    tmp_path: Path, key: str, source: str
) -> None:
    """README: "" switches an optional setting off. It did not for lock_file,
    host, max_read_rate and workers (exit 2), so a flag or the environment
    could not undo what the file set; the file sets each one here."""
    assert {s.key for s in config.SETTINGS if s.default in (None, ())} <= set(OPTIONAL)
    flags = (f"--{key.replace('_', '-')}", "") if source == "flag" else ()
    env = {f"CIS490_RECONCILE_{key.upper()}": ""} if source == "environment" else {}
    value = '""' if source == "file" else OPTIONAL[key]
    proc = _config(tmp_path, f"{key} = {value}\n", *flags, **env)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if f" {key} " in f" {line}")
    default = next(s.default for s in config.SETTINGS if s.key == key)
    off = f"# {key} is not set" if default is None else f"{key} = []" if default == () else f'{key} = ""'
    assert line.startswith(off) and line.endswith(
        f"# {tmp_path / 'reconcile.toml'}" if source == "file" else f"# {source}"
    ), line
    again = _config(tmp_path, proc.stdout)  # what `config` prints, read back as the file, keeps it off
    assert again.returncode == 0 and f"\n{off} " in again.stdout, again.stdout


@pytest.mark.parametrize(
    ("key", "source"),
    [
        (s.key, source)
        for s in config.SETTINGS
        if s.key not in OPTIONAL
        for source in ("flag", "environment", "file")
        if not (s.is_switch and source == "flag")  # a switch flag takes no value
    ],
)
def test_an_empty_value_is_refused_for_a_setting_that_cannot_be_off(
    tmp_path: Path, key: str, source: str
) -> None:
    setting = next(s for s in config.SETTINGS if s.key == key)
    flags = (f"{setting.flag}=",) if source == "flag" else ()
    env = {f"CIS490_RECONCILE_{key.upper()}": ""} if source == "environment" else {}
    proc = _config(tmp_path, f'{key} = ""\n' if source == "file" else "", *flags, **env)
    assert (proc.returncode, proc.stdout, proc.stderr.count("\n")) == (2, "", 1), proc.stderr
    assert "''" in proc.stderr and "expected" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("min_agee = 3\n", "unknown setting 'min_agee'"),
        ('"min\\nage" = 3\n', "unknown setting 'min\\nage'"),  # a quoted key with a newline: still one line
        ("min_age = 'soon'\n", "min_age = 'soon': expected a number of seconds"),
        ("min_age = [\n", "not valid TOML"),
        ("[paths]\nindex = 'x'\n", "unexpected table [paths]"),
        ('["pa\\nths"]\nindex = "x"\n', "unexpected table [pa\\nths]"),
    ],
)
def test_every_error_about_the_file_names_it_alike(tmp_path: Path, text: str, says: str) -> None:
    """An unknown key was "X: unknown setting", where a bad value was
    "config file X: ..."."""
    proc = _config(tmp_path, text)
    assert (proc.returncode, proc.stdout, proc.stderr.count("\n")) == (2, "", 1), proc.stderr
    assert proc.stderr.startswith(
        f"cis490-reconcile: error: config file {tmp_path / 'reconcile.toml'}: {says}"
    )


def test_config_command_prints_toml_with_sources(receiver: Receiver, tmp_path: Path) -> None:
    toml = tmp_path / "reconcile.toml"
    toml.write_text(f'episodes_root = "{receiver.episodes}"\nmin_age = 42\n')
    proc = subprocess.run(
        [sys.executable, "-m", "cis490_reconcile", "config", "--config", str(toml), "--lock-timeout", "9"],
        capture_output=True,
        text=True,
        env={"CIS490_RECONCILE_INTERVAL": "600", "PATH": "/usr/bin:/bin"},
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    effective = tomllib.loads(proc.stdout)  # what it prints is itself a valid config file
    assert effective["episodes_root"] == str(receiver.episodes)
    assert (effective["min_age"], effective["lock_timeout"], effective["interval"]) == (42.0, 9.0, 600.0)
    lines = {line.split(" =")[0]: line for line in proc.stdout.splitlines()}
    assert lines["min_age"].endswith(f"# {toml}")
    assert lines["lock_timeout"].endswith("# flag")
    assert lines["interval"].endswith("# environment")
    assert lines["index"].endswith("# default")
    assert "# host is not set  # default" in proc.stdout
    config.build(effective)  # and it round-trips through the parser


def _pass_with_config(receiver: Receiver, path: str) -> subprocess.CompletedProcess[str]:
    """A pass on the store, with `--config path`."""
    argv = [*receiver.argv("--once"), "--config", path]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_bad_config_file_is_one_line_and_exit_2(receiver: Receiver, tmp_path: Path) -> None:
    toml = tmp_path / "reconcile.toml"
    toml.write_text("min_age = 'soon'\n")
    proc = _pass_with_config(receiver, str(toml))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert "min_age = 'soon': expected a number of seconds" in proc.stderr


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "argument --config: an empty path; name a TOML file"),  # not ".", a directory
        ("new\nline.toml", "config file {tmp}/new\\x0aline.toml: no such file"),
    ],
)
def test_a_config_path_that_is_empty_or_holds_a_newline_is_one_line(
    receiver: Receiver, tmp_path: Path, name: str, says: str
) -> None:
    path = str(tmp_path / name) if name else ""
    proc = _pass_with_config(receiver, path)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"cis490-reconcile: error: {says.format(tmp=tmp_path)}\n"


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "symlink to a device", "over 1 MiB"])
def test_a_config_file_that_is_not_a_small_regular_file_is_one_line_and_exit_2(
    receiver: Receiver, tmp_path: Path, kind: str
) -> None:
    """A FIFO nobody writes used to hang the pass in open() for ever, and
    /dev/zero (also through a symlink) was read until memory ran out."""
    toml = tmp_path / "reconcile.toml"
    if kind == "fifo":
        os.mkfifo(toml)
    elif kind == "directory":
        toml.mkdir()
    elif kind == "device":
        toml = Path("/dev/zero")
    elif kind == "symlink to a device":
        toml.symlink_to("/dev/zero")
    else:
        toml.write_text("# a comment\n" * (1 << 17))
    proc = _pass_with_config(receiver, str(toml))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.count("\n") == 1
    why = "larger than 1048576 bytes" if kind == "over 1 MiB" else "not a regular file"
    assert f"config file {toml}: {why}" in proc.stderr, proc.stderr


HUGE = "1" + "0" * 400  # a TOML integer beyond any float


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"min_age = {HUGE}\n", "min_age = 1000"),
        (f"retention = {HUGE}\n", "retention = 1000"),
        ('lock_file = "a\\u0000b"\n', "lock_file = 'a\\x00b': expected a path"),
        ('quarantine_dir = "a\\u0000b"\n', "quarantine_dir = 'a\\x00b': expected a path"),
        ('metrics_file = "a\\u0000b"\n', "metrics_file = 'a\\x00b': expected a path"),
        ("interval = 1e10\n", "interval = 10000000000.0: expected at most"),  # past select()'s time_t
        ('retention = "1e30"\n', "retention = '1e30': expected at most"),  # a cutoff no float holds whole
    ],
)
def test_values_the_system_cannot_take_are_one_line_and_exit_2(
    receiver: Receiver, tmp_path: Path, text: str, message: str
) -> None:
    receiver.tarball("h1", "a")
    receiver.append_row(receiver.receiver_row("h1", "a"))
    receiver.append_row({**receiver.receiver_row("h1", "a"), "episode_id": "gone"})  # an orphan to count
    toml = tmp_path / "reconcile.toml"
    toml.write_text(text)
    once = () if text.startswith("interval") else ("--once",)
    proc = subprocess.run(
        [*receiver.argv(*once), "--config", str(toml)], capture_output=True, text=True, timeout=30
    )
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stdout
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", [None, "status", "config"])
@pytest.mark.parametrize("flag", ["--index", "--episodes-root", "--zstd-dictionaries"])
def test_a_path_not_in_utf8_is_one_line_and_exit_2(
    receiver: Receiver, flag: str, command: str | None
) -> None:
    """The state database keeps paths as text: a name with a byte that is
    not UTF-8 (a surrogate escape here) cannot be stored there, and
    `config` could not print it as TOML. Every path setting, lists too."""
    bad = receiver.root / "not-utf8-\udcff"  # b"not-utf8-\xff" on the command line
    bad.mkdir() if flag == "--episodes-root" else bad.touch()
    argv = receiver.argv(*(() if command else ("--once",)), flag, str(bad), command=command)
    proc = subprocess.run([*argv, "--state-dir", str(receiver.root)], capture_output=True, timeout=30)
    assert (proc.returncode, proc.stdout) == (2, b""), proc.stdout
    assert proc.stderr.count(b"\n") == 1 and b"expected a path" in proc.stderr, proc.stderr


def test_config_file_drives_a_pass(receiver: Receiver, tmp_path: Path) -> None:
    receiver.tarball("h1", "a")
    toml = tmp_path / "reconcile.toml"
    toml.write_text(f'episodes_root = "{receiver.episodes}"\nindex = "{receiver.index}"\nmin_age = 0\n')
    proc = subprocess.run(
        [sys.executable, "-m", "cis490_reconcile", "--once", "--config", str(toml)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert receiver.keys() == [("h1", "a")]


@pytest.mark.parametrize(("raw", "expected"), [("128M", 128 << 20), ("2G", 2 << 30), ("8M", 8 << 20)])
def test_max_window(raw: str, expected: int) -> None:
    assert config.build({"max_window": raw}).max_window == expected


@pytest.mark.parametrize("raw", ["4M", "3G", "big", "0"])
def test_bad_max_window(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"max_window .*: expected a zstd window size"):
        config.build({"max_window": raw})


def test_zstd_dictionaries_are_checked_at_start(receiver: Receiver, tmp_path: Path) -> None:
    good = tmp_path / "fleet.dict"
    good.write_bytes((0xEC30A437).to_bytes(4, "little") + (77).to_bytes(4, "little") + bytes(100))
    raw = tmp_path / "raw.dict"
    raw.write_bytes(b"just some bytes a raw-content dictionary would hold")
    assert config.build({"zstd_dictionaries": f"{good}, "}).zstd_dictionaries == (good,)
    assert config.build({"zstd_dictionaries": [str(good)]}).zstd_dictionaries == (good,)
    assert preflight.load_dictionaries((good,)) == {77: good.read_bytes()}
    for paths, message in [
        (str(raw), "not a zstd dictionary"),
        (str(tmp_path / "absent.dict"), "No such file"),
        (f"{good},{good}", "a second dictionary with id 77"),
    ]:
        proc = subprocess.run(
            [*receiver.argv("--once"), "--zstd-dictionaries", paths],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 2 and proc.stdout == ""
        assert (
            proc.stderr.startswith("cis490-reconcile: error: --zstd-dictionaries ") and message in proc.stderr
        )
        assert proc.stderr.count("\n") == 1
