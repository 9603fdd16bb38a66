"""API keys: who may call the gateway, how much (rpm, tpm, concurrent streams), and who is admin.

Keys live in the traffic store's database as salted HMAC digests (keys/store.py); each gateway replica checks
callers against a view reloaded every ~2 s (keys/view.py) and meters them in the shared store (keys/limits.py).
"""

from orchestrator.keys.guard import KeyGuard
from orchestrator.keys.limits import Admitted, Lease, Limiter, Refusal
from orchestrator.keys.records import ApiKey, KeySpecError
from orchestrator.keys.store import KeyStore
from orchestrator.keys.view import KeyView

__all__ = ["Admitted", "ApiKey", "KeyGuard", "KeySpecError", "KeyStore", "KeyView", "Lease", "Limiter", "Refusal"]
