"""Reading the file: strict YAML 1.2 loading and ``${VAR}`` interpolation."""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import yaml

from proxy.config.model import ConfigError


def interpolate(value: str, environ: Mapping[str, str], path: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in ``value``; ``$${`` is a literal ``${``.

    Raises ConfigError naming ``path`` for each unset variable or bad reference.
    As in the shell, ``:-`` uses the default when the variable is unset or empty.
    """
    pieces: list[str] = []
    problems: list[str] = []
    end = 0
    for match in _REFERENCE.finditer(value):
        pieces.append(value[end : match.start()])
        end = match.end()
        text, problem = _substitute(match, environ)
        pieces.append(text)
        if problem is not None:
            problems.append(f"{path}: {problem}")
    if problems:
        raise ConfigError(problems)
    pieces.append(value[end:])
    return "".join(pieces)


def referenced_names(value: str) -> tuple[str, ...]:
    """The variable names ``value`` refers to with ``${NAME}`` or ``${NAME:-default}``, in order."""
    names = []
    for match in _REFERENCE.finditer(value):
        ref = _REFERENCE_BODY.fullmatch(match.group("body") or "")
        if match.group(0) != "$${" and ref is not None:
            names.append(ref.group(1))
    return tuple(names)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to print or log; each
    URL of a comma-separated list (a Redis Cluster's seeds) on its own."""
    if url.count("://") > 1:
        return ",".join(redact_url(part) for part in url.split(","))
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = _QUERY_PASSWORD.sub(r"\1***", parts.query)
    return parts._replace(netloc=netloc, query=query).geturl()


_REFERENCE: Final = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)\}|\$\{")
_REFERENCE_BODY: Final = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_QUERY_PASSWORD: Final = re.compile(r"((?:^|&)password=)[^&]*")


def _substitute(match: re.Match[str], environ: Mapping[str, str]) -> tuple[str, str | None]:
    """The text for one reference, and the problem with it if there is one."""
    if match.group(0) == "$${":
        return "${", None
    body = match.group("body")
    if body is None:
        return "", "unterminated '${' (write '$${' for a literal '${')"
    ref = _REFERENCE_BODY.fullmatch(body)
    if ref is None or "${" in (ref.group(2) or ""):
        return "", f"invalid reference '${{{body}}}' (expected ${{NAME}} or ${{NAME:-default}})"
    name, default = ref.group(1), ref.group(2)
    value = environ.get(name)
    if default is not None:
        return (value or default), None
    if value is None:
        return "", f"environment variable {name} is not set (write ${{{name}:-}} to allow it empty)"
    return value, None


# --- reading YAML -------------------------------------------------------------

_BOOL_TAG: Final = "tag:yaml.org,2002:bool"
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_YAML_1_2_BOOL: Final = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


def _yaml_1_2_booleans(
    resolvers: Mapping[Any, list[tuple[str, re.Pattern[str]]]],
) -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    return {
        first: [(tag, _YAML_1_2_BOOL if tag == _BOOL_TAG else regexp) for tag, regexp in entries]
        for first, entries in resolvers.items()
    }


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate keys and reads only true/false as booleans.

    PyYAML lets a repeated key silently win, and (YAML 1.1) reads ``on``, ``yes``
    and ``off`` as booleans, which would turn a route's ``on:`` into ``True:``.
    """

    yaml_implicit_resolvers = _yaml_1_2_booleans(yaml.SafeLoader.yaml_implicit_resolvers)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key_node.value!r}",
                    key_node.start_mark,
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def read_yaml(source: str) -> object:
    try:
        with open(source, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read: {exc}"]) from exc
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_yaml_problem(source, exc)]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from exc


def _yaml_problem(source: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
    what = " ".join(part for part in (exc.context, exc.problem) if part)
    return f"{source}: invalid YAML{where}: {what}"


# --- the validation toolkit -----------------------------------------------------
