"""Compatibility import: the traffic log now lives in orchestrator.store (one store behind a URL).

Kept for callers not yet moved (tests/integration read `iter_records` from here); new code imports
orchestrator.store.
"""

from orchestrator.store import FeedbackRecord, TrafficLog, TrafficRecord, iter_feedback, iter_records

__all__ = ["FeedbackRecord", "TrafficLog", "TrafficRecord", "iter_feedback", "iter_records"]
