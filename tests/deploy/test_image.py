"""The container image: hadolint on the Dockerfile, and the properties the compose
file and the chart rely on. No Docker engine exists here, so the build itself is
not run; its pieces are checked against what they must match (uv.lock and its uv
version, the console script, the health endpoint, the build context).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from recon_stream.cli import Role
from recon_stream.settings import Settings
from recon_stream.status import StatusServer

pytestmark = pytest.mark.deploy


def hadolint(tool: Any, path: Path) -> tuple[int, list[dict[str, Any]]]:
    """The exit status (failing from the `style` level up) and every finding."""
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--format", "json", "--failure-threshold", "style", path],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout.startswith("["), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_hadolint_finds_nothing(tool: Any, root: Path) -> None:
    assert hadolint(tool, root / "Dockerfile") == (0, [])


def test_hadolint_is_a_real_check(tool: Any, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install uv\nCMD recon-stream run all\n")
    status, findings = hadolint(tool, bad)
    assert status != 0
    assert {"DL3007", "DL3013", "DL3025"} <= {finding["code"] for finding in findings}


def test_multi_stage_build_from_the_lock_file(dockerfile: Any, root: Path) -> None:
    build, runtime = dockerfile.stage("build"), dockerfile.stage("runtime")
    assert dockerfile.final is runtime
    # The venv holds absolute links to the build stage's interpreter: the
    # runtime stage must run the very same base image.
    assert dockerfile.resolve(build.base) == dockerfile.resolve(runtime.base)
    assert re.fullmatch(r"python:3\.\d+-slim-\w+", dockerfile.resolve(runtime.base))
    python = dockerfile.args["PYTHON_VERSION"]
    requires = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "requires-python"
    ]
    low = requires.removeprefix(">=")
    assert tuple(map(int, python.split("."))) >= tuple(map(int, low.split(".")))
    syncs = [run for run in build.all("RUN") if "uv sync" in run]
    assert len(syncs) == 2
    for run in syncs:
        assert "--frozen" in run
        assert "--no-dev" in run  # `recon-stream dev` and the test servers stay out
    assert "--no-editable" in syncs[-1]  # the project as a wheel: no source tree needed
    env = build.env()
    assert env["UV_PROJECT_ENVIRONMENT"] == "/opt/recon-stream"
    assert env["UV_COMPILE_BYTECODE"] == "1"
    (copy,) = [c for c in runtime.all("COPY") if c.startswith("--from=build")]
    assert copy.split()[1:] == ["/opt/recon-stream", "/opt/recon-stream"]


def test_uv_is_the_version_that_wrote_the_lock(dockerfile: Any, root: Path) -> None:
    tasks = (root / "tasks.py").read_text(encoding="utf-8")
    (pinned,) = re.findall(r'^UV_VERSION = "([^"]+)"', tasks, flags=re.MULTILINE)
    assert dockerfile.args["UV_VERSION"] == pinned
    (uv_stage,) = [s for s in dockerfile.stages if s.alias == "uv"]
    assert dockerfile.resolve(uv_stage.base) == f"ghcr.io/astral-sh/uv:{pinned}"


def test_build_copies_what_the_project_build_needs(dockerfile: Any, root: Path) -> None:
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    copied = " ".join(dockerfile.stage("build").all("COPY"))
    assert project["project"]["readme"] in copied.split()  # hatchling reads it
    for package in project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        assert package in copied
    assert "uv.lock" in copied.split()


def test_runs_as_a_fixed_non_root_user(dockerfile: Any) -> None:
    user = dockerfile.final.last("USER")
    uid, _, gid = user.partition(":")
    # Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) != 0
    assert int(gid) != 0
    created = " ".join(dockerfile.final.all("RUN"))
    assert f"--uid {uid}" in created


def test_nothing_needs_a_writable_root(dockerfile: Any) -> None:
    env = dockerfile.final.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == "/tmp"
    assert env["TMPDIR"] == "/tmp"
    assert env["PATH"].startswith("/opt/recon-stream/bin:")


def test_one_image_for_every_role(dockerfile: Any, root: Path) -> None:
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    entrypoint = json.loads(dockerfile.final.last("ENTRYPOINT"))
    assert entrypoint == ["recon-stream"]
    assert "recon-stream" in project["project"]["scripts"]
    command = json.loads(dockerfile.final.last("CMD"))
    assert command[0] == "run"
    assert command[1] in {role.value for role in Role}


def test_exposes_the_status_port(dockerfile: Any) -> None:
    default = Settings.model_fields["http_port"].default
    assert dockerfile.final.last("EXPOSE") == str(default)
    assert dockerfile.final.env()["RECON_HTTP_PORT"] == str(default)


def healthcheck_command(dockerfile: Any) -> list[str]:
    spec = dockerfile.final.last("HEALTHCHECK")
    options, _, command = spec.partition("CMD ")
    assert "--interval=" in options
    assert "--timeout=" in options
    return json.loads(command)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_healthcheck(command: list[str], port: int) -> int:
    assert command[0] == "python"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command[1:],
        env={"RECON_HTTP_PORT": str(port)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 20)


async def test_healthcheck_probes_the_live_status_endpoint(dockerfile: Any) -> None:
    """The image's HEALTHCHECK command, run against the real status server."""
    command = healthcheck_command(dockerfile)
    assert "/healthz" in " ".join(command)
    server = StatusServer(CollectorRegistry(), "127.0.0.1", 0)

    async def failing() -> str:
        return "Kafka unreachable"

    server.add_check("kafka", failing)  # not ready, yet alive: healthy
    await server.start()
    try:
        assert await run_healthcheck(command, server.port) == 0
    finally:
        await server.stop()
    assert await run_healthcheck(command, free_port()) != 0


# ------------------------------------------------------------ .dockerignore
def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body[:1] in ("!", "^") else body) + "]"
            i = end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = pattern_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.match(candidate) for candidate in candidates):
            verdict = not negate
    return verdict


def test_build_context_holds_only_what_the_build_copies(root: Path, dockerfile: Any) -> None:
    patterns = [
        line.strip()
        for line in (root / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        word
        for copy in dockerfile.stage("build").all("COPY")
        if not copy.startswith("--from")
        for word in copy.split()[:-1]
    ]
    sources += re.findall(r"source=([^,\s]+)", " ".join(dockerfile.stage("build").all("RUN")))
    package_files = [
        str(p.relative_to(root))
        for p in (root / "recon_stream").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert package_files
    for path in [*sources, *package_files, "recon_stream/samples/shodan_hosts.json"]:
        assert not ignored(path, patterns), path
    for path in [
        ".env",
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        ".recon-dev/db/x",
        "deploy/helm/recon-stream/values.yaml",
        "recon_stream/__pycache__/app.cpython-311.pyc",
        "recon_stream/domain/__pycache__/risk.cpython-311.pyc",
        "node_modules/x/index.js",
    ]:
        assert ignored(path, patterns), path
