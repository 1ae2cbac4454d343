"""comfy-dual settings.

Edit the UPPERCASE constants below (the names are the seed's), or leave this file alone and
put the same UPPERCASE names in a TOML file passed with ``--config``::

    MAX_RETRIES = 5
    [WORKFLOWS]
    HIGH = "/srv/workflows/wan22_high.json"
    [[COMFYUI_INSTANCES]]
    instance_id = "gpu0"
    host = "127.0.0.1"
    port = 8188
    job_types = ["HIGH"]

A value from the file replaces the constant, except the tables ``SINGLE_INSTANCE_CONFIG``
and ``WORKFLOWS``, which are updated key by key (``[[COMFYUI_INSTANCES]]`` replaces the
whole list). Command-line flags win over both. :func:`load_settings` checks everything and
returns one frozen :class:`Settings`; a wrong value raises ``BadConfig`` naming the key, the
value and what is allowed. Nothing here writes files or opens connections.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from statedir import StateDir
from statemachine.errors import BadConfig
from statemachine.plan import JobKind
from statemachine.planner import MIN_FRAMES_PER_CHUNK, SIZE_RULE, valid_size

# --- the settings a user edits ------------------------------------------------------------

ENABLE_DUAL_INSTANCE = True  # False: one server (SINGLE_INSTANCE_CONFIG) does every job

COMFYUI_INSTANCES = [
    {"instance_id": "high_priority", "host": "127.0.0.1", "port": 8188,
     "job_types": ["HIGH"], "max_concurrent": 2, "enabled": True},
    {"instance_id": "low_priority", "host": "127.0.0.1", "port": 8189,
     "job_types": ["LOW"], "max_concurrent": 2, "enabled": True},
]

SINGLE_INSTANCE_CONFIG = {"instance_id": "single", "host": "127.0.0.1", "port": 8188,
                          "job_types": ["HIGH", "LOW", "COMBINE"], "max_concurrent": 2,
                          "enabled": True}

MAX_RETRIES = 3             # retries after the first attempt
RETRY_DELAY = 5             # seconds before the first retry; doubles for each further one
RETRY_DELAY_MAX = 300       # ... but never more than this
FRAMES_PER_CHUNK = 101     # at least 5 (Wan renders 4n+1 frames)
# What one prompt file may ask for; a file over any limit is rejected with the limit named.
MAX_FRAMES = 100_000
MAX_CHUNKS = 1_000          # chunks of one video (each is three jobs)
MAX_PROMPT_CHARS = 10_000   # characters of the positive, and of the negative, prompt
MAX_FILE_BYTES = 1_048_576  # larger files are refused unread
DEFAULT_WIDTH = 832         # multiples of 16 (Wan)
DEFAULT_HEIGHT = 480
COMBINE_GATE = "batch"      # "batch": after the batch's renders; "global": after all renders
COMBINE_CONCURRENCY = 1
FALLBACK = True             # jobs of a DOWN instance's types may run on any UP instance
STATE_DIR = "./var"
INSTANCE_LOST_TIMEOUT = 120  # seconds DOWN before its jobs go back to ready
JOB_TIMEOUT = 7200          # seconds a render may run before it is interrupted and retried
QUEUE_TIMEOUT = 7500        # seconds a job may wait in a server's queue before it is moved
INTERRUPT_GRACE = 120       # seconds a server may take to let go of a prompt it was told to
                            # stop; past that it counts as DOWN (its jobs move) until it does
HEALTH_INTERVAL = 5         # seconds between health probes of an UP instance
PROBE_BACKOFF_MAX = 60      # longest wait between probes of a DOWN instance
REQUEST_TIMEOUT = 30        # HTTP read timeout, seconds
CONNECT_TIMEOUT = 3.05      # HTTP connect timeout, seconds
WORKFLOWS = {"HIGH": "workflows/demo/high.json", "LOW": "workflows/demo/low.json",
             "COMBINE": "workflows/demo/combine.json"}  # relative to the project dir
# How a job's input files (HIGH's latent, LOW's chunk video and reference frame, the
# combined video so far) reach the server that reads them. "http": the daemon downloads
# each with /view and uploads it with /upload/image; works whatever the servers share.
# "path": the servers share one output directory (start every ComfyUI with
# --output-directory ARTIFACT_DIR, or run them from one install) and read files in place.
ARTIFACT_TRANSFER = "http"
ARTIFACT_DIR = ""           # "path": that shared directory; "" means STATE_DIR/artifacts
# Stealing (off unless an instance lists "steal_types"): an instance whose own work has
# run out may take a ready job of a kind in its steal_types when that job would wait
# longer for its own instances than the model switches cost, e.g. a HIGH server helps
# with LOW jobs when LOW takes twice as long: steal_types = ["LOW"]. Run times and the
# switch cost are learned from the runs; JOB_DURATIONS (seconds per kind, e.g.
# {"HIGH" = 300, "LOW" = 600}) stands in until a kind has run, and a number of seconds
# for SWITCH_COST replaces the learned one.
JOB_DURATIONS: dict[str, float] = {}
SWITCH_COST: float | str = "learn"
# The status page, /api/status and Prometheus /metrics, read-only, served by the daemon:
# "HOST:PORT" ("[::1]:8787" for IPv6; port 0 picks a free one), "" for none. Anything but
# a loopback address lets every host that reaches this one see the farm's state.
WEB_ADDRESS = "127.0.0.1:8787"
# The event log: every SNAPSHOT_EVERY events (and at a clean stop) the daemon writes a
# snapshot of its state and starts a new log segment, so a restart replays at most that
# many events (100,000 take ~0.5 s here; a snapshot pauses the loop for a few ms per
# thousand batches it holds). LOG_RETENTION: 0 keeps every segment, the whole audit trail
# (`submit.py report` reads it); n >= 2 keeps the n newest snapshots and the segments after
# the oldest of them.
SNAPSHOT_EVERY = 100_000
LOG_RETENTION = 0

# --- the checked, frozen form -------------------------------------------------------------

JOB_TYPES = tuple(kind.value for kind in JobKind)
COMBINE_GATES = ("batch", "global")
ARTIFACT_TRANSFERS = ("http", "path")


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    """One ComfyUI server and the job kinds it takes."""

    instance_id: str
    host: str
    port: int
    job_types: frozenset[str]
    max_concurrent: int
    enabled: bool
    steal_types: frozenset[str] = frozenset()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def accepts(self, kind: str) -> bool:
        return str(getattr(kind, "value", kind)) in self.job_types


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, checked. ``instances`` holds only the ACTIVE servers: the enabled
    ``COMFYUI_INSTANCES`` in dual mode, ``SINGLE_INSTANCE_CONFIG`` in single mode.

    COMBINE rule: when no active instance lists "COMBINE" in its job_types (the seed lists
    only HIGH and LOW), every active instance accepts COMBINE jobs -- joining chunks is
    light work any server can do -- and "COMBINE" is added to each one's ``job_types`` here,
    so the rest of the code only ever asks ``instance.accepts(kind)``.
    """

    enable_dual_instance: bool
    instances: tuple[InstanceConfig, ...]
    max_retries: int
    retry_delay: float
    retry_delay_max: float
    frames_per_chunk: int
    max_frames: int
    max_chunks: int
    max_prompt_chars: int
    max_file_bytes: int
    default_width: int
    default_height: int
    combine_gate: str
    combine_concurrency: int
    fallback: bool
    state_dir: Path
    instance_lost_timeout: float
    job_timeout: float
    queue_timeout: float
    interrupt_grace: float
    health_interval: float
    probe_backoff_max: float
    request_timeout: float
    connect_timeout: float
    workflows: Mapping[str, str]
    artifact_transfer: str
    artifact_dir: Path
    job_durations: Mapping[str, float]
    switch_cost: float | None  # None: learned from the runs
    web_address: str = ""  # "" : no web server; see web_endpoint()
    snapshot_every: int = 100_000
    log_retention: int = 0


