"""People: how each identity (`telegram:<id>`, a login) is shown to others."""

from __future__ import annotations

import time
from collections.abc import Iterable

from agent.store.base import StoreBase


class PeopleStore(StoreBase):
    """Display names of the identities runs and decisions name."""

    async def remember_chat_user(self, identity: str, display: str) -> None:
        """Record how a chat identity (`telegram:<id>`) is shown to people, e.g. `@alice`."""
        now = time.time()
        await self._transaction(
            lambda c: c.execute(
                "INSERT INTO chat_users (identity, display, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (identity) DO UPDATE SET display = excluded.display, "
                "updated_at = excluded.updated_at WHERE chat_users.display != excluded.display",
                (identity, display, now),
            ),
        )

    async def chat_user_names(self, identities: Iterable[str]) -> dict[str, str]:
        """How each known identity is shown; unknown identities are left out."""
        wanted = sorted(set(identities))
        if not wanted:
            return {}
        marks = ", ".join("?" for _ in wanted)
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT identity, display FROM chat_users WHERE identity IN ({marks})", wanted
            ).fetchall()
        )
        return dict(rows)
