"""The job and node files, as immutable, validated values.

The formats are the original distcrond's (see docs/architecture.md); every
field it had keeps its name and meaning, and every addition is optional.
Unknown fields are rejected, so that a typo ("comand") is an error that names
the field rather than a silently ignored setting.
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from distcrond.config.durations import format_duration, parse_duration

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MIN_INTERVAL = timedelta(milliseconds=100)
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024


def check_id(value: str) -> str:
    """A job or node id (its file name without .json): letters, digits, '.', '_', '-'."""
    if not ID_PATTERN.match(value):
        raise ValueError(
            "must start with a letter or digit and hold only letters, digits, '.', '_' and '-'"
        )
    return value


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("must be a duration string like '30s' or '1h30m'")
    if isinstance(value, (int, float)):
        # A bare number is seconds: what operators mean by "timeout": 30.
        if value < 0:
            raise ValueError("must not be negative")
        return timedelta(seconds=value)
    return parse_duration(value)


Duration = Annotated[
    timedelta,
    BeforeValidator(_duration),
    PlainSerializer(format_duration, return_type=str),
    Field(json_schema_extra={"type": "string", "examples": ["30s", "1h30m", "500ms"]}),
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Owner(_Frozen):
    name: str = ""
    email_address: str = ""


class Policy(_Frozen):
    """Where a job runs: on `any` one matching node, on `all` of them, or on N of them."""

    hosts: Literal["any", "all"] | Annotated[int, Field(ge=1)] = "any"
    roles: tuple[str, ...] = ()

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be 'any', 'all' or a positive count")
        if isinstance(v, str) and v.isdigit():
            return int(v)
        return v


def _check_timezone(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {v!r} (use an IANA name like 'Europe/Berlin')"
        ) from None
    return v


TimeZoneName = Annotated[str, AfterValidator(_check_timezone)]


# A time of day as the job files write it ("03:10", "03:10:00"), local to the schedule's
# zone: JSON Schema's "time" format is RFC 3339's, which requires an offset, so neither the
# files nor the API's answers (which omit it) would conform to it.
TIME_OF_DAY_SCHEMA = {
    "type": "string",
    "pattern": r"^\d{1,2}:\d{2}(:\d{2})?$",
    "examples": ["03:10", "03:10:00"],
}


class IntervalSchedule(_Frozen):
    """The original schedule: slots at reference + k*interval, re-aligned to the reference daily."""

    interval: Duration
    reference: Annotated[time, WithJsonSchema(TIME_OF_DAY_SCHEMA)] = time(0, 0)
    timezone: TimeZoneName = "UTC"

    @field_validator("reference", mode="before")
    @classmethod
    def _reference(cls, v: Any) -> Any:
        if isinstance(v, str):
            m = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", v.strip())
            if not m:
                raise ValueError("must be a time of day 'HH:MM' or 'HH:MM:SS'")
            h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
            if h > 23 or mi > 59 or s > 59:
                raise ValueError("must be a time of day between 00:00 and 23:59:59")
            return time(h, mi, s)
        return v

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: timedelta) -> timedelta:
        if v < MIN_INTERVAL:
            raise ValueError(f"must be at least {format_duration(MIN_INTERVAL)}")
        return v


class CronSchedule(_Frozen):
    """A cron expression of 5 fields, or 6 with seconds first, in `timezone` wall-clock time."""

    cron: str
    timezone: TimeZoneName = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from croniter import CroniterBadDateError, croniter

        fields = v.split()
        if len(fields) not in (5, 6):
            raise ValueError(f"must have 5 or 6 fields (6: seconds first), not {len(fields)}")
        if not croniter.is_valid(v, second_at_beginning=True):
            raise ValueError(f"{v!r} is not a valid cron expression")
        try:
            # A valid expression may name no real date ("0 0 30 2 *"): it would never run,
            # and the scheduler could not compute its next slot.
            croniter(v, datetime(2001, 3, 1), second_at_beginning=len(fields) == 6).get_next(
                datetime
            )
        except CroniterBadDateError:
            raise ValueError(f"{v!r} never matches a date (like February 30)") from None
        return " ".join(fields)


class EverySchedule(_Frozen):
    """Every `every` of elapsed time; `fuzzy`: at a stable offset inside it, from the job id."""

    every: Duration
    fuzzy: bool = False
    timezone: TimeZoneName = "UTC"

    @field_validator("every")
    @classmethod
    def _every(cls, v: timedelta) -> timedelta:
        if v < MIN_INTERVAL:
            raise ValueError(f"must be at least {format_duration(MIN_INTERVAL)}")
        return v


Schedule = IntervalSchedule | CronSchedule | EverySchedule
_SCHEDULE_KINDS: dict[str, type[BaseModel]] = {
    "interval": IntervalSchedule,
    "cron": CronSchedule,
    "every": EverySchedule,
}


class Retries(_Frozen):
    """After a failed attempt, `count` more, waiting `backoff` * 2**(n-1), at most `max_backoff`."""

    count: Annotated[int, Field(ge=0, le=100)] = 0
    backoff: Duration = timedelta(seconds=10)
    max_backoff: Duration = timedelta(minutes=10)


class Concurrency(StrEnum):
    FORBID = "forbid"
    ALLOW = "allow"
    REPLACE = "replace"


class MisfirePolicy(StrEnum):
    SKIP = "skip"
    RUN_ONCE = "run_once"
    RUN_ALL = "run_all"


class Misfire(_Frozen):
    """What happens to slots that fell due while no peer was leader."""

    policy: MisfirePolicy = MisfirePolicy.RUN_ONCE
    grace: Duration = timedelta(hours=1)


class Delivery(StrEnum):
    AT_MOST_ONCE = "at_most_once"
    AT_LEAST_ONCE = "at_least_once"


# Linux refuses to exec an argument or environment string longer than this
# (MAX_ARG_STRLEN, 32 pages), and no exec can carry a NUL byte: caught at load, a file
# with either is one bad file instead of a job whose every run fails.
MAX_ARG_BYTES = 128 * 1024


def _exec_string(value: str, what: str) -> None:
    if "\0" in value:
        raise ValueError(f"{what} holds a NUL byte, which no command can be given")
    size = len(value.encode("utf-8", "surrogateescape"))
    if size >= MAX_ARG_BYTES:
        raise ValueError(f"{what} is {size} bytes; the kernel takes at most {MAX_ARG_BYTES - 1}")


class JobSpec(_Frozen):
    """One job file. `id` is the file name without `.json`."""

    id: str
    description: str = ""
    owners: tuple[Owner, ...] = ()
    policy: Policy = Policy()
    schedule: Schedule
    shell: bool = False
    command: tuple[str, ...] | str
    timeout: Duration | None = None
    retries: Retries = Retries()
    concurrency: Concurrency = Concurrency.FORBID
    env: dict[str, str] = Field(default_factory=dict)
    working_dir: str | None = None
    enabled: bool = True
    max_output_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = DEFAULT_MAX_OUTPUT_BYTES
    misfire: Misfire = Misfire()
    delivery: Delivery = Delivery.AT_MOST_ONCE

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v)

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, v: Any) -> Any:
        # Pick the variant by its key, so that errors speak of that variant's fields only.
        if isinstance(v, dict):
            kinds = [k for k in ("interval", "cron", "every") if k in v]
            if len(kinds) != 1:
                raise ValueError("must have exactly one of 'interval', 'cron' or 'every'")
            return _SCHEDULE_KINDS[kinds[0]].model_validate(v)
        return v

    @field_validator("retries", mode="before")
    @classmethod
    def _retries(cls, v: Any) -> Any:
        return {"count": v} if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("misfire", mode="before")
    @classmethod
    def _misfire(cls, v: Any) -> Any:
        return {"policy": v} if isinstance(v, str) else v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if key.startswith("DISTCRON_"):
                raise ValueError(f"{key!r}: DISTCRON_* variables are set by distcrond")
            _exec_string(f"{key}={value}", f"the value of {key}")
        return v

    @field_validator("command")
    @classmethod
    def _command_matches_shell(
        cls, v: tuple[str, ...] | str, info: ValidationInfo
    ) -> tuple[str, ...] | str:
        if info.data.get("shell"):
            if not isinstance(v, str) or not v.strip():
                raise ValueError("with shell: true, command must be a non-empty string")
        else:
            if isinstance(v, str):
                raise ValueError(
                    'must be an argv list like ["/bin/echo", "hi"]; '
                    "set shell: true to run a string through /bin/sh"
                )
            if not v or not v[0]:
                raise ValueError("must be a non-empty argv list")
        for i, arg in enumerate((v,) if isinstance(v, str) else v):
            _exec_string(arg, "the command" if isinstance(v, str) else f"argument {i}")
        return v

    @property
    def argv(self) -> tuple[str, ...]:
        """The argv to execute: the command, or /bin/sh -c for shell jobs."""
        if isinstance(self.command, str):
            return ("/bin/sh", "-c", self.command)
        return self.command


class ConnectionType(StrEnum):
    LOCAL = "local"
    SSH = "ssh"


_FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}=?$")
_PUBLIC_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+=*( .*)?$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SSHOptions(_Frozen):
    """`connection_options` of an SSH node: the original's three fields, and optional ones.

    The host key must be known: pinned here (``ssh_host_key``: a public key line
    or a ``SHA256:`` fingerprint), or found in ``ssh_known_hosts_file`` (default:
    the daemon user's ``~/.ssh/known_hosts`` and ``/etc/ssh/ssh_known_hosts``).
    ``ssh_trust_on_first_use`` accepts an unknown host's key once and remembers
    it in the peer's state directory; a changed key is refused even then.
    """

    ssh_user: str
    ssh_host: str
    ssh_private_key_file: str
    ssh_known_hosts_file: str | None = None
    ssh_host_key: str | None = None
    ssh_trust_on_first_use: bool = False
    # The name of an environment variable of the daemon that holds the key's passphrase.
    ssh_key_passphrase_env: str | None = None
    connect_timeout: Duration = timedelta(seconds=10)
    # Runs at once on this node from one peer; more wait for a free slot.
    max_concurrent_runs: Annotated[int, Field(ge=1, le=1000)] = 16

    @field_validator("ssh_host")
    @classmethod
    def _host(cls, v: str) -> str:
        host, _, port = v.rpartition(":") if ":" in v else (v, "", "22")
        if not host:
            raise ValueError("must be 'host' or 'host:port'")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"port {port!r} is not a number from 1 to 65535")
        return v

    @field_validator("ssh_host_key")
    @classmethod
    def _host_key(cls, v: str | None) -> str | None:
        if v is not None and not (_FINGERPRINT.match(v) or _PUBLIC_KEY.match(v)):
            raise ValueError(
                "must be a public key line ('ssh-ed25519 AAAA...') or a fingerprint "
                "('SHA256:...', as ssh-keygen -lf prints it)"
            )
        return v

    @field_validator("ssh_key_passphrase_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(
                "must be an environment variable name (the variable holds the passphrase)"
            )
        return v

    @field_validator("connect_timeout")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v <= timedelta(0):
            raise ValueError("must be more than 0")
        return v

    @property
    def host(self) -> str:
        return self.ssh_host.rpartition(":")[0] if ":" in self.ssh_host else self.ssh_host

    @property
    def port(self) -> int:
        return int(self.ssh_host.rpartition(":")[2]) if ":" in self.ssh_host else 22


class NodeSpec(_Frozen):
    """One node file. `id` is the file name without `.json`."""

    id: str
    roles: tuple[str, ...] = ()
    connection_type: ConnectionType = ConnectionType.LOCAL
    connection_options: SSHOptions | None = None
    # A local node runs on the executing peer's own host; `peer` pins it to one peer.
    peer: str | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v)

    @model_validator(mode="after")
    def _options_match_type(self) -> NodeSpec:
        if self.connection_type is ConnectionType.SSH and self.connection_options is None:
            raise ValueError("connection_options: required when connection_type is 'ssh'")
        if self.connection_type is ConnectionType.LOCAL and self.connection_options is not None:
            raise ValueError("connection_options: only for connection_type 'ssh'")
        return self

    def matches(self, roles: tuple[str, ...]) -> bool:
        """True when the node has at least one of ``roles`` (or ``roles`` is empty)."""
        return not roles or any(r in self.roles for r in roles)
