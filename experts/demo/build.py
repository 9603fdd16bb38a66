"""Placeholder: filled in by the demo-build work (see experts/demo)."""
