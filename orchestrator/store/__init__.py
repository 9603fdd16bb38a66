"""The store: every request, its feedback (and later API keys) in one database chosen by a URL.

`sqlite:///traffic.db` (WAL; one machine) by default, `postgresql://...` on a cluster; ENSEMBLE_STORE_URL
overrides the config. SQL is built only inside this package, with SQLAlchemy Core, for both backends.
"""

from orchestrator.store.readers import iter_feedback, iter_records, traffic_log_exists
from orchestrator.store.records import FeedbackRecord, TrafficRecord
from orchestrator.store.url import (
    DEFAULT_URL,
    ENV_VAR,
    StoreError,
    as_url,
    is_database_url,
    redact,
    registry_location,
    resolve_store_url,
)
from orchestrator.store.writer import StoreStats, TrafficLog

__all__ = [
    "DEFAULT_URL", "ENV_VAR", "FeedbackRecord", "StoreError", "StoreStats", "TrafficLog", "TrafficRecord",
    "as_url", "is_database_url", "iter_feedback", "iter_records", "redact", "registry_location",
    "resolve_store_url", "traffic_log_exists",
]
