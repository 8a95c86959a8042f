"""`recon-stream run ROLE` whose event loop stalls at random, like a replica on a busy machine.

    python -m tests.load.stalled_worker scanner --min 0.02 --max 0.3 --seed 7

Settings come from the RECON_* environment, as for `recon-stream run`. Every
`--every` seconds on average the loop is blocked for a random time between `--min`
and `--max` seconds: half of the stalls burn the CPU holding the GIL (a slow
handler), half sleep in a blocking call (a synchronous library). Each stall is
appended to stderr as `stall <seconds>` so a test can see they happened.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

from recon_stream.app import ROLES, build_worker, serve
from recon_stream.settings import Settings


async def stall_at_random(rng: random.Random, low: float, high: float, every: float) -> None:
    while True:
        await asyncio.sleep(rng.expovariate(1.0 / every))
        seconds = rng.uniform(low, high)
        end = time.monotonic() + seconds
        if rng.random() < 0.5:
            while time.monotonic() < end:
                pass
        else:
            time.sleep(seconds)
        print(f"stall {seconds:.3f}", file=sys.stderr, flush=True)


async def main(role: str, low: float, high: float, every: float, seed: int) -> None:
    roles = ROLES if role == "all" else (role,)
    worker = build_worker(Settings(), roles)
    stalls = asyncio.create_task(stall_at_random(random.Random(seed), low, high, every))
    try:
        await serve(worker)
    finally:
        stalls.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role")
    parser.add_argument("--min", type=float, default=0.02, dest="low")
    parser.add_argument("--max", type=float, default=0.3, dest="high")
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(main(args.role, args.low, args.high, args.every, args.seed))
