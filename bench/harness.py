"""What the benchmarks that run workers in-process share: logs on stderr (FastStream's
quietened), the result as JSON on stdout, and the servers: Tansu and MongoDB embedded
(genuine mongod where its wheel is installed, else SecantusDB) unless `--kafka` /
`--mongodb` name servers of the caller's."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from recon_stream.embedded import EmbeddedKafka, EmbeddedMongo

Run = Callable[[str, str, str, argparse.Namespace], Awaitable[Any]]
"""`run(kafka, mongodb, mongodb_server, args)`: the benchmark; returns its JSON result."""


def run_on_servers(run: Run, args: argparse.Namespace) -> None:
    """Start the servers `args` does not name, run the benchmark, print its result."""
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("faststream").setLevel(logging.WARNING)
    # FastStream's broker logger gets its own level (INFO) and a stdout handler at
    # every broker start; a filter survives that.
    logging.getLogger("faststream.access.kafka").addFilter(
        lambda record: record.levelno >= logging.WARNING
    )
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the JSON only
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recon-bench-")))
        kafka = args.kafka or stack.enter_context(EmbeddedKafka(log_dir=tmp)).bootstrap_servers
        if args.mongodb:
            mongodb, mongodb_server = args.mongodb, "external"
        else:
            embedded = stack.enter_context(EmbeddedMongo(data_dir=tmp / "mongo", log_dir=tmp))
            mongodb, mongodb_server = embedded.uri, f"embedded {embedded.engine}"
        result = asyncio.run(run(kafka, mongodb, mongodb_server, args))
    print(json.dumps(result, indent=2), file=out)
