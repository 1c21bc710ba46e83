"""Static checks of the container image definition: Dockerfile and .dockerignore.

No Docker engine runs here, so the Dockerfile is parsed (a small parser of the
instructions used, below) and checked against the repo it builds: the console
script in pyproject.toml, the files it copies, the config it ships, the port.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

BUILD_TOOLS = ("build-essential", "gcc", "g++", "clang", "make", "cmake", "cargo", "rustc")
APP_PORT = 8080


# --- a small Dockerfile parser --------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # the rest of the logical line, continuations joined
    line: int

    def flags(self) -> dict[str, str]:
        """The leading --flag=value options (COPY --from=..., HEALTHCHECK --interval=...)."""
        found: dict[str, str] = {}
        for word in self.value.split():
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            found[name] = value
        return found

    def body(self) -> str:
        """The value without its leading --flags."""
        words = self.value.split(" ")
        while words and (words[0].startswith("--") or words[0] == ""):
            words.pop(0)
        return " ".join(words)

    def exec_form(self) -> list[str]:
        """The JSON (exec) form's argv; a shell form is run by /bin/sh -c."""
        text = self.body().strip()
        if text.startswith("["):
            argv = json.loads(text)
            assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
            return argv
        return ["/bin/sh", "-c", text]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of instructions (comments and blank lines dropped)."""
    stages: list[Stage] = []
    logical: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue  # blank lines, comments and parser directives
        if logical and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not logical:
            start = number
        if stripped.endswith("\\"):
            logical.append(stripped[:-1].strip())
            continue
        logical.append(stripped)
        line = " ".join(part for part in logical if part)
        logical = []
        keyword, _, value = line.partition(" ")
        instruction = Instruction(keyword.upper(), value.strip(), start)
        if instruction.keyword == "FROM":
            words = instruction.body().split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"line {start}: {instruction.keyword} before the first FROM"
        stages[-1].instructions.append(instruction)
    assert not logical, "the Dockerfile ends inside a continued line"
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    """The ENV key=value pairs a stage sets (the forms used here)."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.value):
            key, sep, value = word.partition("=")
            assert sep, f"line {instruction.line}: use ENV key=value"
            env[key] = value
    return env


def copies(stage: Stage) -> list[tuple[dict[str, str], list[str], str]]:
    """Each COPY of a stage as (flags, sources, destination)."""
    found = []
    for instruction in stage.all("COPY"):
        text = instruction.body().strip()
        words = json.loads(text) if text.startswith("[") else shlex.split(text)
        found.append((instruction.flags(), words[:-1], words[-1]))
    return found


def served_port(argv: list[str]) -> int:
    """The --port an argv passes."""
    return int(argv[argv.index("--port") + 1])


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    with PYPROJECT.open("rb") as stream:
        return tomllib.load(stream)


# --- the parser itself ------------------------------------------------------------


def test_parser_joins_continuations_and_splits_stages() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "FROM python:3.11-slim AS builder\n"
        "RUN a \\\n"
        "    # a comment inside\n"
        "    && b\n"
        "FROM python:3.11-slim\n"
        'CMD ["serve", "--port", "9"]\n'
        "COPY --from=builder /opt/venv /opt/venv\n"
    )
    first, second = parse_dockerfile(text)
    assert (first.base, first.name) == ("python:3.11-slim", "builder")
    assert first.all("RUN")[0].value == "a && b"
    assert second.name is None
    assert served_port(second.all("CMD")[0].exec_form()) == 9
    assert copies(second) == [({"from": "builder"}, ["/opt/venv"], "/opt/venv")]


# --- base images and stages ----------------------------------------------------------


