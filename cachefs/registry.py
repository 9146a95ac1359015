"""The registry of shares: ``$XDG_CONFIG_HOME/cachefs/shares.toml`` (or
``~/.config/cachefs/shares.toml``), one TOML table per share, as rclone keeps rclone.conf.

Owns: the file's place, its shape, reading it (``tomllib``) and writing it (a small writer
for the few shapes it holds: strings, booleans, numbers, lists of strings), and the rule
for a share's name. Must not touch: option parsing or mounting (``cli`` turns a share into
the arguments of ``cachefs mount``; nothing here knows what an option means).

    [projects]
    remote = "alice@fileserver:projects"
    mountpoint = "/home/alice/projects"
    pins = ["docs", "src/current"]

    [projects.options]            # the names of -o (cachefs mount's long options with _)
    identity = "/home/alice/.ssh/id_ed25519"
    cache_size = "20G"

    [projects.sync]               # the schedule: the sync_* options without "sync_"
    at_mount = true
    at_unmount = 30
    interval = 600
    idle = 60

The file is written whole to a temporary file and renamed over the old one (mode 0600,
its folder 0700): a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

#: a share's name: what ``cachefs mount NAME`` and a systemd instance (``cachefs@NAME``)
#: take; never a remote (no ':' or '/'); written quoted when it has a '.' (``_key``)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: the schedule's keys in the file and the mount options they stand for
SCHEDULE = {"at_mount": "sync_at_mount", "at_unmount": "sync_at_unmount",
            "interval": "sync_interval", "idle": "sync_idle"}

Value = str | bool | int | float


class RegistryError(Exception):
    """The registry cannot be read or written; the message says which file and why."""


@dataclass
class Share:
    name: str
    remote: str
    mountpoint: str
    #: -o names (``cache_size``, ``allow_other``) -> the text given, or True for a flag;
    #: the schedule's options (``sync_*``) are kept here too and written under ``sync``
    options: dict[str, Value] = field(default_factory=dict)
    #: paths relative to the mount point, pinned once the mount is up
    pins: list[str] = field(default_factory=list)


def is_share_name(text: str) -> bool:
    return NAME_RE.fullmatch(text) is not None


def registry_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cachefs" / "shares.toml"


def load(path: Path | None = None) -> dict[str, Share]:
    """The registered shares by name (none when the file does not exist)."""
    path = path or registry_path()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise RegistryError(f"{path}: {exc.strerror or exc}") from None
    shares = {}
    for name, table in data.items():
        shares[name] = _share(path, name, table)
    return shares


def _share(path: Path, name: str, table: object) -> Share:
    where = f"{path}: [{name}]"
    if not is_share_name(name):
        raise RegistryError(f"{where}: a share's name is letters, digits, '.', '_' and '-'")
    if not isinstance(table, dict):
        raise RegistryError(f"{where} must be a table")
    for key in ("remote", "mountpoint"):
        if not isinstance(table.get(key), str) or not table[key]:
            raise RegistryError(f"{where}: '{key}' is missing (a string)")
    unknown = set(table) - {"remote", "mountpoint", "options", "pins", "sync"}
    if unknown:
        raise RegistryError(f"{where}: unknown key {sorted(unknown)[0]!r} (remote, mountpoint, "
                            "options, pins, sync)")
    options: dict[str, Value] = {}
    for key, value in _table(where, table, "options").items():
        options[key] = _value(f"{where}.options.{key}", value)
    for key, value in _table(where, table, "sync").items():
        if key not in SCHEDULE:
            raise RegistryError(f"{where}.sync: unknown key {key!r} ({', '.join(SCHEDULE)})")
        options[SCHEDULE[key]] = _value(f"{where}.sync.{key}", value)
    pins = table.get("pins", [])
    if not isinstance(pins, list) or not all(isinstance(p, str) and p for p in pins):
        raise RegistryError(f"{where}: 'pins' must be a list of paths (strings)")
    return Share(name, table["remote"], table["mountpoint"], options, list(pins))


def _table(where: str, table: dict[str, object], key: str) -> dict[str, object]:
    value = table.get(key, {})
    if not isinstance(value, dict):
        raise RegistryError(f"{where}: '{key}' must be a table")
    return value


def _value(where: str, value: object) -> Value:
    if isinstance(value, (str, bool, int, float)):
        return value
    raise RegistryError(f"{where}: a string, a number or true/false, not {type(value).__name__}")


def save(shares: dict[str, Share], path: Path | None = None) -> None:
    """Write the registry whole (atomically, mode 0600)."""
    path = path or registry_path()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".shares.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(dumps(shares))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise RegistryError(f"{path}: {exc.strerror or exc}") from None


def dumps(shares: dict[str, Share]) -> str:
    lines = ["# cachefs shares: written by 'cachefs add' and 'cachefs remove'; may be edited",
             "# by hand (see docs/usage.md, \"Registered shares\")."]
    for name in sorted(shares):
        share = shares[name]
        table = _key(name)  # 'work.docs' quoted: bare, TOML reads it as nested tables
        lines += ["", f"[{table}]", f"remote = {_toml(share.remote)}",
                  f"mountpoint = {_toml(share.mountpoint)}"]
        if share.pins:
            lines.append(f"pins = [{', '.join(_toml(p) for p in share.pins)}]")
        options = {k: v for k, v in share.options.items() if k not in SCHEDULE.values()}
        schedule = {key: share.options[option] for key, option in SCHEDULE.items()
                    if option in share.options}
        for title, values in ((f"{table}.options", options), (f"{table}.sync", schedule)):
            if values:
                lines += ["", f"[{title}]"]
                lines += [f"{_key(k)} = {_toml(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    """A key as TOML reads it back as one key: bare when it may be, else quoted."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml(key)


def _toml(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RegistryError(f"not a finite number: {value}")
        return repr(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RegistryError(f"not UTF-8 text: {value!r}") from None
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
