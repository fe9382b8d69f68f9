"""Re-encrypting every stored secret with the first key of ``CONDUIT_SECRET_KEY``: key rotation.

``CONDUIT_SECRET_KEY=NEW,OLD`` encrypts with NEW and decrypts with either; ``rotate_secrets`` moves
every stored secret to NEW, after which OLD can be dropped (docs/operations.md, "Rotating the
credential key").  The encrypted columns are all here, in ``ENCRYPTED_COLUMNS``: a migration that
adds one must add it there too, or rotating would leave it under a key about to be dropped.

All or nothing, in one transaction: a secret that no configured key decrypts stops the rotation
before anything is written, naming its mailbox or profile.  The rows are locked while they are
rotated, so a credential changed meanwhile (`conduit mailbox set-credentials`) is not overwritten
with its former value.  Nothing but the database is touched while the transaction is open.
"""
from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import asyncpg

from shared.crypto import CredentialCipher
from shared.errors import InvalidInput


@dataclass(frozen=True)
class EncryptedColumn:
    kind: str       # a machine name: the key in counts and JSON
    singular: str   # how a person names one
    plural: str
    table: str
    column: str
    owner: str      # the SQL expression naming the row's mailbox or profile, as an operator knows it
    described: str  # "{owner}" placed in words, for an error


ENCRYPTED_COLUMNS: tuple[EncryptedColumn, ...] = (
    EncryptedColumn("mailbox_credentials", "mailbox credential", "mailbox credentials", "mailbox", "secret",
                    "t.email", "the credentials of mailbox {owner}"),
    EncryptedColumn("profile_credentials", "profile credential", "profile credentials", "email_server_profile",
                    "profile_secret", "t.name", "the impersonation credentials of profile {owner}"),
    EncryptedColumn("oauth_client_secrets", "OAuth client secret", "OAuth client secrets", "email_server_profile",
                    "oauth_client_secret", "t.name", "the OAuth client secret of profile {owner}"),
)


@dataclass(frozen=True)
class Rotation:
    """What a rotation did (or, dry, would do)."""

    counts: dict[str, int]   # secrets per kind (``EncryptedColumn.kind``), every one re-encrypted
    under_other_keys: int    # of those, how many no longer decrypted with the first key alone before
    dry_run: bool

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def rotate_secrets(conn: asyncpg.Connection, cipher: CredentialCipher, *, dry_run: bool = False) -> Rotation:
    """Re-encrypt every stored secret with ``cipher``'s first key, in one transaction; with
    ``dry_run`` check and count them, writing nothing.  InvalidInput, with nothing written, when a
    secret cannot be decrypted with any of ``cipher``'s keys."""
    counts: dict[str, int] = {}
    under_other_keys = 0
    undecryptable: list[str] = []
    async with conn.transaction():
        for column in ENCRYPTED_COLUMNS:
            rows = await conn.fetch(
                f"""SELECT t.id, t.{column.column} AS token, {column.owner} AS owner, o.name AS organization
                    FROM {column.table} t JOIN organization o ON o.id = t.organization_id
                    WHERE t.{column.column} IS NOT NULL
                    ORDER BY o.name, {column.owner}
                    {'' if dry_run else 'FOR UPDATE OF t'}""")
            rotated: list[tuple[UUID, bytes]] = []
            for row in rows:
                try:
                    token = cipher.rotate(row["token"])
                except InvalidInput:
                    undecryptable.append(f"{column.described.format(owner=row['owner'])} "
                                         f"(organization {row['organization']})")
                    continue
                if not cipher.is_current(row["token"]):
                    under_other_keys += 1
                rotated.append((row["id"], token))
            counts[column.kind] = len(rotated)
            if not dry_run and not undecryptable and rotated:
                await conn.executemany(f"UPDATE {column.table} SET {column.column} = $2 WHERE id = $1", rotated)
        if undecryptable:
            others = len(undecryptable) - 1
            also = f" (nor can {others} other secret{'s' if others > 1 else ''})" if others else ""
            # Raised inside the transaction: whatever was written is rolled back.
            raise InvalidInput(f"{undecryptable[0]} cannot be decrypted with any key of CONDUIT_SECRET_KEY{also}: "
                               "nothing was rotated; add the key it was encrypted with, or store it again",
                               reason="undecryptable_secret")
    return Rotation(counts, under_other_keys, dry_run)
