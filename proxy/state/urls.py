"""Redis URLs: the Sentinel form redis-py has no parser for, and a URL's
description without credentials."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """`redis+sentinel://[[user]:password@]host1:26379,host2:26379/<service>[/<db>]`;
    `rediss+sentinel://` for TLS to the master; `?sentinel_password=` if the sentinels
    require their own."""

    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    ssl: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)


SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
DEFAULT_SENTINEL_PORT = 26379


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse the sentinel URL form; ValueError names what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"not a sentinel URL (redis+sentinel://...): scheme {scheme!r}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else unquote(user)
        if not colon:
            username = None
    hosts = tuple(_parse_host(part) for part in hostlist.split(","))
    parts = [unquote(p) for p in path.split("/")] if path else []
    if not parts or not parts[0]:
        raise ValueError("sentinel URL needs a service name: redis+sentinel://host:26379/<service>")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"sentinel URL path must be /<service>[/<db>], got /{path}")
    params = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    unknown = set(params) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"sentinel URL: unsupported query parameter(s) {sorted(unknown)}")
    return SentinelURL(
        hosts=hosts,
        service=parts[0],
        db=int(parts[1]) if len(parts) == 2 else 0,
        ssl=SENTINEL_SCHEMES[scheme.lower()],
        username=username,
        password=password or None,
        sentinel_password=params.get("sentinel_password", [None])[-1] or None,
    )


def _parse_host(part: str) -> tuple[str, int]:
    if not part:
        raise ValueError("sentinel URL: empty host in the host list")
    split = urlsplit(f"//{part}")
    try:
        port = split.port
    except ValueError as exc:
        raise ValueError(f"sentinel URL: bad port in {part!r}") from exc
    if not split.hostname:
        raise ValueError(f"sentinel URL: bad host {part!r}")
    return split.hostname, port or DEFAULT_SENTINEL_PORT


def describe_target(url: str) -> str:
    """The URL without credentials, for repr and logs."""
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path.partition('?')[0]}"
