"""Build and run the real image with podman, on a machine with no Docker engine and no registry.

What this host needs, found by trying (see issue 16):

* podman runs with ``runc`` (crun refuses the hybrid cgroups here) and the ``cgroupfs`` manager
  (no systemd), and with ``nofile``/``nproc`` limits the host can grant: podman's defaults ask
  for more, and the container fails to start ("error setting rlimit"). `Podman.engine_config`
  writes that ``CONTAINERS_CONF`` unless one is already set.
* No registry: the base image the Dockerfile names (``python:3.11-slim-bookworm``) is made
  from Debian's packages with mmdebstrap (bookworm's Python is 3.11) and imported under that
  name; builds never pull (``--pull=never``). The redis and ollama images compose names are
  stand-ins built on it (tests/standins/).
* pip inside the build uses the index the host's pip uses, through the same TLS interception:
  the host's pip settings (``pip config list``, env vars included) become the build's
  /etc/pip.conf, and the files they name (CA bundle, local indexes) are mounted read-only.
  Nothing of it lands in the image: ``--volume`` exists only while a RUN step runs.
* ``--format docker`` keeps the HEALTHCHECK (OCI images have none); with no systemd to run it on
  a timer, tests run it with ``podman healthcheck run``.

Every image is built once per session at most: a build reuses podman's layer cache, and the
base and stand-ins are made only when missing.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STANDINS = Path(__file__).resolve().parent / "standins"
DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates,netbase,tzdata,curl"
# Every stand-in carries this label, so a test can tell it from a real image.
STANDIN_LABEL = "io.fallback-proxy.standin"


class PodmanUnavailable(Exception):
    """Podman (or what it needs) cannot run here; the message says what is missing."""


def qualified(name: str, *, built: bool = False) -> str:
    """An image name as podman stores it: a pulled ``python:3.11`` is ``docker.io/library/python:3.11``,
    a ``fallback-proxy:0.1.0`` built here is ``localhost/fallback-proxy:0.1.0``."""
    first = name.split("/")[0]
    if "/" in name and ("." in first or ":" in first or first == "localhost"):
        return name
    if built:
        return f"localhost/{name}"
    return f"docker.io/{name}" if "/" in name else f"docker.io/library/{name}"


def dockerfile_bases(dockerfile: Path) -> list[str]:
    """The images the Dockerfile's stages start FROM (not its own stages)."""
    stages: set[str] = set()
    bases: list[str] = []
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].upper() == "FROM":
            if words[1] not in stages and words[1] not in bases:
                bases.append(words[1])
            if len(words) == 4 and words[2].upper() == "AS":
                stages.add(words[3])
    return bases


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


class Podman:
    """The podman command with this host's engine settings."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = dict(os.environ)
        if not self.env.get("CONTAINERS_CONF"):
            self.env["CONTAINERS_CONF"] = str(self.engine_config(workdir / "containers.conf"))

    @staticmethod
    def engine_config(path: Path) -> Path:
        """A containers.conf for this host: runc, cgroupfs, limits it can grant, events to a file."""
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text(encoding="ascii"))
        # runc could not set nproc above pid_max here, though the hard limit was higher.
        nproc = min(nproc if nproc != resource.RLIM_INFINITY else pid_max, pid_max)
        nofile = min(nofile if nofile != resource.RLIM_INFINITY else 1048576, 1048576)
        manager = "systemd" if Path("/run/systemd/system").is_dir() else "cgroupfs"
        path.write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            f'cgroup_manager = "{manager}"\n'
            'events_logger = "file"\n',
            encoding="utf-8",
        )
        return path

    def run(self, *args: str, timeout: float = 120, check: bool = True, input: str | None = None) -> Run:
        done = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        result = Run(done.returncode, done.stdout, done.stderr)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
        return result

    def exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0

    def inspect(self, name: str) -> dict[str, object]:
        found = json.loads(self.run("inspect", name).stdout)
        assert isinstance(found, list) and found
        first = found[0]
        assert isinstance(first, dict)
        return first

    def ensure_runs(self, image: str) -> None:
        """Raise PodmanUnavailable unless a container starts here (runtime, cgroups, limits)."""
        probe = self.run("run", "--rm", "--network", "none", image, "true", check=False, timeout=60)
        if probe.returncode != 0:
            raise PodmanUnavailable(f"podman cannot start a container here: {probe.stderr.strip()[-500:]}")

    # --- images ---------------------------------------------------------------------------

    def ensure_debian_base(self, name: str) -> None:
        """A stand-in for ``name`` (a Debian bookworm Python image) from Debian's packages."""
        if self.exists(name):
            return
        if shutil.which("mmdebstrap") is None:
            raise PodmanUnavailable(f"no {name} image and no mmdebstrap to make one (apt-get install mmdebstrap)")
        tarball = self.workdir / "base.tar"
        made = subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", DEBIAN_SUITE, str(tarball)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if made.returncode != 0:
            raise PodmanUnavailable(f"mmdebstrap could not make the base image: {made.stderr.strip()[-800:]}")
        self.run(
            "import",
            "--change",
            'CMD ["python3"]',
            "--change",
            "ENV LANG=C.UTF-8",
            "--change",
            f"LABEL {STANDIN_LABEL}=debian-{DEBIAN_SUITE}",
            str(tarball),
            name,
            timeout=300,
        )
        tarball.unlink()

    def build(
        self,
        tag: str,
        context: Path,
        *,
        containerfile: Path | None = None,
        build_args: dict[str, str] | None = None,
        timeout: float = 900,
    ) -> None:
        """``podman build`` as ``docker build`` would, offline, with the host's pip settings mounted."""
        pip = PipSettings.of_host()
        conf = self.workdir / "pip.conf"
        conf.write_text(pip.conf(), encoding="utf-8")
        volumes = [f"--volume={conf}:/etc/pip.conf:ro"]
        volumes += [f"--volume={path}:{path}:ro" for path in pip.mounts()]
        self.run(
            "build",
            "--pull=never",
            "--format=docker",
            "--network=host",
            *volumes,
            *(f"--build-arg={key}={value}" for key, value in (build_args or {}).items()),
            f"--tag={tag}",
            f"--file={containerfile or next(p for p in (context / 'Dockerfile', context / 'Containerfile') if p.exists())}",
            str(context),
            timeout=timeout,
        )

    # --- containers -------------------------------------------------------------------------

    def healthy(self, container: str) -> Run:
        """Run the container's health check once (what systemd's timer would do)."""
        return self.run("healthcheck", "run", container, check=False, timeout=60)

    def wait_healthy(self, container: str, within: float) -> Run:
        deadline = time.monotonic() + within
        while True:
            result = self.healthy(container)
            if result.returncode == 0 or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    def remove(self, *containers: str) -> None:
        if containers:
            self.run("rm", "--force", "--time=0", *containers, check=False, timeout=120)


