"""Settings from the environment, with the contract's names (see ../README, "Configuration")."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ServiceName = Literal["enrollment", "pulse", "cells", "labs", "outcomes"]
SERVICES: tuple[ServiceName, ...] = ("outcomes", "enrollment", "pulse", "cells", "labs")
DEFAULT_PORTS: dict[str, int] = {"outcomes": 8000, "enrollment": 8001, "pulse": 8002, "cells": 8003, "labs": 8004}


class RuntimeSettings(BaseSettings):
    """What the whole stack shares: data directory, broker, embedded NATS port."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    var_dir: Path = Field(default=Path("var"), alias="NEPHROTRACK_VAR")
    nats_url: str | None = Field(default=None, alias="NATS_URL")
    nats_port: int = Field(default=4222, alias="NEPHROTRACK_NATS_PORT")
    stream_replicas: int = Field(default=1, ge=1, le=5, alias="NEPHROTRACK_STREAM_REPLICAS")
    """Copies JetStream keeps of every stream and of the key bucket the services create (3 on a
    three-node cluster: any one node may be lost with its disk); existing ones are raised to it."""
    host: str = Field(default="127.0.0.1", alias="NEPHROTRACK_HOST")
    log_level: str = Field(default="info", alias="NEPHROTRACK_LOG_LEVEL")
    gc: Literal["service", "default"] = Field(default="service", alias="NEPHROTRACK_GC")
    """``default`` keeps CPython's garbage-collector pacing (for comparison; shared.service.GC_THRESHOLDS)."""
    consumer_max_deliver: int = Field(default=5, ge=1, alias="NEPHROTRACK_CONSUMER_MAX_DELIVER")
    """Tries of a message that fails for itself before it is dead-lettered (outages spend none)."""
    consumer_backoff_seconds: Annotated[tuple[float, ...], NoDecode] = Field(
        default=(1.0, 5.0, 15.0, 60.0), alias="NEPHROTRACK_CONSUMER_BACKOFF_SECONDS"
    )
    """Pauses before the 2nd, 3rd, … try of a failed message (comma-separated seconds)."""

    @field_validator("consumer_backoff_seconds", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(part) for part in value.split(",") if part.strip())
        return value

    def broker_url(self) -> str:
        return self.nats_url or f"nats://127.0.0.1:{self.nats_port}"


class ListenSettings(BaseSettings):
    """Where each process listens: the contract's ports, each movable by its variable."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    outcomes_port: int = Field(default=DEFAULT_PORTS["outcomes"], ge=0, le=65535, alias="NEPHROTRACK_OUTCOMES_PORT")
    enrollment_port: int = Field(default=DEFAULT_PORTS["enrollment"], ge=0, le=65535, alias="NEPHROTRACK_ENROLLMENT_PORT")
    pulse_port: int = Field(default=DEFAULT_PORTS["pulse"], ge=0, le=65535, alias="NEPHROTRACK_PULSE_PORT")
    cells_port: int = Field(default=DEFAULT_PORTS["cells"], ge=0, le=65535, alias="NEPHROTRACK_CELLS_PORT")
    labs_port: int = Field(default=DEFAULT_PORTS["labs"], ge=0, le=65535, alias="NEPHROTRACK_LABS_PORT")
    mllp_port: int = Field(default=2575, ge=0, le=65535, alias="NEPHROTRACK_MLLP_PORT")


class DatabaseSettings(BaseSettings):
    """Each service's own database (``DATABASE_URL_<SERVICE>``); unset: SQLite under the data directory."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    database_url_outcomes: str | None = Field(default=None, alias="DATABASE_URL_OUTCOMES")
    database_url_enrollment: str | None = Field(default=None, alias="DATABASE_URL_ENROLLMENT")
    database_url_pulse: str | None = Field(default=None, alias="DATABASE_URL_PULSE")
    database_url_cells: str | None = Field(default=None, alias="DATABASE_URL_CELLS")
    database_url_labs: str | None = Field(default=None, alias="DATABASE_URL_LABS")


def service_port(service: str) -> int:
    return getattr(_listen(), f"{service}_port")


def mllp_port() -> int:
    return _listen().mllp_port


def database_url(service: str, runtime: RuntimeSettings | None = None) -> str:
    """``DATABASE_URL_<SERVICE>``, else a SQLite file under the data directory."""
    explicit = getattr(DatabaseSettings(), f"database_url_{service}")
    if explicit:
        return explicit
    runtime = runtime or RuntimeSettings()
    return f"sqlite+aiosqlite:///{(runtime.var_dir / f'{service}.db').resolve()}"


def _listen() -> ListenSettings:
    """The ports, or a stop naming the variable that does not hold one."""
    try:
        return ListenSettings()
    except ValidationError as error:
        problem = error.errors()[0]
        raise SystemExit(f"{problem['loc'][0]} must be a port number, got {problem.get('input')!r}") from None
