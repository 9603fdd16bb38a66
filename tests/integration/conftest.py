"""Integration fixtures: one local Ray + Serve and the demo experts (real vLLM engines), started once per session.

`expert_clients` talks to the expert deployments of the session's live application (gateway_fixtures.py):
one set of engines for the whole suite. Four engines cost about 11 GiB; a second set for the expert tests
pushed the suite past Ray's memory monitor on a 24 GiB machine (replicas were killed mid-test).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from experts.config import ExpertConfig

REPO = Path(__file__).resolve().parents[2]
# ENSEMBLE_DEMO_DIR points the suite at another set of checkpoints laid out like artifacts/demo.
DEMO = Path(os.environ.get("ENSEMBLE_DEMO_DIR", REPO / "artifacts" / "demo"))
EXPERT_NAMES = ("code", "prose", "math", "json")
# float32 engines so the comparison with a transformers forward can use a tight tolerance (1e-3 nats);
# the bfloat16 default is covered by the same tests with a bf16 tolerance on one expert (BF16_EXPERT).
BF16_EXPERT = "json"
# The expert whose vLLM engine runs in processes of its own (ExpertConfig.engine_process="separate").
SEPARATE_ENGINE_EXPERT = "prose"
# Logprob agreement (nats) between two computations of the same positions: float32 engines agree with a
# float32 transformers forward to ~1e-5; bf16 typically to ~0.03, except where a MoE router near-tie flips
# (see test_expert_logprobs.assert_rows_match).
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.15}
MAX_MODEL_LEN = 256  # small, so the length-limit tests are cheap; the demo experts train on shorter contexts


def demo_expert_dir(name: str) -> Path:
    return DEMO / "experts" / name


def require_demo() -> None:
    if not (DEMO / ".built").exists():
        pytest.skip(f"demo experts not built ({DEMO / '.built'} missing): run `make demo` (make test does it)")


def demo_expert_configs() -> list[ExpertConfig]:
    """The demo experts as the tests serve them: small context and KV cache, float32 except BF16_EXPERT."""
    return [
        ExpertConfig(
            name=name,
            model_path=str(demo_expert_dir(name)),
            dtype="bfloat16" if name == BF16_EXPERT else "float32",
            max_model_len=MAX_MODEL_LEN,
            kv_cache_space_gib=0.25,  # ~100k float32 tokens of the demo model; four engines share 24 GiB
            max_num_seqs=64,
            # Spread the engines over the cores: vLLM's "auto" pins every engine to core 0 on 2 cores.
            cpu_threads_bind=str(i % (os.cpu_count() or 1)),
            # One expert keeps vLLM's engine in its own processes (AsyncLLM, the GPU layout), the others run it
            # in the replica (the CPU default): both layouts serve every test, and the fault tests can kill a
            # real EngineCore process.
            engine_process="separate" if name == SEPARATE_ENGINE_EXPERT else "auto",
        )
        for i, name in enumerate(EXPERT_NAMES)
        if (demo_expert_dir(name) / "config.json").is_file()
    ]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with more logical CPUs than cores: replicas ask for CPUs and would otherwise never schedule."""
    require_demo()
    import ray
    from ray import serve

    from deploy.serve_env import serve_env

    started = not ray.is_initialized()
    if started:
        # The Serve settings `ensemble serve` uses (HAProxy ingress, gRPC between deployments): tests run the
        # service as users do.
        env = serve_env({"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
                         "ENSEMBLE_FAULT_INJECTION": "1"})          # experts/fault_injection.py: these tests may
        ray.init(num_cpus=16, include_dashboard=False, runtime_env={"env_vars": env})
    since = time.time()
    yield ray
    serve.shutdown()
    if started:
        ray.shutdown()
        from deploy.orphans import reap_after_stop

        reap_after_stop(since)              # Serve's HAProxy would otherwise outlive the session


@pytest.fixture(scope="session")
def expert_configs() -> list[ExpertConfig]:
    require_demo()
    configs = demo_expert_configs()
    if not configs:
        pytest.skip(f"no expert checkpoints under {DEMO / 'experts'}")
    return configs


@pytest.fixture(scope="session")
def expert_clients(live_gateway, expert_configs):
    """dict name -> ServeExpertClient over the live application's expert deployments (real vLLM engines,
    started once per session, ~20-50 s each)."""
    from experts.server import connect_experts

    return connect_experts([c.name for c in expert_configs], live_gateway.app_name)


@pytest.fixture(scope="session")
def expert_config_by_name(expert_configs) -> dict[str, ExpertConfig]:
    return {c.name: c for c in expert_configs}


SAMPLE_TEXTS = {
    "code": "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "prose": "The old lighthouse keeper climbed the stairs every evening, counting the steps as the sea grew dark.",
    "math": "Solve for x: 3x + 7 = 22. Subtract 7 from both sides to get 3x = 15, so x = 5.",
    "json": '{"name": "widget", "version": "1.2.0", "tags": ["tools", "hardware"], "price": 19.99}',
}


@pytest.fixture(scope="session")
def tokenize(expert_configs):
    """Text -> token ids with the demo tokenizer (all experts share it; tests/unit checks the fingerprint)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(expert_configs[0].model_path) / "tokenizer.json"))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="session")
def assert_serves():
    """An async check that an expert still opens, steps and closes a fresh session."""
    import uuid

    from experts.protocol import SessionStep

    async def check(client) -> None:
        sid = f"probe-{uuid.uuid4().hex[:8]}"
        (opened,) = await client.open([SessionStep(sid, (5, 6, 7))], 5)
        assert opened.error is None and opened.topk is not None and opened.length == 3, opened
        (stepped,) = await client.advance([SessionStep(sid, (8,))], 5)
        assert stepped.error is None and stepped.length == 4, stepped
        await client.close([sid])

    return check


@pytest.fixture(scope="session")
def tolerance(expert_config_by_name):
    """name -> logprob tolerance for that expert's dtype."""
    return {name: TOLERANCE[cfg.dtype] for name, cfg in expert_config_by_name.items()}
