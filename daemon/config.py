"""Loading a daemon's settings: a TOML file, then ``HOTBED_*`` environment overrides.

Each daemon declares one frozen ``msgspec.Struct`` with ``forbid_unknown_fields=True``
and defaults for every field; :func:`load_settings` fills it. A top-level field ``foo``
is overridden by ``HOTBED_FOO`` (strings are converted to the field's type; dicts
and lists are given as JSON). Any unknown key or bad value raises
:class:`hotbed.errors.ConfigError` with one line naming it.
"""

from __future__ import annotations

import logging
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


REDIS_SCHEMES = ("redis", "rediss", "unix")
# Several host:port seeds (hotbed.connection): a Redis Cluster or a Sentinel-run primary.
MULTI_HOST_SCHEMES = ("redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel")


def check_common(redis_url: str, prefix: str) -> None:
    """Checks every daemon's settings share; raises ValueError (msgspec reports it)."""
    from urllib.parse import urlparse

    u = urlparse(redis_url)
    shown = redact_url(redis_url)
    if u.scheme in MULTI_HOST_SCHEMES:
        _check_seeds(redis_url, shown)
    elif u.scheme not in REDIS_SCHEMES:
        raise ValueError(
            f"redis_url {shown!r}: scheme must be redis://, rediss:// (TLS), unix://, "
            "redis+cluster:// or redis+sentinel://"
        )
    elif u.scheme != "unix" and not u.hostname:
        raise ValueError(f"redis_url {shown!r} names no host")
    elif u.scheme == "unix" and not u.path:
        raise ValueError(f"redis_url {shown!r} names no socket path")
    else:
        try:
            _ = u.port
        except ValueError:
            raise ValueError(f"redis_url {shown!r}: bad port") from None
    if not prefix or any(c in prefix for c in "{}: "):
        raise ValueError(f"prefix {prefix!r} must be non-empty, without braces, colons or spaces")


def _check_seeds(redis_url: str, shown: str) -> None:
    from hotbed.connection import RedisURL

    try:
        u = RedisURL(redis_url)
    except ValueError:
        raise ValueError(f"redis_url {shown!r}: bad port") from None
    if not u.hosts or any(not host or not 0 < port < 65536 for host, port in u.hosts):
        raise ValueError(f"redis_url {shown!r} must name host:port seeds, comma-separated")
    if u.sentinel and not u.path.strip("/"):
        raise ValueError(f"redis_url {shown!r} names no Sentinel service: redis+sentinel://HOST:PORT/SERVICE")
    if u.cluster and u.path.strip("/") not in ("", "0"):
        raise ValueError(f"redis_url {shown!r}: a Redis Cluster has only database 0")


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs and error lines."""
    from urllib.parse import urlparse

    u = urlparse(url)
    if u.password is None:
        return url
    netloc = u.netloc.rsplit("@", 1)[1]
    user = f"{u.username}:***@" if u.username else ":***@"
    return u._replace(netloc=user + netloc).geturl()


def reloaded(current: S, new: S, reloadable: tuple[str, ...]) -> tuple[S, list[str], list[str]]:
    """Merge a re-read config into running settings (SIGHUP).

    Returns the settings to run with (``current`` with the changed ``reloadable``
    fields taken from ``new``), the names applied, and the names that changed but only
    take effect after a restart.
    """
    applied, ignored = [], []
    changes: dict[str, Any] = {}
    for field in msgspec.structs.fields(type(current)):
        old, fresh = getattr(current, field.name), getattr(new, field.name)
        if old == fresh:
            continue
        if field.name in reloadable:
            changes[field.name] = fresh
            applied.append(field.name)
        else:
            ignored.append(field.name)
    return msgspec.structs.replace(current, **changes), applied, ignored


def reload_from_file(
    cls: type[S],
    path: str | os.PathLike[str] | None,
    *,
    current: S,
    reloadable: tuple[str, ...],
    overrides: Mapping[str, Any] | None = None,
    log: logging.Logger,
) -> tuple[S, list[str]] | None:
    """One daemon's SIGHUP: re-read ``path`` and merge what may change while running.

    Returns the settings to run with and the names applied, or None (logged) when the
    file is now invalid, in which case the running settings stay.
    """
    try:
        fresh = load_settings(cls, path, overrides=overrides)
    except ConfigError as exc:
        log.error("reload: %s; keeping the running settings", exc)
        return None
    merged, applied, ignored = reloaded(current, fresh, reloadable)
    log.info(
        "reloaded: applied %s%s", ", ".join(applied) or "nothing",
        f"; need a restart: {', '.join(ignored)}" if ignored else "",
    )
    return merged, applied
