"""Key material: the `ens-<id>-<secret>` format, the salted HMAC digest, and constant-time verification."""

from __future__ import annotations

from orchestrator.keys.secret import digest, new_key, parse, verify


def test_a_new_key_parses_back_to_its_id_and_secret() -> None:
    made = new_key()
    assert made.token.startswith(f"ens-{made.key_id}-") and parse(made.token) == (made.key_id, made.secret)
    assert len(made.key_id) == 12 and len(made.secret) >= 40


def test_the_digest_verifies_only_the_exact_key() -> None:
    made = new_key()
    assert verify(made.token, made.key_id, made.salt, made.digest)
    other = new_key()
    assert not verify(other.token, made.key_id, made.salt, made.digest)                 # another key
    assert not verify(made.token[:-1] + ("A" if made.token[-1] != "A" else "B"), made.key_id, made.salt,
                      made.digest)                                                         # one char off
    assert not verify(f"ens-{other.key_id}-{made.secret}", made.key_id, made.salt, made.digest)   # id swapped


def test_digests_are_salted_per_key_and_never_contain_the_secret() -> None:
    a = new_key()
    assert digest(a.key_id, a.secret, a.salt) == a.digest
    assert digest(a.key_id, a.secret, new_key().salt) != a.digest
    assert a.secret not in a.digest and a.secret not in repr(a) and a.token not in repr(a)


def test_malformed_tokens_are_rejected_without_error() -> None:
    for token in ("", "sk-secret", "ens-", "ens-xyz-abc", "ens-0123456789ab-", "Bearer ens-0123456789ab-" + "a" * 40,
                  "ens-0123456789AB-" + "a" * 40, "ens-0123456789ab-" + "a" * 40 + " "):
        assert parse(token) is None
