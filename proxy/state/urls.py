"""Redis URLs: the Sentinel and Cluster forms redis-py has no parser for, and a
URL's description without credentials."""

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


@dataclass(frozen=True, slots=True)
class ClusterURL:
    """The seed nodes of a Redis Cluster: `redis://[[user]:password@]host:port` URLs
    separated by commas (a YAML list of URLs is joined so), `rediss://` for TLS. The
    client asks the seeds for the rest of the cluster. The seeds share the cluster's
    credentials and options (`?ssl_cert_reqs=none`, ...): a seed may leave them out,
    but two seeds may not give different ones. A cluster has database 0 only. A comma
    inside a password is written `%2C`."""

    nodes: tuple[tuple[str, int], ...]
    ssl: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: str = ""  # the query string: redis-py connection options, as for a plain URL


CLUSTER_SCHEMES = {"redis": False, "rediss": True}
DEFAULT_REDIS_PORT = 6379


def url_count(url: str) -> int:
    """How many URLs a (comma-separated) `redis.url` holds."""
    return url.count("://")


def parse_cluster_url(url: str) -> ClusterURL:
    """Parse comma-separated seed URLs; ValueError names what is wrong."""
    seeds = [_parse_seed(part.strip()) for part in url.split(",")]
    schemes = {scheme for scheme, *_ in seeds}
    if len(schemes) > 1:
        raise ValueError("Redis Cluster seeds mix redis:// and rediss://: use one scheme for all")
    credentials = {(user, secret) for _, _, user, secret, _ in seeds if user is not None or secret is not None}
    if len(credentials) > 1:
        raise ValueError("Redis Cluster seeds give different credentials: a cluster has one user and password")
    options = {query for *_, query in seeds if query}
    if len(options) > 1:
        raise ValueError("Redis Cluster seeds give different ?options: give them once, or the same on each seed")
    username, password = credentials.pop() if credentials else (None, None)
    return ClusterURL(
        nodes=tuple(node for _, node, *_ in seeds),
        ssl=CLUSTER_SCHEMES[schemes.pop()],
        username=username,
        password=password,
        options=options.pop() if options else "",
    )


def _parse_seed(part: str) -> tuple[str, tuple[str, int], str | None, str | None, str]:
    """(scheme, (host, port), username, password, query) of one seed URL."""
    if not part:
        raise ValueError("Redis Cluster URL: an empty seed in the comma-separated list")
    scheme = part.partition("://")[0].lower() if "://" in part else ""
    if scheme not in CLUSTER_SCHEMES:
        shown = f"{scheme}://" if scheme else repr(part.rpartition("@")[2])
        raise ValueError(f"a Redis Cluster seed must be a redis:// or rediss:// URL, got {shown}")
    split = urlsplit(part)
    try:
        port = split.port
    except ValueError as exc:
        raise ValueError(f"Redis Cluster URL: bad port in {split.netloc.rpartition('@')[2]!r}") from exc
    if not split.hostname:
        raise ValueError("Redis Cluster URL: a seed without a host")
    if split.path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has database 0 only, got /{split.path.strip('/')}")
    username = unquote(split.username) if split.username else None
    password = unquote(split.password) if split.password else None
    return scheme, (split.hostname, port or DEFAULT_REDIS_PORT), username, password, split.query


def describe_target(url: str) -> str:
    """The URL without credentials, for repr and logs (each of a cluster's seeds)."""
    if url_count(url) > 1:
        return ",".join(describe_target(part.strip()) for part in url.split(","))
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path.partition('?')[0]}"
