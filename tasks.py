#!/usr/bin/env python3
"""Set-up-and-run entry point needing nothing but Python 3.11+.

    python3 tasks.py dev     # install (first time) and run `recon-stream dev`
    python3 tasks.py test    # install (first time) and run lint, types and every test
    python3 tasks.py repeat N [--jobs J] [PYTEST ARGS]
                             # the integration suite N times (J copies side by side, to
                             # load the CPU), then which tests failed in how many runs

It installs the pinned uv into `.tools/` (a virtualenv of its own), and lets
uv create `.venv` with the locked dependencies (`uv.lock`) before running the
command.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TOOLS = ROOT / ".tools"
SCRIPTS = "Scripts" if os.name == "nt" else "bin"
BIN = VENV / SCRIPTS
UV_VERSION = "0.13.9"


def sh(*args: str | Path, env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    code = subprocess.call([str(a) for a in args], cwd=cwd, env=env)
    if code:
        sys.exit(code)


def install(dev: bool) -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"recon-stream needs Python 3.11+, this is {sys.version.split()[0]}")
    uv = TOOLS / SCRIPTS / "uv"
    if not uv.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(TOOLS)
        sh(TOOLS / SCRIPTS / "python", "-m", "pip", "install", "--quiet", f"uv=={UV_VERSION}")
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(VENV)}
    sh(uv, "sync", "--frozen", *(() if dev else ("--no-dev",)), env=env)


def install_test_tools() -> None:
    """What the tests need beyond Python packages.

    Debian's `prometheus` package (the server and `promtool`, for the alert-rule
    tests and the real-Prometheus scrape test), `iproute2` (`ip netns`, for the
    verification tests' network namespaces), and the npm packages pinned in
    `tests/tools/package-lock.json` (Grafana's dashboard types and the JSON
    schema generator, for the dashboard test).
    """
    commands = {"prometheus": ("prometheus", "promtool"), "iproute2": ("ip",)}
    debian = [
        package
        for package, needed in commands.items()
        if any(shutil.which(command) is None for command in needed)
    ]
    if debian:
        apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "apt-get"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh(*apt, "update", "-q", env=env)
        sh(*apt, "install", "-y", "-q", "--no-install-recommends", *debian, env=env)
    tools = ROOT / "tests" / "tools"
    installed = tools / "node_modules" / ".package-lock.json"
    lock = tools / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        sh("npm", "ci", "--no-audit", "--no-fund", "--loglevel=error", cwd=tools)


def repeat(times: int, jobs: int, extra: list[str]) -> None:
    """Run the integration suite `times` times, `jobs` copies at once; exit 1 if any failed.

    Each copy starts its own servers on free ports, so copies side by side are
    independent; they only compete for the CPU, which is the point: a test that
    waits on a clock instead of a condition fails under load.
    """
    command = [str(BIN / "python"), "-m", "pytest", "tests/integration", "-q", "-rfE"]
    command += ["-p", "no:cacheprovider", *extra]
    failed: dict[str, int] = {}
    bad_runs = 0
    with tempfile.TemporaryDirectory(prefix="recon-repeat-") as logs:
        for start in range(0, times, jobs):
            wave = range(start + 1, min(start + jobs, times) + 1)
            running = []
            for run in wave:
                log = Path(logs) / f"run-{run}.log"
                with log.open("w") as out:
                    proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
                running.append((run, proc, log))
            for run, proc, log in running:
                code = proc.wait()
                text = log.read_text(errors="replace")
                summary = text.strip().splitlines()[-1] if text.strip() else "(no output)"
                print(f"run {run}/{times}: {summary}", flush=True)
                if code:
                    bad_runs += 1
                    print(text[-6000:], flush=True)
                for name in re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.MULTILINE):
                    failed[name] = failed.get(name, 0) + 1
    print(f"{times - bad_runs} of {times} runs passed")
    for name, count in sorted(failed.items(), key=lambda item: -item[1]):
        print(f"  failed in {count} run(s): {name}")
    sys.exit(1 if bad_runs else 0)


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "help"
    extra = sys.argv[2:]
    if command == "dev":
        install(dev=True)  # `dev` embeds Tansu and SecantusDB, shipped as dev dependencies
        sh(BIN / "recon-stream", "dev", *extra)
    elif command == "test":
        install(dev=True)
        install_test_tools()
        sh(BIN / "ruff", "check", "recon_stream", "tests", "bench")
        sh(BIN / "ruff", "format", "--check", "recon_stream", "tests", "bench")
        sh(BIN / "mypy")
        sh(BIN / "python", "-m", "pytest", *(extra or ["-q"]))
    elif command == "repeat":
        if not extra or not extra[0].isdigit():
            sys.exit("usage: python3 tasks.py repeat N [--jobs J] [PYTEST ARGS]")
        times, rest, jobs = int(extra[0]), extra[1:], 1
        if rest[:1] == ["--jobs"] and len(rest) > 1 and rest[1].isdigit():
            jobs, rest = int(rest[1]), rest[2:]
        install(dev=True)
        install_test_tools()
        repeat(times, max(1, jobs), rest)
    else:
        print(__doc__)
        sys.exit(0 if command == "help" else 2)


if __name__ == "__main__":
    main()