def test_multi_stage_from_pinned_python_slim(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    for stage in stages:
        image, _, tag = stage.base.partition(":")
        assert image == "python", stage.base
        assert re.fullmatch(r"3\.11(\.\d+)?-slim(-\w+)?", tag), f"pin python:3.11-slim*: {stage.base}"
    assert "-slim" in final.base


def test_final_stage_copies_only_the_venv_from_the_builder(stages: list[Stage], final: Stage) -> None:
    builder_names = {stage.name for stage in stages[:-1]}
    from_builder = [(flags, sources, dest) for flags, sources, dest in copies(final) if "from" in flags]
    assert from_builder, "the runtime stage copies nothing from the builder"
    for flags, sources, dest in from_builder:
        assert flags["from"] in builder_names
        assert sources == ["/opt/venv"] and dest == "/opt/venv", "copy only the venv"
    assert "/opt/venv/bin" in env_of(final)["PATH"].split(":")[0]


def test_final_stage_has_no_build_tools(final: Stage) -> None:
    for run in final.all("RUN"):
        words = set(re.split(r"[\s;&|]+", run.value))
        assert not words & set(BUILD_TOOLS), f"line {run.line}: build tools in the final stage"
        assert "apt-get" not in words or "install" not in words, (
            f"line {run.line}: the final stage installs system packages"
        )


def test_final_stage_runs_as_non_root_fixed_uid(final: Stage) -> None:
    user = final.last("USER")
    assert user is not None, "the runtime stage must set USER"
    uid = user.value.split(":")[0]
    assert uid.isdigit(), "a numeric UID lets Kubernetes verify runAsNonRoot"
    assert int(uid) >= 1000
    created = " ".join(run.value for run in final.all("RUN"))
    assert f"--uid {uid}" in created, "the user is created with that UID"
    # The Helm chart runs as the same UID.
    values = (ROOT / "helm" / "fallback-proxy" / "values.yaml").read_text(encoding="utf-8")
    assert f"runAsUser: {uid}" in values
    # USER comes after every RUN of the final stage (nothing else runs as root later).
    assert all(run.line < user.line for run in final.all("RUN"))


def test_workdir_and_environment(final: Stage) -> None:
    workdir = final.last("WORKDIR")
    assert workdir is not None and workdir.value == "/app"
    env = env_of(final)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["FALLBACK_PROXY_CONFIG"] == "/etc/fallback-proxy/config.yaml"


# --- the process: entrypoint, command, port, health check ------------------------------


def test_entrypoint_is_the_console_script(final: Stage, pyproject: dict[str, Any]) -> None:
    entrypoint = final.last("ENTRYPOINT")
    assert entrypoint is not None
    argv = entrypoint.exec_form()
    assert argv[0] != "/bin/sh", "use the exec form so the proxy gets SIGTERM"
    scripts = pyproject["project"]["scripts"]
    assert argv == ["fallback-proxy"]
    assert argv[0] in scripts
    module_name, _, function_name = scripts[argv[0]].partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    assert callable(function)


def test_cmd_serves_on_all_interfaces_on_the_exposed_port(final: Stage) -> None:
    cmd = final.last("CMD")
    assert cmd is not None
    argv = cmd.exec_form()
    assert argv[0] == "serve"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    exposed = [int(port.split("/")[0]) for e in final.all("EXPOSE") for port in e.value.split()]
    assert exposed == [APP_PORT]
    assert served_port(argv) == APP_PORT


def test_cmd_parses_with_the_cli(final: Stage) -> None:
    from proxy import cli

    cmd = final.last("CMD")
    assert cmd is not None
    argv = cmd.exec_form()
    if argv[0] not in cli.COMMANDS:
        pytest.skip(f"the CLI has no {argv[0]!r} subcommand yet")
    args = cli.build_parser().parse_args(argv)
    assert (args.host, args.port) == ("0.0.0.0", APP_PORT)
    assert args.config is None, "the config path comes from FALLBACK_PROXY_CONFIG"
    assert getattr(cli, "CONFIG_PATH_VARIABLE", "FALLBACK_PROXY_CONFIG") == "FALLBACK_PROXY_CONFIG"
    assert "FALLBACK_PROXY_CONFIG" in env_of(final)


def test_healthcheck_runs_the_cli_check_of_the_served_port(final: Stage, pyproject: dict[str, Any]) -> None:
    """No port is written into the check: `fallback-proxy healthcheck` finds the server and
    checks it where it listens (tests/test_healthcheck.py, tests/test_container*.py)."""
    from proxy import cli

    check = final.last("HEALTHCHECK")
    assert check is not None
    body = check.body()
    assert body.startswith("CMD ")
    argv = json.loads(body[len("CMD ") :])
    assert argv[0] in pyproject["project"]["scripts"], "the console script is on the image's PATH"
    args = cli.build_parser().parse_args(argv[1:])
    assert args.command == "healthcheck" and args.url is None, "no fixed URL or port"
    assert not re.search(r":\d{2,5}\b", " ".join(argv)), "no fixed port"
    flags = check.flags()
    assert {"interval", "timeout"} <= flags.keys()
    assert args.timeout < float(flags["timeout"].removesuffix("s")), "the probe gives up before docker does"


# --- files: what is copied, what the context holds ------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent) decides; ! re-includes."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.compile("^" + re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*") + "$")
        if any(regex.match(c) or fnmatch.fnmatchcase(c, pattern) for c in candidates):
            verdict = not negate
    return verdict


def test_ignore_matcher() -> None:
    patterns = ["**/__pycache__", ".git", "*.egg-info", "tests", "!tests/keep"]
    assert ignored("proxy/__pycache__/x.pyc", patterns)
    assert ignored(".git/HEAD", patterns)
    assert ignored("fallback_proxy.egg-info", patterns)
    assert not ignored("tests/keep", patterns)
    assert not ignored("proxy/app.py", patterns)


def readme(pyproject: dict[str, Any]) -> str:
    declared = pyproject["project"].get("readme", "")
    return declared if isinstance(declared, str) else declared.get("file", "")


def test_copy_sources_exist_and_are_in_the_build_context(stages: list[Stage], pyproject: dict[str, Any]) -> None:
    patterns = dockerignore_patterns()
    for stage in stages:
        for flags, sources, _ in copies(stage):
            if "from" in flags:
                continue
            for source in sources:
                assert not ignored(source, patterns), f"{source} is excluded by .dockerignore"
                if source == readme(pyproject) and not (ROOT / source).exists():
                    continue  # checked by test_the_readme_pyproject_declares_is_copied
                assert list(ROOT.glob(source.rstrip("/"))), f"COPY source {source} is not in the repo"


def test_the_readme_pyproject_declares_is_copied(stages: list[Stage], pyproject: dict[str, Any]) -> None:
    """setuptools refuses to build when the readme pyproject.toml names is missing."""
    name = readme(pyproject)
    builder_sources = {s for stage in stages[:-1] for _, sources, _ in copies(stage) for s in sources}
    assert {"pyproject.toml", "proxy/"} <= builder_sources
    if name:
        assert name in builder_sources
        if not (ROOT / name).exists():
            pytest.skip(f"{name} is not written yet; `pip install .` (and the image build) needs it")


def test_default_config_is_the_file_the_env_names(final: Stage) -> None:
    target = env_of(final)["FALLBACK_PROXY_CONFIG"]
    shipped = [
        source for flags, sources, dest in copies(final) if "from" not in flags and dest == target for source in sources
    ]
    assert shipped == ["config/example.yaml"]
    # It must load in the image, given the keys it requires (${VAR} without a default).
    text = (ROOT / shipped[0]).read_text(encoding="utf-8")
    names = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)
    environ = {name: "http://dummy.invalid" if name.endswith("_URL") else "dummy" for name in names}
    load_config(ROOT / shipped[0], environ=environ)


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".git/config",
        ".venv/bin/python",
        "venv/bin/python",
        ".env",
        ".env.local",
        "proxy/__pycache__/app.cpython-311.pyc",
        ".pytest_cache/v",
        ".mypy_cache/x",
        "fallback_proxy.egg-info/PKG-INFO",
        "tests/test_e2e.py",
    ):
        assert ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "proxy/app.py", "proxy/adapters/base.py", "config/example.yaml"):
        assert not ignored(path, patterns), f"{path} is needed by the build"
