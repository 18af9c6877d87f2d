"""Loading a daemon's settings: a TOML file, then ``HOTBED_*`` environment overrides.

Each daemon declares one frozen ``msgspec.Struct`` with ``forbid_unknown_fields=True``
and defaults for every field; :func:`load_settings` fills it. A top-level field ``foo``
is overridden by ``HOTBED_FOO`` (strings are converted to the field's type; dicts
and lists are given as JSON). Any unknown key or bad value raises
:class:`hotbed.errors.ConfigError` with one line naming it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import orjson

from hotbed.errors import ConfigError

S = TypeVar("S", bound=msgspec.Struct)

ENV_PREFIX = "HOTBED_"


def _env_overrides(cls: type[msgspec.Struct], environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        raw = environ.get(ENV_PREFIX + field.name.upper())
        if raw is None:
            continue
        if raw[:1] in ("{", "["):
            try:
                out[field.name] = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise ConfigError(f"{ENV_PREFIX}{field.name.upper()}: bad JSON: {exc}") from None
        else:
            out[field.name] = raw
    return out


def load_settings(
    cls: type[S],
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> S:
    """Settings of type ``cls`` from ``path`` (optional), the environment, then ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data.update(tomllib.loads(p.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    data.update(_env_overrides(cls, os.environ if environ is None else environ))
    if overrides:
        data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(data, cls, strict=False)
    except msgspec.ValidationError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{exc}") from None