# --- single-value checks: (key, value) -> normalised value, or BadConfig ------------------


def _fail(key: str, value: Any, allowed: str) -> NoReturn:
    raise BadConfig(f"{key} = {value!r}: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(minimum: int, maximum: int | None = None) -> Callable[[str, Any], int]:
    if maximum is not None:
        rule = f"must be an integer from {minimum} to {maximum}"
    else:
        rule = "must be a positive integer" if minimum == 1 else f"must be an integer >= {minimum}"

    def check(key: str, value: Any) -> int:
        if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
            _fail(key, value, rule)
        return value
    return check


def _seconds(key: str, value: Any) -> float:
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value <= 0:
        _fail(key, value, "must be a positive number of seconds")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(key, value, "must be true or false")
    return value


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in allowed:
            _fail(key, value, f"must be one of {', '.join(map(repr, allowed))}")
        return value
    return check


def _size(key: str, value: Any) -> int:
    if not _is_int(value) or not valid_size(value):
        _fail(key, value, f"must be {SIZE_RULE}")
    return value


def _path(key: str, value: Any) -> Path:
    if not isinstance(value, str | Path) or not str(value).strip():
        _fail(key, value, "must be a non-empty path")
    return Path(value).expanduser()


def _optional_path(key: str, value: Any) -> Path | None:
    """A path, or None for "" (TOML has no null): the caller derives the default."""
    if isinstance(value, str) and not value.strip():
        return None
    return _path(key, value)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(key, value, "must be a non-empty string")
    return value


def _kinds(*, empty: bool) -> Callable[[str, Any], frozenset[str]]:
    """A list of job kinds (possibly empty if ``empty``)."""
    allowed = ", ".join(map(repr, JOB_TYPES))

    def check(key: str, value: Any) -> frozenset[str]:
        if isinstance(value, str) or not isinstance(value, Sequence) or not (value or empty):
            _fail(key, value, f"must be a {'' if empty else 'non-empty '}list of {allowed}")
        unknown = [v for v in value if v not in JOB_TYPES]
        if unknown:
            _fail(key, value, f"unknown job type {unknown[0]!r}; allowed: {allowed}")
        return frozenset(value)
    return check


def _job_durations(key: str, value: Any) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        _fail(key, value, f"must be a table of job kind ({', '.join(JOB_TYPES)}) -> seconds")
    _reject_unknown(value, JOB_TYPES, f"{key}.")
    return MappingProxyType({kind: _seconds(f"{key}.{kind}", v) for kind, v in value.items()})


def _switch_cost(key: str, value: Any) -> float | None:
    if value == "learn":
        return None
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value < 0:
        _fail(key, value, '"learn", or the seconds a server takes to change models (>= 0)')
    return float(value)


def _workflows(key: str, value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        _fail(key, value, f"must be a table of job kind ({', '.join(JOB_TYPES)}) -> file path")
    _reject_unknown(value, JOB_TYPES, f"{key}.")
    missing = [kind for kind in JOB_TYPES if kind not in value]
    if missing:
        _fail(key, dict(value), f"needs a workflow for {', '.join(missing)}")
    return MappingProxyType({kind: _text(f"{key}.{kind}", value[kind]) for kind in JOB_TYPES})


def _instance_id(key: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        _fail(key, value, "must be a name of letters, digits, '_', '.' or '-'")
    return value


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _host(key: str, value: Any) -> str:
    """A host name, an IPv4 address, or an IPv6 address (bracketed or not; kept without
    the brackets, which ``InstanceConfig.url`` adds): nothing a URL could misread."""
    text = _text(key, value)
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if ":" in bare and "%" not in bare:  # a zone (fe80::1%eth0) would need URL escaping
        with contextlib.suppress(ValueError):
            return str(ipaddress.IPv6Address(bare))
    elif bare == text and _is_host_name(text):
        return text
    _fail(key, value, "must be a host name, an IPv4 address or an IPv6 address only, "
                      "without scheme, port or path, e.g. '127.0.0.1', 'gpu-box.lan' or "
                      "'[::1]'")


def _is_host_name(text: str) -> bool:
    labels = text.removesuffix(".").split(".")
    if len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return False
    if all(label.isdigit() for label in labels):  # looks like an address: must be one
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            return False
    return True


def web_endpoint(address: str) -> tuple[str, int] | None:
    """``"HOST:PORT"`` (``"[::1]:PORT"``) as (host, port); None for ""; ValueError else."""
    if not address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT with a port from 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        return str(ipaddress.IPv6Address(host[1:-1])), int(port)
    if ":" in host or not _is_host_name(host):
        raise ValueError("expected a host name, an IPv4 address or a bracketed IPv6 address")
    return host, int(port)


def _web_address(key: str, value: Any) -> str:
    if not isinstance(value, str):
        _fail(key, value, 'must be "HOST:PORT", or "" for no web server')
    try:
        web_endpoint(value.strip())
    except ValueError as exc:
        _fail(key, value, f'{exc}, e.g. "127.0.0.1:8787" or "[::1]:8787"; "" for none')
    return value.strip()


def _retention(key: str, value: Any) -> int:
    if not _is_int(value) or value < 0 or value == 1:
        _fail(key, value, "must be 0 (keep every log segment) or a number of snapshots >= 2 "
                          "(one to fall back on if the newest is damaged)")
    return value


_INSTANCE_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "instance_id": _instance_id, "host": _host, "port": _int_in(1, 65535),
    "job_types": _kinds(empty=False), "max_concurrent": _int_in(1), "enabled": _flag,
    "steal_types": _kinds(empty=True)}
_INSTANCE_DEFAULTS = {"max_concurrent": 2, "enabled": True, "steal_types": []}


def _instance(key: str, value: Any) -> InstanceConfig:
    if not isinstance(value, Mapping):
        _fail(key, value, f"must be a table with keys {', '.join(_INSTANCE_CHECKS)}")
    _reject_unknown(value, tuple(_INSTANCE_CHECKS), f"{key}.")
    fields = {**_INSTANCE_DEFAULTS, **value}
    missing = [name for name in _INSTANCE_CHECKS if name not in fields]
    if missing:
        _fail(key, dict(value), f"missing {', '.join(missing)}")
    inst = InstanceConfig(**{name: check(f"{key}.{name}", fields[name])
                             for name, check in _INSTANCE_CHECKS.items()})
    both = sorted(inst.steal_types & inst.job_types)
    if both:
        _fail(f"{key}.steal_types", sorted(inst.steal_types),
              f"{both[0]!r} is in its job_types already: list there only the kinds it may "
              f"take from other instances")
    return inst


def _instance_list(key: str, value: Any) -> tuple[InstanceConfig, ...]:
    if isinstance(value, str | Mapping) or not isinstance(value, Sequence):
        _fail(key, value, "must be a list of instance tables ([[COMFYUI_INSTANCES]] in TOML)")
    return tuple(_instance(f"{key}[{i}]", item) for i, item in enumerate(value))


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "ENABLE_DUAL_INSTANCE": _flag, "COMFYUI_INSTANCES": _instance_list,
    "SINGLE_INSTANCE_CONFIG": _instance, "MAX_RETRIES": _int_in(0),
    "RETRY_DELAY": _seconds, "RETRY_DELAY_MAX": _seconds,
    "FRAMES_PER_CHUNK": _int_in(MIN_FRAMES_PER_CHUNK), "MAX_FRAMES": _int_in(1),
    # bounds that keep one batch's event-log line under 1 MiB and its jobs in memory
    "MAX_CHUNKS": _int_in(1, 100_000), "MAX_PROMPT_CHARS": _int_in(1, 50_000),
    "MAX_FILE_BYTES": _int_in(1, 64 << 20),
    "DEFAULT_WIDTH": _size, "DEFAULT_HEIGHT": _size,
    "COMBINE_GATE": _choice(*COMBINE_GATES), "COMBINE_CONCURRENCY": _int_in(1),
    "FALLBACK": _flag, "STATE_DIR": _path, "INSTANCE_LOST_TIMEOUT": _seconds,
    "JOB_TIMEOUT": _seconds, "QUEUE_TIMEOUT": _seconds, "INTERRUPT_GRACE": _seconds,
    "HEALTH_INTERVAL": _seconds, "PROBE_BACKOFF_MAX": _seconds, "REQUEST_TIMEOUT": _seconds,
    "CONNECT_TIMEOUT": _seconds, "WORKFLOWS": _workflows,
    "ARTIFACT_TRANSFER": _choice(*ARTIFACT_TRANSFERS), "ARTIFACT_DIR": _optional_path,
    "JOB_DURATIONS": _job_durations, "SWITCH_COST": _switch_cost,
    "WEB_ADDRESS": _web_address, "SNAPSHOT_EVERY": _int_in(1), "LOG_RETENTION": _retention,
}


def _reject_unknown(table: Mapping[str, Any], known: Sequence[str], prefix: str = "",
                    where: str = "") -> None:
    for name in table:
        if name in known:
            continue
        folded = {k.casefold(): k for k in known}
        close = difflib.get_close_matches(str(name).casefold(), folded, n=1)
        hint = f"did you mean {folded[close[0]]!r}?" if close else f"known: {', '.join(known)}"
        raise BadConfig(f"unknown setting {prefix}{name}{where}; {hint}")


# --- checks across settings ---------------------------------------------------------------


def _active_instances(values: Mapping[str, Any]) -> tuple[InstanceConfig, ...]:
    if values["ENABLE_DUAL_INSTANCE"]:
        listed = values["COMFYUI_INSTANCES"]
        _check_unique(listed)
        active = tuple(i for i in listed if i.enabled)
        fix = ("ENABLE_DUAL_INSTANCE = True but no COMFYUI_INSTANCES entry is enabled; "
               "enable or add one, or set ENABLE_DUAL_INSTANCE = False")
    else:
        active = tuple(i for i in (values["SINGLE_INSTANCE_CONFIG"],) if i.enabled)
        fix = ("ENABLE_DUAL_INSTANCE = False but SINGLE_INSTANCE_CONFIG.enabled = False; "
               "set it to true")
    if not active:
        raise BadConfig(f"no active instance: {fix}")
    return active


def _check_unique(instances: Sequence[InstanceConfig]) -> None:
    """Each enabled entry needs its own instance_id and its own host:port."""
    enabled = [(i, inst) for i, inst in enumerate(instances) if inst.enabled]
    clash = _first_clash((i, inst.instance_id) for i, inst in enabled)
    if clash:
        first, again = clash
        _fail(f"COMFYUI_INSTANCES[{again}].instance_id", instances[again].instance_id,
              f"already used by COMFYUI_INSTANCES[{first}]; each active instance needs its "
              f"own id")
    clash = _first_clash((i, (inst.host.lower(), inst.port)) for i, inst in enabled)
    if clash:
        first, again = clash
        inst = instances[again]
        _fail(f"COMFYUI_INSTANCES[{again}].port", inst.port,
              f"COMFYUI_INSTANCES[{first}] already uses {inst.host}:{inst.port}; give each "
              f"active instance its own host:port, or disable one")


def _first_clash(items: Iterable[tuple[int, Any]]) -> tuple[int, int] | None:
    """(index first seen, index seen again) for the first repeated value, else None."""
    seen: dict[Any, int] = {}
    for index, value in items:
        first = seen.setdefault(value, index)
        if first != index:
            return first, index
    return None


def _with_combine(instances: tuple[InstanceConfig, ...]) -> tuple[InstanceConfig, ...]:
    """The COMBINE rule (see ``Settings``); an instance does not steal what it takes."""
    if any("COMBINE" in inst.job_types for inst in instances):
        return instances
    return tuple(replace(inst, job_types=inst.job_types | {"COMBINE"},
                         steal_types=inst.steal_types - {"COMBINE"}) for inst in instances)


def _check_coverage(instances: Sequence[InstanceConfig], fallback: bool) -> None:
    for kind in JOB_TYPES:
        if fallback or any(inst.accepts(kind) for inst in instances):
            continue
        active = "; ".join(f"{inst.instance_id}: {', '.join(sorted(inst.job_types))}"
                           for inst in instances)
        raise BadConfig(f"no active instance accepts {kind} jobs (active: {active}) and "
                        f"FALLBACK = False: add {kind!r} to the job_types of an instance, "
                        f"or set FALLBACK = True")


def _check_not_below(values: Mapping[str, Any], key: str, floor_key: str) -> None:
    if values[key] < values[floor_key]:
        _fail(key, values[key], f"must be at least {floor_key} ({values[floor_key]!r})")


def _settings(values: Mapping[str, Any]) -> Settings:
    instances = _with_combine(_active_instances(values))
    _check_coverage(instances, values["FALLBACK"])
    _check_not_below(values, "RETRY_DELAY_MAX", "RETRY_DELAY")
    _check_not_below(values, "PROBE_BACKOFF_MAX", "HEALTH_INTERVAL")
    plain = {key.lower(): value for key, value in values.items()
             if key not in ("COMFYUI_INSTANCES", "SINGLE_INSTANCE_CONFIG")}
    if plain["artifact_dir"] is None:
        plain["artifact_dir"] = StateDir(values["STATE_DIR"]).artifacts
    return Settings(instances=instances, **plain)


# --- loading ------------------------------------------------------------------------------


def load_settings(config_file: Path | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """The constants above, then ``config_file`` (TOML), then ``overrides``, all checked.

    ``overrides`` uses the same UPPERCASE names (the CLI flags map onto them).
    """
    raw = {key: copy.deepcopy(globals()[key]) for key in _CHECKS}
    origin = dict.fromkeys(raw, "config.py")
    if config_file is not None:
        _merge(raw, origin, _read_toml(Path(config_file)), str(config_file))
    if overrides:
        _merge(raw, origin, overrides, "overrides")
    values = {}
    for key, check in _CHECKS.items():
        try:
            values[key] = check(key, raw[key])
        except BadConfig as exc:
            raise BadConfig(f"{exc} (set in {origin[key]})") from None
    return _settings(values)


def _merge(raw: dict[str, Any], origin: dict[str, str], updates: Mapping[str, Any],
           source: str) -> None:
    """Tables update the table they override key by key; anything else replaces."""
    _reject_unknown(updates, tuple(_CHECKS), where=f" in {source}")
    for key, value in updates.items():
        base = raw[key]
        both_tables = isinstance(base, Mapping) and isinstance(value, Mapping)
        raw[key] = {**base, **value} if both_tables else value
        origin[key] = source


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise BadConfig(f"config file {path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise BadConfig(f"config file {path}: not UTF-8 (bad byte at offset {exc.start})") \
            from None
    except tomllib.TOMLDecodeError as exc:
        raise BadConfig(_toml_error(path, str(exc))) from None
    except (RecursionError, ValueError) as exc:  # nested too deep, a number too long
        raise BadConfig(f"config file {path}: cannot be read: "
                        f"{type(exc).__name__}: {exc}") from None


def _toml_error(path: Path, message: str) -> str:
    """Name the file, line and column; tomllib puts the place at the end of its message."""
    where = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if where is None:
        return f"config file {path}: TOML syntax error: {message}"
    line, column = where.groups()
    return f"config file {path}, line {line}, column {column}: TOML syntax error: " \
           f"{message[: where.start()]}"


# --- command line -------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE, --dual-instance | --single-instance, --state-dir DIR."""
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML file with settings (the UPPERCASE names of config.py)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dual-instance", dest="dual_instance", action="store_const",
                      const=True, help="use COMFYUI_INSTANCES (ENABLE_DUAL_INSTANCE = True)")
    mode.add_argument("--single-instance", dest="dual_instance", action="store_const",
                      const=False, help="use SINGLE_INSTANCE_CONFIG for every job")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="where the event log, spool and outputs live (STATE_DIR)")


def settings_from_args(ns: argparse.Namespace) -> Settings:
    """Settings from a namespace parsed with :func:`add_cli_arguments`'s options."""
    overrides: dict[str, Any] = {}
    if ns.dual_instance is not None:
        overrides["ENABLE_DUAL_INSTANCE"] = ns.dual_instance
    if ns.state_dir is not None:
        overrides["STATE_DIR"] = ns.state_dir
    return load_settings(ns.config, overrides)
