"""The key table on SQLite and PostgreSQL: add (digest only), list, revoke, names unique forever, and a
replica's cached view that follows revocation on its next refresh."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from orchestrator.keys import KeySpecError, KeyStore, KeyView
from orchestrator.keys.tables import api_keys


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    return request.getfixturevalue("postgres_server").new_database()


def test_add_stores_only_a_salted_digest(store_url) -> None:
    store = KeyStore(store_url)
    key, token = store.add("team-a", rpm=5, tpm=1000, max_streams=2)
    with store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(api_keys)).mappings()]
    assert len(rows) == 1 and rows[0]["name"] == "team-a" and rows[0]["rpm"] == 5
    secret = token.split("-", 2)[2]
    assert not any(secret in str(v) or token in str(v) for v in rows[0].values())
    assert [k.public() for k in store.list()] == [key.public()] and "digest" not in key.public()
    store.close()


def test_list_revoke_and_names_unique_forever(store_url) -> None:
    store = KeyStore(store_url)
    store.add("a")
    store.add("boss", "admin")
    with pytest.raises(KeySpecError, match="exists already"):
        store.add("a")
    assert {k.name for k in store.active().values()} == {"a", "boss"}
    revoked = store.revoke("a")
    assert revoked.revoked is not None
    assert [k.name for k in store.active().values()] == ["boss"]
    assert [k.name for k in store.list()] == ["a", "boss"]
    with pytest.raises(KeySpecError, match="no active key"):
        store.revoke("a")
    with pytest.raises(KeySpecError, match="exists already"):        # a revoked name is not reused
        store.add("a")
    store.close()


@pytest.mark.parametrize("bad", [{"name": "no spaces"}, {"name": ""}, {"name": "x", "scope": "root"},
                                 {"name": "x", "rpm": 0}, {"name": "x", "tpm": -1}])
def test_invalid_keys_are_refused(tmp_path, bad) -> None:
    store = KeyStore(f"sqlite:///{tmp_path / 'k.db'}")
    name = bad.pop("name")
    with pytest.raises(KeySpecError):
        store.add(name, **bad)


def test_the_view_authenticates_and_follows_revocation(store_url) -> None:
    store, other_replica = KeyStore(store_url), KeyStore(store_url)
    view = KeyView(other_replica.active)
    assert view.refresh() and view.ready and not view.enforcing          # no key: the service is open
    key, token = store.add("a")
    assert view.lookup(token) is None                                     # not seen until the next refresh
    view.refresh()
    assert view.enforcing and view.lookup(token) == key
    assert view.lookup(token[:-2]) is None and view.lookup("ens-" + "0" * 12 + "-" + "x" * 43) is None
    store.revoke("a")
    view.refresh()
    assert view.lookup(token) is None and not view.enforcing


def test_a_failed_refresh_keeps_the_last_view(tmp_path, caplog) -> None:
    calls = iter([{}, RuntimeError("db down")])

    def load():
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    view = KeyView(load)
    assert view.refresh() and not view.refresh()
    assert view.ready and not view.enforcing and "cannot reload" in caplog.text


def test_a_gateway_starts_against_an_unreachable_store_and_refuses_until_it_answers(tmp_path) -> None:
    from orchestrator.keys import KeyGuard
    from orchestrator.store import StoreError

    url = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
    with pytest.raises(StoreError):
        KeyStore(url)                                   # the CLI: say so at once
    guard = KeyGuard.open(url, background=False)       # a gateway: comes up, not ready
    assert not guard.view.ready and "unknown" in guard.describe()
    guard.close()
