"""Test-session plugins: the full-application fixture lives with the gateway tests; tests/postgres.py
starts a throwaway PostgreSQL server for the store tests that need one."""

pytest_plugins = ["tests.integration.gateway_fixtures", "tests.postgres"]
