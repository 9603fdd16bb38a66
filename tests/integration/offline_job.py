"""A minimal offline job for tests/integration/test_offline_job_faults.py, run as its own process.

It starts its own local Ray with one demo expert exactly as `ensemble eval`, `train-gate` and `retrain` do
(deploy.local_experts.running_experts: a Serve app per expert, the Serve watchdog), then scores in a loop.
Prints `READY` once the expert answers; on ServeLost prints `LOST: <message>` to stderr and
exits 3. Any other end is a failure of the test.

    python -m tests.integration.offline_job code
"""

from __future__ import annotations

import asyncio
import sys


async def main(expert_name: str) -> None:
    from deploy.local_experts import running_experts
    from tests.integration.conftest import demo_expert_configs

    configs = [c for c in demo_expert_configs() if c.name == expert_name]
    async with running_experts(configs, num_cpus=4) as experts:
        expert = experts[expert_name]
        await expert.score([[1, 2, 3]], 1)
        print("READY", flush=True)
        while True:
            await expert.score([[1, 2, 3, 4]], 1)
            await asyncio.sleep(0.2)


if __name__ == "__main__":
    from deploy.local_experts import ServeLost

    try:
        asyncio.run(main(sys.argv[1]))
    except ServeLost as exc:
        print(f"LOST: {exc}", file=sys.stderr, flush=True)
        sys.exit(3)
