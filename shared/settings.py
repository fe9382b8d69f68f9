"""Settings for every Conduit process, read once from the environment in the entry point.

No settings at all means the embedded default: an embedded PostgreSQL and a Tansu broker kept under
``CONDUIT_STATE_DIR``.  Setting ``DATABASE_URL`` and ``KAFKA_BOOTSTRAP_SERVERS`` points the same code
at real servers.  Secrets are ``SecretStr`` so they never print; production refuses to start
without a real credentials key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.tls import check_ca_file


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# What Conduit can authenticate with: it passes a user name and a password, nothing else (GSSAPI
# and OAUTHBEARER need configuration it does not have).
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


def log_level_name(value: str) -> str:
    """``value`` (CONDUIT_LOG_LEVEL) as a logging level name; ValueError saying the choices when it is none."""
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
    return level


def _check_server(entry: str) -> None:
    """One ``host[:port]`` of KAFKA_BOOTSTRAP_SERVERS, as aiokafka reads it ("[::1]:9092" for IPv6)."""
    if entry.startswith("["):
        _, sep, port = entry.partition("]")
        if not sep or (port and not port.startswith(":")):
            raise ValueError(f"{entry!r} is not host:port")
        port = port[1:]
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if not host:
            raise ValueError(f"{entry!r} has no host")
    else:
        port = ""   # a host alone, or a bare IPv6 address: aiokafka uses port 9092
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{entry!r} needs a port number from 1 to 65535 after the colon")


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
    # The CA bundle (PEM) that Kafka brokers' certificates are verified against, in place of the
    # system's CAs: a cluster's own CA (Strimzi's cluster CA).  Verification itself is never off.
    kafka_ssl_ca_file: Path | None = Field(None, validation_alias=_env("KAFKA_SSL_CA_FILE"))
    topic_partitions: int = Field(4, ge=1, validation_alias=_env("CONDUIT_TOPIC_PARTITIONS"))
    # Copies of each topic Conduit creates; a real cluster wants 3 (the embedded broker has one node).
    topic_replication_factor: int = Field(1, ge=1, validation_alias=_env("CONDUIT_TOPIC_REPLICATION_FACTOR"))
    topic_prefix: str = Field("", validation_alias=_env("CONDUIT_TOPIC_PREFIX"))
    # The Fernet key that encrypts mailbox and profile credentials at rest.
    secret_key: SecretStr | None = Field(None, validation_alias=_env("CONDUIT_SECRET_KEY"))
    health_port: int = Field(8080, ge=0, le=65535, validation_alias=_env("CONDUIT_HEALTH_PORT"))
    # Where the probes and metrics listen: every interface in a pod (the kubelet and Prometheus reach
    # it there); `conduit up` gives its services the loopback address (a laptop shares its network).
    health_host: str = Field("0.0.0.0", min_length=1, validation_alias=_env("CONDUIT_HEALTH_HOST"))
    log_level: str = Field("INFO", validation_alias=_env("CONDUIT_LOG_LEVEL"))
    log_format: Literal["text", "json"] = Field("text", validation_alias=_env("CONDUIT_LOG_FORMAT"))
    # The longest one statement may take: a database that stops answering (a hung server, a host
    # gone without closing the connection) fails the statement instead of holding the service for
    # ever.  Migrations are not bound by it.
    database_command_timeout_seconds: float = Field(
        60.0, gt=0, validation_alias=_env("CONDUIT_DATABASE_COMMAND_TIMEOUT_SECONDS"))
    # Dead-letter limit: a bad deploy must not drain a whole topic into its DLQ.
    dlq_limit_per_minute: int = Field(1000, ge=1, validation_alias=_env("CONDUIT_DLQ_LIMIT_PER_MINUTE"))
    # `conduit up` at shutdown: how long each service may take to finish its work in flight before it
    # is killed (they stop together, so this is also about the longest the whole stop takes).
    stop_grace_seconds: float = Field(30.0, gt=0, validation_alias=_env("CONDUIT_STOP_GRACE_SECONDS"))

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        # Checked here, not where logging is configured: logging's own error is a traceback.
        return log_level_name(value)

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _servers(cls, value: str | None) -> str | None:
        # aiokafka parses the list only as a client starts, and fails with int()'s own words.
        if value is not None and value.strip():
            for entry in value.split(","):
                if not entry.strip():
                    raise ValueError("an empty entry in the list (a stray comma?)")
                _check_server(entry.strip())
        return value

    @field_validator("kafka_sasl_mechanism")
    @classmethod
    def _mechanism(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if value.strip().upper() not in SASL_MECHANISMS:
            raise ValueError(f"must be one of {', '.join(SASL_MECHANISMS)}, not {value!r}")
        return value.strip().upper()

    @field_validator("kafka_ssl_ca_file", mode="before")
    @classmethod
    def _blank_ca_file_is_unset(cls, value: object) -> object:
        # An empty variable (a ConfigMap entry left blank) means none, not the working directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("kafka_ssl_ca_file")
    @classmethod
    def _usable_ca_file(cls, value: Path | None) -> Path | None:
        # Checked at start: otherwise each Kafka client would fail as it connects, in ssl's words.
        if value is None:
            return None
        value = Path(os.path.abspath(value.expanduser()))   # services may run from another directory
        problem = check_ca_file(str(value))
        if problem is not None:
            raise ValueError(f"the CA bundle {value} cannot be used: {problem}")
        return value

    @model_validator(mode="after")
    def _sasl_complete(self) -> "Settings":
        # aiokafka checks these only as a client starts (a ValueError then), and silently ignores a
        # mechanism without a SASL protocol: an operator would believe the connection authenticated.
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs KAFKA_SASL_USERNAME "
                             "and KAFKA_SASL_PASSWORD")
        if self.kafka_sasl_mechanism and not sasl:
            raise ValueError("KAFKA_SASL_MECHANISM needs KAFKA_SECURITY_PROTOCOL SASL_PLAINTEXT or SASL_SSL")
        if self.kafka_ssl_ca_file is not None and self.kafka_security_protocol not in ("SSL", "SASL_SSL"):
            # Without TLS the file would go unused while the operator believes the broker is verified.
            raise ValueError("KAFKA_SSL_CA_FILE needs KAFKA_SECURITY_PROTOCOL SSL or SASL_SSL")
        return self

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
            problem = database_tls_problem(self.database_url.get_secret_value())  # type: ignore[union-attr]
            if problem:
                raise ValueError(problem)
        return self

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def embedded_broker(self) -> bool:
        return not self.kafka_bootstrap_servers


# Loopback or a Unix socket: nothing on the way to verify.
_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1", "[::1]"}
# sslmode values that say what happens: the certificate verified, or no TLS by the operator's choice
# (a service mesh's mTLS).  asyncpg's default, prefer, falls back to plaintext without a word, and
# require takes any certificate.
_DECIDED_SSLMODES = {"verify-ca", "verify-full", "disable"}


def database_tls_problem(url: str) -> str | None:
    """Why production may not use this PostgreSQL URL as it is, or None: a remote server's certificate
    must be verified (sslmode verify-full or verify-ca) unless TLS is turned off on purpose."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    hosts = query.get("host", []) or [h.rsplit(":", 1)[0] if not h.startswith("[") else h.split("]")[0] + "]"
                                      for h in (parts.netloc.rsplit("@", 1)[-1]).split(",")]
    if hosts == [""]:   # no host in the URL: the client takes PGHOST's (or a pg_service.conf entry's)
        hosts = os.environ.get("PGHOST", "").split(",") if "service" not in query else ["a service's host"]
    if all(h.startswith("/") or h.lower() in _LOCAL_HOSTS for h in hosts):
        return None
    mode = (query.get("sslmode") or [os.environ.get("PGSSLMODE", "")])[-1].lower()
    if mode in _DECIDED_SSLMODES:
        return None
    return (f"production needs DATABASE_URL to verify PostgreSQL's certificate: add sslmode=verify-full (with "
            f"sslrootcert=PATH for a private CA), or sslmode=disable if TLS is not wanted on that network "
            f"(now: sslmode={mode or 'prefer, the default, which falls back to plaintext silently'})")