@dataclass(frozen=True)
class PipSettings:
    """The host pip's effective settings (``pip config list``), to be used inside a build."""

    sections: dict[str, dict[str, str]]

    @classmethod
    def of_host(cls) -> PipSettings:
        import sys

        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        sections: dict[str, dict[str, str]] = {}
        environment: dict[str, str] = {}
        for line in listed.splitlines():
            match = re.fullmatch(r"(:env:|[\w-]+)\.([\w-]+)='(.*)'", line.strip())
            if match is None:
                continue
            where, key, value = match.groups()
            if where == ":env:":
                environment[key] = value
            else:
                sections.setdefault(where, {})[key] = value
        sections.setdefault("global", {}).update(environment)  # PIP_* variables win, as in pip
        return cls(sections)

    def conf(self) -> str:
        lines = []
        for section, values in self.sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {value}" for key, value in values.items()]
        return "\n".join(lines) + "\n"

    def mounts(self) -> list[Path]:
        """The local files and folders the settings name (CA bundle, file:// indexes, find-links)."""
        found: list[Path] = []
        for values in self.sections.values():
            for value in values.values():
                for word in value.split():
                    path = _local_path(word)
                    if path is not None and path.exists():
                        found.append(path.parent if path.name == "simple" else path)
        found = sorted(set(found))
        return [p for p in found if not any(p != q and p.is_relative_to(q) for q in found)]


def _local_path(word: str) -> Path | None:
    if word.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(word).path))
    return Path(word) if word.startswith("/") else None


def missing_tools(tools: Sequence[str]) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


# --- the session: what the container tests share ----------------------------------------------

REQUIRE_VARIABLE = "FALLBACK_PROXY_REQUIRE_PODMAN"  # set by .ci/run once it installed podman: fail, never skip
NEEDED_TOOLS = ("podman", "runc")


def compose_images(compose_file: Path = ROOT / "docker-compose.yml") -> dict[str, str]:
    """Service name -> the image docker-compose.yml names for it (qualified as podman stores it)."""
    import yaml

    services = yaml.safe_load(compose_file.read_text(encoding="utf-8"))["services"]
    return {name: qualified(spec["image"], built="build" in spec) for name, spec in services.items() if "image" in spec}


def start_session(workdir: Path) -> Podman:
    """A working podman with the Dockerfile's base image present; PodmanUnavailable if it cannot be."""
    missing = missing_tools(NEEDED_TOOLS)
    if missing:
        raise PodmanUnavailable(f"{', '.join(missing)} not installed (.ci/run installs them with apt-get)")
    podman = Podman(workdir)
    info = podman.run("info", check=False, timeout=60)
    if info.returncode != 0:
        raise PodmanUnavailable(f"`podman info` failed: {info.stderr.strip()[-500:]}")
    # Images earlier runs replaced (untagged, nothing built on them); the layer cache stays.
    podman.run("image", "prune", "--force", "--filter=until=1h", check=False, timeout=300)
    for base in dockerfile_bases(ROOT / "Dockerfile"):
        podman.ensure_debian_base(qualified(base))
        podman.ensure_runs(qualified(base))
    return podman


def build_proxy_image(podman: Podman) -> str:
    """The image of this work tree, tagged as docker-compose.yml names it; the layer cache makes a
    rebuild of unchanged code take seconds."""
    tag = compose_images()["proxy"]
    podman.build(tag, ROOT)
    return tag


def build_standins(podman: Podman, proxy_image: str) -> dict[str, str]:
    """The redis and ollama images docker-compose.yml names, as stand-ins (built when missing or
    when the proxy image they are built on changed)."""
    images = compose_images()
    base = qualified(dockerfile_bases(ROOT / "Dockerfile")[0])
    podman.build(images["redis"], STANDINS / "redis", build_args={"BASE": base})
    podman.build(images["ollama"], STANDINS / "ollama", build_args={"PROXY_IMAGE": proxy_image})
    assert images["ollama-pull"] == images["ollama"]
    return {name: images[name] for name in ("redis", "ollama")}
