"""The API tokens file (``--api-tokens``): who may call the API, and with which role.

```json
{"tokens": [{"name": "ops", "role": "operate", "sha256": "<hex sha-256 of the token>"}]}
```

The file holds no token, only each token's SHA-256: a copy of the file (a backup, a
config repository) lets no one in. Tokens are random (``distcronctl token new``
makes 32 random bytes), so an unsalted hash is as good as a slow one here: there
is no guessable password behind it.

Roles are ordered: ``read`` (every GET), ``operate`` (read, and trigger or cancel
runs), ``admin`` (everything). A bad file is one more config error (file, field,
reason), and the last good table stays in force (see ``ConfigRegistry``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from distcrond.config.loader import ConfigError, read_json_object, validation_errors

TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
TOKEN_BYTES = 32


class Role(IntEnum):
    """What a token may do; a higher role may do all a lower one may."""

    READ = 1
    OPERATE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, label: str) -> Role:
        return cls[label.upper()]


def _hex_digest(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(
            "must be the SHA-256 of the token in lowercase hex (64 characters), "
            "as distcronctl token new prints it"
        )
    return value


class TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=TOKEN_NAME_PATTERN)]
    role: Literal["read", "operate", "admin"]
    sha256: Annotated[str, AfterValidator(_hex_digest)]

    @property
    def level(self) -> Role:
        return Role.parse(self.role)


class TokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: tuple[TokenEntry, ...]

    @model_validator(mode="after")
    def _unique(self) -> TokensFile:
        names = [t.name for t in self.tokens]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"tokens: the name {name!r} is given more than once")
        digests = [t.sha256 for t in self.tokens]
        if len(set(digests)) != len(digests):
            raise ValueError("tokens: two entries have the same sha256 (one token, two names)")
        return self


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A new random token (URL-safe, 43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


@dataclass(frozen=True)
class TokenTable:
    """The tokens in force. :meth:`authenticate` compares in constant time."""

    entries: tuple[TokenEntry, ...] = ()

    def authenticate(self, token: str) -> TokenEntry | None:
        """The entry of ``token``, or None. Every entry is compared, each in constant time,
        so the answer's timing tells nothing about which entry (or how much of one) matched."""
        digest = token_digest(token)
        found = None
        for entry in self.entries:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found

    def to_json(self) -> dict[str, object]:
        return TokensFile(tokens=self.entries).model_dump(mode="json")


def load_tokens(path: Path) -> TokenTable | list[ConfigError]:
    """The table of a tokens file, or its errors (never raises)."""
    data = read_json_object(path)
    if isinstance(data, list):
        return data
    try:
        return TokenTable(TokensFile.model_validate(data).tokens)
    except ValidationError as e:
        return validation_errors(str(path), TokensFile, e)


def write_table(table: TokenTable, path: Path) -> None:
    """Write ``table`` to ``path`` for the API's workers: 0600, atomically (a reader sees the
    old table or the new one, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(table.to_json(), f)
    os.replace(tmp, path)
