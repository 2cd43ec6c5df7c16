"""Key layout 2 (broker/keys.py): the namespace between braces starts every key, its Redis Cluster hash
tag; a namespace can hold neither braces nor ``:``, so no namespace's keys are another's."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from mesh.broker.keys import Keys, legacy_pattern, prefix
from mesh.broker.settings import MeshSettings


def test_every_key_starts_with_the_namespace_between_braces():
    keys = Keys("shop")
    assert prefix("shop") == keys.prefix == "{shop}"
    built = []
    for field in dir(Keys):
        attr = getattr(Keys, field)
        if field.startswith("_") or field in {"namespace", "prefix", "legacy_everything"}:
            continue
        if isinstance(attr, property):
            built.append(getattr(keys, field))
        elif callable(attr):
            n = attr.__code__.co_argcount - 1
            built.append(attr(keys, *(["x"] * n)))
    assert len(built) > 70
    assert [k for k in built if not k.startswith("{shop}:")] == []
    assert keys.job("1") == "{shop}:job:1" and keys.queue("q") == "{shop}:q"
    assert keys.everything == "{shop}:*" and keys.legacy_everything == legacy_pattern("shop") == "shop:*"
    assert keys == Keys("shop") and "prefix" not in repr(keys)
    with pytest.raises(dataclasses.FrozenInstanceError):
        keys.prefix = "{other}"  # type: ignore[misc]


@pytest.mark.parametrize("namespace", ["a{b", "a}b", "{a}", "a:b", ""])
def test_a_namespace_with_braces_or_a_colon_is_refused(namespace):
    with pytest.raises(ValidationError):
        MeshSettings(namespace=namespace)
