"""Settings from the environment, with the contract's names (see ../README, "Configuration")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
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
    host: str = Field(default="127.0.0.1", alias="NEPHROTRACK_HOST")
    log_level: str = Field(default="info", alias="NEPHROTRACK_LOG_LEVEL")
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


def service_port(service: str) -> int:
    return _int_env(f"NEPHROTRACK_{service.upper()}_PORT", DEFAULT_PORTS[service])


def mllp_port() -> int:
    return _int_env("NEPHROTRACK_MLLP_PORT", 2575)


def database_url(service: str, runtime: RuntimeSettings | None = None) -> str:
    """``DATABASE_URL_<SERVICE>``, else a SQLite file under the data directory."""
    runtime = runtime or RuntimeSettings()
    explicit = os.environ.get(f"DATABASE_URL_{service.upper()}")
    if explicit:
        return explicit
    return f"sqlite+aiosqlite:///{(runtime.var_dir / f'{service}.db').resolve()}"


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a port number, got {raw!r}") from None
