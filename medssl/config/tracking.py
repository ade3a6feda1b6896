"""Where results go: the MLflow experiment and server."""
from __future__ import annotations

from pydantic import Field

from medssl.config.base import Section


class TrackingConfig(Section):
    experiment: str | None = Field(None, description="default: the pipeline name")
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else MLflow's default")
    server_wait_s: float = Field(60.0, ge=0, description="how long a stage waits for an unreachable tracking "
                                                         "server (e.g. restarting) to open its run")
