"""Reading the jobs and nodes directories into one validated, immutable config.

A job is ``<jobs_dir>/<id>.json`` and a node ``<nodes_dir>/<id>.json``: the id
is the file name without ``.json``. Only regular ``*.json`` files count (a
symlink to one counts); hidden files, editor temp files (``*~``, ``.#*``,
``*.swp``) and subdirectories are ignored.

Bad input never raises: every problem becomes a :class:`ConfigError` (file,
field, reason). A file that fails keeps the last good version of its job or
node in the config while its error is reported; a removed file drops its
entry; a missing directory is an error and yields no entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from distcrond.config.models import ID_PATTERN, JobSpec, NodeSpec

if TYPE_CHECKING:
    from distcrond.config.tokens import TokenTable

log = logging.getLogger("distcrond.config")

M = TypeVar("M", bound=BaseModel)

ID_FIELD_REASON = "the id is the file name; remove this field"
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")

# Readable wording for the unions of the models, by dotted field; pydantic's own
# would list one message per union member ("Input should be a valid tuple", ...).
_UNION_REASONS = {
    "schedule": "must be an object with exactly one of 'interval', 'cron' or 'every'",
    "command": 'must be an argv list of strings like ["/bin/echo", "hi"], '
    "or a string with shell: true",
    "policy.hosts": "must be 'any', 'all' or a positive count of hosts",
}


@dataclass(frozen=True)
class ConfigError:
    """One problem with one job or node file (or directory).

    ``field`` is a dotted path into the file ("schedule.interval",
    "owners.0.name"), or "" when the problem is the whole file.
    """

    file: str
    field: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "field": self.field, "reason": self.reason}

    def __str__(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else self.file
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class LoadedConfig:
    """The jobs and nodes in force, the errors of the files that failed, and a digest.

    ``digest`` is a sha256 over the canonical JSON of the jobs and nodes (not the
    errors): peers that loaded the same definitions have the same digest.
    """

    jobs: Mapping[str, JobSpec] = field(default_factory=lambda: types.MappingProxyType({}))
    nodes: Mapping[str, NodeSpec] = field(default_factory=lambda: types.MappingProxyType({}))
    errors: tuple[ConfigError, ...] = ()
    digest: str = ""
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # The API tokens in force (--api-tokens), None without a tokens file. Not in the digest
    # nor in what a peer publishes: they are this peer's own.
    tokens: TokenTable | None = None

    @classmethod
    def build(
        cls,
        jobs: Mapping[str, JobSpec],
        nodes: Mapping[str, NodeSpec],
        errors: Sequence[ConfigError] = (),
        loaded_at: datetime | None = None,
        tokens: TokenTable | None = None,
    ) -> LoadedConfig:
        """A config of these entries, with its digest computed and its mappings read-only."""
        jobs = dict(sorted(jobs.items()))
        nodes = dict(sorted(nodes.items()))
        return cls(
            jobs=types.MappingProxyType(jobs),
            nodes=types.MappingProxyType(nodes),
            errors=tuple(errors),
            digest=config_digest(jobs, nodes),
            loaded_at=loaded_at or datetime.now(UTC),
            tokens=tokens,
        )


def config_digest(jobs: Mapping[str, JobSpec], nodes: Mapping[str, NodeSpec]) -> str:
    """sha256 (hex) of the canonical JSON of the jobs and nodes."""
    canonical = {
        "jobs": {k: v.model_dump(mode="json") for k, v in jobs.items()},
        "nodes": {k: v.model_dump(mode="json") for k, v in nodes.items()},
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


MAX_FILE_BYTES = 1024 * 1024  # a job or node file is a few hundred bytes; 1 MB is not one


def is_config_file(path: Path) -> bool:
    """Whether a directory entry's name is one of a config file (not hidden, not a temp file)."""
    name = path.name
    if name.startswith(".") or name.endswith("~") or name.endswith(".swp"):
        return False
    return name.endswith(".json") and len(name) > len(".json")


