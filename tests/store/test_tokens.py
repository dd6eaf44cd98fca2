"""The api_tokens aggregate on both engines: what a command writes is what it returns, only a
hash is kept, names are unique, and a revoked token keeps its row."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest

from agent.errors import TokenExists, TokenNotFound
from agent.store import RunStore


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[RunStore]:
    """A fresh store on SQLite, then on PostgreSQL."""
    opened = await RunStore.open(db_url)
    try:
        yield opened
    finally:
        await opened.close()


async def test_create_list_find_and_revoke(store: RunStore) -> None:
    created = await store.create_token("sam-laptop", "sam", _hash("lo_one"))
    assert (created.name, created.person, created.revoked_at) == ("sam-laptop", "sam", None)
    assert created.identity == "api:sam-laptop"
    await store.create_token("lee-ci", "lee", _hash("lo_two"))

    assert await store.list_tokens() == [created, await store.token_by_hash(_hash("lo_two"))]
    assert await store.token_by_hash(_hash("lo_one")) == created
    assert await store.token_by_hash(_hash("lo_unknown")) is None

    revoked = await store.revoke_token("sam-laptop")
    assert revoked.revoked_at is not None and revoked.created_at == created.created_at
    # The row stays (its name is still sam's identity), and a second revoke changes nothing.
    assert await store.token_by_hash(_hash("lo_one")) == revoked
    assert await store.revoke_token("sam-laptop") == revoked
    assert [t.name for t in await store.list_tokens()] == ["sam-laptop", "lee-ci"]


async def test_a_name_is_one_token_and_an_unknown_name_is_not_found(store: RunStore) -> None:
    await store.create_token("sam-laptop", "sam", _hash("lo_one"))
    await store.revoke_token("sam-laptop")
    with pytest.raises(TokenExists, match="sam-laptop"):
        await store.create_token("sam-laptop", "lee", _hash("lo_other"))
    with pytest.raises(TokenNotFound, match="nope"):
        await store.revoke_token("nope")
    assert [(t.name, t.person) for t in await store.list_tokens()] == [("sam-laptop", "sam")]
