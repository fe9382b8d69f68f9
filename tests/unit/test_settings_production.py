"""Production refuses a connection to a remote PostgreSQL whose certificate nobody verifies: asyncpg's
default (``prefer``) falls back to plaintext without a word, and ``require`` takes any certificate."""
from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from shared.settings import Settings


def production(database_url: str) -> Settings:
    return Settings(CONDUIT_ENV="production", DATABASE_URL=database_url, KAFKA_BOOTSTRAP_SERVERS="kafka:9092",
                    CONDUIT_SECRET_KEY=Fernet.generate_key().decode())


@pytest.mark.parametrize("url", [
    "postgresql://conduit:Secret-pw-1@db.example.net:5432/conduit",
    "postgresql://conduit:Secret-pw-1@db.example.net:5432/conduit?sslmode=prefer",
    "postgresql://conduit:Secret-pw-1@db.example.net:5432/conduit?sslmode=require",
    "postgresql://conduit:Secret-pw-1@localhost:5432,db.example.net:5432/conduit",
])
def test_an_unverified_remote_database_is_refused_without_showing_the_url(url: str) -> None:
    with pytest.raises(ValidationError) as refused:
        production(url)
    message = refused.value.errors()[0]["msg"]
    assert "sslmode=verify-full" in message and "Secret-pw-1" not in message


@pytest.mark.parametrize("url", [
    "postgresql://conduit:pw@db.example.net:5432/conduit?sslmode=verify-full&sslrootcert=/etc/conduit/ca.crt",
    "postgresql://conduit:pw@db.example.net:5432/conduit?sslmode=verify-ca",
    "postgresql://conduit:pw@db.example.net:5432/conduit?sslmode=disable",   # a decision, said out loud
    "postgresql://conduit:pw@127.0.0.1:5432/conduit",
    "postgresql://conduit:pw@[::1]:5432/conduit",
    "postgresql:///conduit?host=/var/run/postgresql",
])
def test_a_verified_local_or_deliberately_plain_database_is_accepted(url: str) -> None:
    assert production(url).database_url is not None


def test_a_host_from_the_environment_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "db.example.net")
    with pytest.raises(ValidationError):
        production("postgresql://conduit:pw@/conduit")
    with pytest.raises(ValidationError):
        production("postgresql://conduit:pw@/conduit?service=conduit")
    assert production("postgresql://conduit:pw@/conduit?sslmode=VERIFY-FULL").database_url is not None
    monkeypatch.setenv("PGHOST", "/var/run/postgresql")
    assert production("postgresql://conduit:pw@/conduit").database_url is not None


def test_development_does_not_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONDUIT_ENV", raising=False)
    assert Settings(DATABASE_URL="postgresql://u:p@db.example.net/c").env == "development"
