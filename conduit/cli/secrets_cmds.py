"""`conduit secrets`: the credentials encrypted at rest, and moving them to a new key.

`rotate` re-encrypts every stored secret (every organization's) with the first key of
``CONDUIT_SECRET_KEY``, so that the keys after it can be dropped; the whole procedure is in
docs/operations.md, "Rotating the credential key".
"""
from __future__ import annotations

import typer

from conduit.cli.output import emit_json
from conduit.cli.runner import load_settings, run
from conduit.context import database

secrets_app = typer.Typer(help="Credentials encrypted at rest: moving them to a new key.", no_args_is_help=True)


@secrets_app.command("rotate")
def secrets_rotate(dry_run: bool = typer.Option(False, "--dry-run", help="Check and count them; change nothing."),
                   json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Re-encrypt every stored secret with the first key of CONDUIT_SECRET_KEY, in one transaction."""
    from shared.crypto import load_cipher
    from shared.registry.secrets import ENCRYPTED_COLUMNS, rotate_secrets

    async def go() -> None:
        settings = load_settings()
        cipher = load_cipher(settings)
        async with database(settings) as pool, pool.acquire() as conn:
            rotation = await rotate_secrets(conn, cipher, dry_run=dry_run)
        if json_:
            return emit_json({"dry_run": rotation.dry_run, "rotated": rotation.counts, "total": rotation.total,
                              "under_other_keys": rotation.under_other_keys})
        kinds = ", ".join(f"{n} {c.singular if n == 1 else c.plural}"
                          for c in ENCRYPTED_COLUMNS for n in [rotation.counts[c.kind]])
        secrets = f"{rotation.total} secret{'s' * (rotation.total != 1)}"
        if dry_run:
            typer.echo(f"would rotate {secrets} to the first key of CONDUIT_SECRET_KEY: {kinds} "
                       f"({rotation.under_other_keys} under another key now); nothing changed")
        else:
            typer.echo(f"rotated {secrets} to the first key of CONDUIT_SECRET_KEY: {kinds} "
                       f"({rotation.under_other_keys} had been under another key)")
    run(go)
