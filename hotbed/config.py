"""The client configuration file: where the SDK and the CLI find their control plane.

``hotbed up`` writes it (with the admin password it gave Redis); ``hotbed tenant create
--write-config`` can write one holding a tenant's credentials. A TOML file::

    redis_url = "redis://default:PASSWORD@127.0.0.1:6379/0"
    prefix = "hotbed"

Found at ``$HOTBED_CONFIG``, else ``$XDG_CONFIG_HOME/hotbed/config``, else
``~/.config/hotbed/config``. ``HOTBED_REDIS_URL`` and ``HOTBED_PREFIX`` win over it;
with neither it nor them, the URL is ``redis://127.0.0.1:6379/0``. It holds a password,
so it is written mode 0600.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import msgspec

from hotbed.errors import ConfigError


class ClientConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    redis_url: str = ""
    prefix: str = ""


def path() -> Path:
    if explicit := os.environ.get("HOTBED_CONFIG"):
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hotbed" / "config"


def load() -> ClientConfig:
    """The config file's settings; empty ones when there is no file."""
    p = path()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return ClientConfig()
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc}") from None
    try:
        return msgspec.convert(tomllib.loads(raw.decode()), ClientConfig)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ConfigError(f"bad client config {p}: {exc}") from None


def write(config: ClientConfig, where: Path | None = None) -> Path:
    """Write ``config`` (mode 0600, replacing the file atomically); returns its path."""
    p = where or path()
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{name} = {_toml_str(getattr(config, name))}" for name in config.__struct_fields__ if getattr(config, name)]
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, p)
    return p


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
