"""People: how each identity (`telegram:<id>`, a login) is shown to others.

The bot writes the names (`bot.store.ChatStore.remember_chat_user`); the store reads them with
the runs and requests that name people, in the same snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.records import CHAT_IDENTITY
from agent.store.database import Connection


def names_in(
    conn: Connection, identities: Iterable[str], texts: Iterable[str] = ()
) -> dict[str, str]:
    """In the caller's read: how people know each identity, and each chat identity named
    inside `texts` (an error, a summary); unknown ones are left out."""
    wanted = {identity for identity in identities if identity}
    for text in texts:
        wanted.update(CHAT_IDENTITY.findall(text or ""))
    if not wanted:
        return {}
    ordered = sorted(wanted)
    marks = ", ".join("?" for _ in ordered)
    rows = conn.execute(
        f"SELECT identity, display FROM chat_users WHERE identity IN ({marks})", ordered
    ).fetchall()
    return {row["identity"]: row["display"] for row in rows}
