"""Settings for every Conduit process, read once from the environment in the entry point.

No settings at all means the embedded default: an embedded PostgreSQL and a Tansu broker kept under
``CONDUIT_STATE_DIR``.  Setting ``DATABASE_URL`` and ``KAFKA_BOOTSTRAP_SERVERS`` points the same code
at real servers.  Secrets are ``SecretStr`` so they never print; production refuses to start
without a real credentials key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Process-wide settings; each service reads the part it needs."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    env: Literal["development", "production"] = Field("development", validation_alias=_env("CONDUIT_ENV"))
    state_dir: Path = Field(Path(".conduit"), validation_alias=_env("CONDUIT_STATE_DIR"))
    database_url: SecretStr | None = Field(None, validation_alias=_env("DATABASE_URL"))
    kafka_bootstrap_servers: str | None = Field(None, validation_alias=_env("KAFKA_BOOTSTRAP_SERVERS"))
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", validation_alias=_env("KAFKA_SECURITY_PROTOCOL")
    )
    kafka_sasl_mechanism: str | None = Field(None, validation_alias=_env("KAFKA_SASL_MECHANISM"))
    kafka_sasl_username: str | None = Field(None, validation_alias=_env("KAFKA_SASL_USERNAME"))
    kafka_sasl_password: SecretStr | None = Field(None, validation_alias=_env("KAFKA_SASL_PASSWORD"))
    topic_partitions: int = Field(4, ge=1, validation_alias=_env("CONDUIT_TOPIC_PARTITIONS"))
    # Copies of each topic Conduit creates; a real cluster wants 3 (the embedded broker has one node).
    topic_replication_factor: int = Field(1, ge=1, validation_alias=_env("CONDUIT_TOPIC_REPLICATION_FACTOR"))
    topic_prefix: str = Field("", validation_alias=_env("CONDUIT_TOPIC_PREFIX"))
    # The Fernet key that encrypts mailbox and profile credentials at rest.
    secret_key: SecretStr | None = Field(None, validation_alias=_env("CONDUIT_SECRET_KEY"))
    health_port: int = Field(8080, ge=0, le=65535, validation_alias=_env("CONDUIT_HEALTH_PORT"))
    log_level: str = Field("INFO", validation_alias=_env("CONDUIT_LOG_LEVEL"))
    log_format: Literal["text", "json"] = Field("text", validation_alias=_env("CONDUIT_LOG_FORMAT"))
    # Dead-letter limit: a bad deploy must not drain a whole topic into its DLQ.
    dlq_limit_per_minute: int = Field(1000, ge=1, validation_alias=_env("CONDUIT_DLQ_LIMIT_PER_MINUTE"))

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @model_validator(mode="after")
    def _production_needs_real_servers(self) -> "Settings":
        if self.env == "production":
            missing = [
                name
                for name, value in (
                    ("DATABASE_URL", self.database_url),
                    ("KAFKA_BOOTSTRAP_SERVERS", self.kafka_bootstrap_servers),
                    ("CONDUIT_SECRET_KEY", self.secret_key),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"production needs {', '.join(missing)} set")
        return self

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def embedded_broker(self) -> bool:
        return not self.kafka_bootstrap_servers
