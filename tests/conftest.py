"""Test-session plugins: the full-application fixture lives with the gateway tests."""

pytest_plugins = ["tests.integration.gateway_fixtures"]
