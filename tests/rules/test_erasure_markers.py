"""Refusal markers (rules/erasure.py): keyed, stable, no personal data, the later erasure wins."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from rules.erasure import Erasures, decode_instant, encode_instant, marker_key

SECRET = b"k" * 32


def test_a_marker_key_is_the_hmac_of_the_id_and_does_not_contain_it() -> None:
    key = marker_key(SECRET, "alice@example.com")
    assert key == hmac.new(SECRET, b"alice@example.com", hashlib.sha256).hexdigest().encode()
    assert b"alice" not in key and len(key) == 64
    # Without the secret a guessed id does not lead to the marker: a plain hash is not it.
    assert key != hashlib.sha256(b"alice@example.com").hexdigest().encode()
    assert marker_key(b"another secret of 32 characters!", "alice@example.com") != key


def test_refusal_is_up_to_and_including_the_erasure_instant() -> None:
    erasures = Erasures(SECRET)
    assert not erasures and erasures.erased_at("alice") is None
    erasures.erase("alice", 1000.0)
    assert erasures.refuses("alice", 999.5) and erasures.refuses("alice", 1000.0)
    assert not erasures.refuses("alice", 1000.001)  # after the erasure: a new customer
    assert not erasures.refuses("bob", 10.0)


def test_erasing_twice_keeps_the_later_instant_and_markers_round_trip() -> None:
    erasures = Erasures(SECRET)
    key = erasures.erase("alice", 2000.0)
    assert not erasures.add(key, 1500.0)  # an older marker read later changes nothing
    assert erasures.erased_at("alice") == 2000.0
    assert erasures.add(key, 2500.0) and erasures.erased_at("alice") == 2500.0
    copy = Erasures(SECRET, [(key, decode_instant(encode_instant(2500.0)))])
    assert copy.erased_at("alice") == 2500.0 and len(copy) == 1


def test_the_secret_never_shows_and_must_not_be_empty() -> None:
    assert "k" * 8 not in repr(Erasures(SECRET))
    with pytest.raises(ValueError):
        Erasures(b"")