def load_file(path: Path, model: type[M]) -> M | list[ConfigError]:
    """Validate one job or node file: its model, or the list of its errors (never raises)."""
    file = str(path)
    stem = path.name[: -len(".json")]
    if not ID_PATTERN.match(stem):
        return [
            ConfigError(
                file,
                "",
                f"file name {path.name!r} does not give a valid id: it must start with a "
                "letter or digit and hold only letters, digits, '.', '_' and '-' (at most 128)",
            )
        ]
    data = read_json_object(path)
    if isinstance(data, list):
        return data
    errors: list[ConfigError] = []
    if "id" in data:
        errors.append(ConfigError(file, "id", ID_FIELD_REASON))
    try:
        spec = model.model_validate({**data, "id": stem})
    except ValidationError as e:
        errors.extend(validation_errors(file, model, e))
        return errors
    return errors or spec


def read_json_object(path: Path) -> dict[str, Any] | list[ConfigError]:
    """A config file's JSON object, or the error saying why it is not one (never raises)."""
    file = str(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            return [ConfigError(file, "", f"the file is over {MAX_FILE_BYTES} bytes")]
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [ConfigError(file, "", f"cannot read the file: {e}")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return [
            ConfigError(file, "", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}")
        ]
    except RecursionError:
        return [ConfigError(file, "", "nested too deeply to be read")]
    if not isinstance(data, dict):
        return [ConfigError(file, "", f"must be a JSON object, not {_json_type(data)}")]
    return data


def validation_errors(file: str, model: type[BaseModel], exc: ValidationError) -> list[ConfigError]:
    """One ConfigError per pydantic error, with the union members' errors merged into one."""
    out: list[ConfigError] = []
    seen_unions: set[tuple[Any, ...]] = set()
    errors = exc.errors(include_url=False)
    for err in errors:
        loc = tuple(err["loc"])
        tag_at = _union_tag_position(model, loc)
        if tag_at is None:
            out.append(_plain_error(file, model, loc, err["msg"]))
            continue
        prefix = loc[:tag_at]
        if prefix in seen_unions:
            continue
        seen_unions.add(prefix)
        members = [e for e in errors if tuple(e["loc"])[:tag_at] == prefix]
        # A member whose error lies deeper than the member itself matched the
        # input's shape (e.g. a list with one bad item): its errors are the useful ones.
        deeper = [e for e in members if len(e["loc"]) > tag_at + 1]
        if deeper:
            for e in deeper:
                rest = tuple(e["loc"])[tag_at + 1 :]
                out.append(ConfigError(file, _dotted(prefix + rest), _clean(e["msg"])))
            continue
        dotted = _dotted(prefix)
        reason = _UNION_REASONS.get(dotted) or " or ".join(
            dict.fromkeys(_clean(e["msg"]) for e in members)
        )
        out.append(ConfigError(file, dotted, reason))
    return out


def _plain_error(file: str, model: type[BaseModel], loc: tuple[Any, ...], msg: str) -> ConfigError:
    reason = _clean(msg)
    if not loc:
        # Model validators name their field as "field: reason"; put it where it belongs.
        name, sep, rest = reason.partition(": ")
        if sep and name in model.model_fields:
            return ConfigError(file, name, rest)
    return ConfigError(file, _dotted(loc), reason)


def _clean(msg: str) -> str:
    for prefix in _PYDANTIC_PREFIXES:
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _dotted(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _strip_annotated(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _union_tag_position(model: type[BaseModel], loc: tuple[Any, ...]) -> int | None:
    """The index in ``loc`` of a union member's tag (pydantic inserts one per member), if any.

    Walks the model's types along ``loc``; ``X | None`` is no union to pydantic.
    """
    tp: Any = model
    for i, seg in enumerate(loc):
        tp = _strip_annotated(tp)
        if get_origin(tp) in (Union, types.UnionType):
            members = [_strip_annotated(a) for a in get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
            else:
                # A before-validator may have picked the member already (the
                # schedule's does): then the loc goes on with that member's field.
                chosen = [
                    m
                    for m in members
                    if isinstance(m, type) and issubclass(m, BaseModel) and seg in m.model_fields
                ]
                if not chosen:
                    return i if isinstance(seg, str) else None
                tp = chosen[0]
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            info = tp.model_fields.get(seg) if isinstance(seg, str) else None
            if info is None:
                return None
            tp = info.annotation
        elif origin in (tuple, list) and isinstance(seg, int):
            tp = get_args(tp)[0]
        elif origin is dict:
            tp = get_args(tp)[1]
        else:
            return None
    return None


class ConfigRegistry:
    """The current config of one peer, re-read from its directories on :meth:`reload`.

    Thread-safe. Never raises on bad input: a file that fails keeps the last
    good version of its job or node while its errors are reported.
    """

    def __init__(
        self, jobs_dir: Path | str, nodes_dir: Path | str, tokens_file: Path | None = None
    ) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.nodes_dir = Path(nodes_dir)
        self.tokens_file = tokens_file
        # Serialises reloads (the watcher's and the safety net's) so that
        # "last good" always means the previous reload's result.
        self._reload_lock = threading.Lock()
        self._current = LoadedConfig.build({}, {})
        self._logged: frozenset[ConfigError] = frozenset()

    @property
    def current(self) -> LoadedConfig:
        """The config of the last reload (empty before the first)."""
        return self._current

    def reload(self) -> LoadedConfig:
        """Re-read both directories and make the result current; returns it."""
        with self._reload_lock:
            previous = self._current
            errors: list[ConfigError] = []
            jobs = _load_dir(self.jobs_dir, JobSpec, previous.jobs, errors)
            nodes = _load_dir(self.nodes_dir, NodeSpec, previous.nodes, errors)
            tokens = self._load_tokens(previous.tokens, errors)
            config = LoadedConfig.build(jobs, nodes, errors, tokens=tokens)
            self._log_changes(previous, config)
            self._current = config
            return config

    def _load_tokens(
        self, last_good: TokenTable | None, errors: list[ConfigError]
    ) -> TokenTable | None:
        """The tokens file's table; while it is bad, the last good one (None before one)."""
        if self.tokens_file is None:
            return None
        from distcrond.config.tokens import load_tokens

        result = load_tokens(self.tokens_file)
        if isinstance(result, list):
            errors.extend(result)
            return last_good
        return result

    def _log_changes(self, previous: LoadedConfig, config: LoadedConfig) -> None:
        # Log each error once, when it appears, not on every reload.
        errors = frozenset(config.errors)
        for error in config.errors:
            if error not in self._logged:
                log.error("config error: %s", error)
        for error in self._logged - errors:
            log.info("config error resolved: %s", error)
        self._logged = errors
        if config.digest != previous.digest:
            log.info(
                "config loaded: %d jobs, %d nodes, %d errors (digest %s)",
                len(config.jobs),
                len(config.nodes),
                len(config.errors),
                config.digest[:12],
            )


def _load_dir(
    directory: Path, model: type[M], last_good: Mapping[str, M], errors: list[ConfigError]
) -> dict[str, M]:
    try:
        entries = sorted(p for p in directory.iterdir() if is_config_file(p))
    except FileNotFoundError:
        errors.append(ConfigError(str(directory), "", "directory does not exist"))
        return {}
    except NotADirectoryError:
        errors.append(ConfigError(str(directory), "", "not a directory"))
        return {}
    except OSError as e:
        errors.append(ConfigError(str(directory), "", f"cannot read the directory: {e}"))
        return {}
    loaded: dict[str, M] = {}
    for path in entries:
        stem = path.name[: -len(".json")]
        try:
            if path.is_dir():
                continue
            result = (
                load_file(path, model)
                if path.is_file()
                else [ConfigError(str(path), "", "not a regular file (a broken symbolic link?)")]
            )
        except OSError as e:
            result = [ConfigError(str(path), "", f"cannot read the file: {e}")]
        if isinstance(result, list):
            errors.extend(result)
            if stem in last_good:
                loaded[stem] = last_good[stem]
        else:
            loaded[stem] = result
    return loaded
