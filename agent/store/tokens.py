"""API tokens: the hashes of people's tokens for the HTTP API (`loom-ops tokens`).

The store never sees a token, only its SHA-256: a token is 256 random bits, so the hash
cannot be guessed or reversed, and a plain hash (no salt, no slow KDF) lets a request's token
be found by one indexed lookup.
"""

from __future__ import annotations

import time

from agent.errors import TokenExists, TokenNotFound
from agent.records import ApiTokenRecord
from agent.store.base import StoreBase
from agent.store.database import Connection
from agent.store.rows import TOKEN_COLUMNS, token_from_row


class TokensStore(StoreBase):
    """The api_tokens aggregate."""

    async def create_token(self, name: str, person: str, token_hash: str) -> ApiTokenRecord:
        """Store a new token's hash for `person`; TokenExists when the name is taken."""
        now = time.time()

        def create(conn: Connection) -> ApiTokenRecord:
            # DO NOTHING: the same name created at this moment elsewhere is TokenExists too.
            inserted = conn.execute(
                "INSERT INTO api_tokens (name, person, token_hash, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (name, person, token_hash, now),
            )
            if inserted.rowcount != 1:
                raise TokenExists(f"an API token named {name!r} exists already")
            return ApiTokenRecord(name=name, person=person, created_at=now, revoked_at=None)

        return await self._transaction(create)

    async def list_tokens(self) -> list[ApiTokenRecord]:
        """Every token, revoked ones included, oldest first."""
        return await self._transaction(
            lambda c: [
                token_from_row(row)
                for row in c.execute(
                    f"SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, name"
                ).fetchall()
            ]
        )

    async def token_by_hash(self, token_hash: str) -> ApiTokenRecord | None:
        """The token whose hash this is (revoked or not), or None."""

        def find(conn: Connection) -> ApiTokenRecord | None:
            row = conn.execute(
                f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            return token_from_row(row) if row else None

        return await self._transaction(find)

    async def revoke_token(self, name: str) -> ApiTokenRecord:
        """Revoke a token (a revoked one stays as it was); TokenNotFound for an unknown name."""
        now = time.time()

        def revoke(conn: Connection) -> ApiTokenRecord:
            conn.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (now, name),
            )
            row = conn.execute(
                f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise TokenNotFound(f"no API token is named {name!r} (see loom-ops tokens list)")
            return token_from_row(row)

        return await self._transaction(revoke)
