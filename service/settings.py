"""Every knob of the service in one pydantic-settings class, read from `JLAD_*` variables.

The names are part of the deployment contract (docs/CONTRACT.md); docs/SERVICE.md has the
table with defaults and meanings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    """Let list settings be given as `a,b,c` in the environment (and as lists in code)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """The service configuration; each field is the variable `JLAD_<FIELD NAME>`."""

    model_config = SettingsConfigDict(env_prefix="JLAD_", extra="ignore", frozen=True)

    # Network
    host: str = Field(default="127.0.0.1", description="Interface to bind (0.0.0.0 in containers).")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    root_path: str = Field(
        default="",
        description="Path prefix the service is mounted under behind a proxy, e.g. /jlad.",
    )
    trusted_proxies: CommaList = Field(
        default_factory=list,
        description="Proxy addresses whose X-Forwarded-* headers are believed (empty = none; "
        "'*' = any).",
    )

    # Models and runtime
    model_dir: Path = Field(default=Path("models"), description="Model repository root.")
    default_model: str = Field(
        default="objects", description="Model used when a request names none."
    )
    models: CommaList = Field(
        default_factory=list, description="Model names to serve (empty = every model found)."
    )
    providers: str = Field(
        default="auto",
        description="ONNX Runtime providers: auto (CUDA then CPU), cpu, cuda, or a "
        "comma-separated list of provider names.",
    )
    allow_cpu_fallback: bool = Field(
        default=False, description="Serve on CPU when CUDA was asked for but fails to load."
    )
    precision: Literal["fp32", "fp16", "int8"] = Field(
        default="fp32",
        description="Graph variant to load: fp32; fp16 (GPUs); int8 (CPU only, static "
        "quantization; `auto` providers then mean CPU).",
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime intra-op threads per session (0 = its default)."
    )
    inference_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="How many nice levels below request handling the model-running threads "
        "run (Linux; 0 = the same priority): the event loop gets a core as soon as it wakes.",
    )

    # Dispatch
    queue: Literal["local", "redis"] = Field(
        default="local", description="local = in-process batcher; redis = Redis stream + workers."
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Redis URL (queue=redis)."
    )
    redis_password: SecretStr | None = Field(default=None, description="Redis password, if any.")
    # Redis queue details: docs/QUEUE.md.
    redis_stream: str = Field(
        default="jlad:requests", min_length=1, description="Stream of queued jobs (queue=redis)."
    )
    redis_group: str = Field(
        default="jlad-workers", min_length=1, description="Consumer group the workers share."
    )
    redis_timeout_ms: int = Field(
        default=1000, ge=10, description="Redis connect/command timeout; unreachable -> 503."
    )
    redis_claim_idle_ms: int = Field(
        default=15_000,
        ge=100,
        description="A job held this long by a silent worker is taken over by another.",
    )
    redis_max_deliveries: int = Field(
        default=3, ge=1, description="Deliveries of one job before it is dead-lettered."
    )
    max_batch_size: int = Field(
        default=8, ge=1, description="Most images one backbone run takes (jobs are never split)."
    )
    max_wait_ms: float = Field(
        default=5.0,
        ge=0,
        description="How long a batch waits for company after its first job (not at all "
        "for a job that finds no job waiting and no batch running).",
    )
    max_queue: int = Field(
        default=64, ge=1, description="Jobs allowed to wait; beyond this -> 429."
    )
    deadline_ms: int = Field(
        default=30_000,
        ge=1,
        description="Default per-request deadline; X-Deadline-Ms overrides it.",
    )
    max_deadline_ms: int = Field(
        default=300_000,
        ge=1,
        description="Largest deadline a client may ask for with X-Deadline-Ms.",
    )

    # Input limits
    max_upload_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest request body in bytes -> else 413."
    )
    max_image_pixels: int = Field(
        default=40_000_000, ge=64, description="Largest decoded image (width*height) -> else 413."
    )
    min_image_side: int = Field(
        default=8, ge=1, description="Smallest accepted width/height -> 422."
    )
    max_query_points: int = Field(
        default=1024, ge=1, description="Most `points` per request -> 422."
    )
    max_targets: int = Field(default=16, ge=1, description="Most `targets` per /propagate request.")

    # Security and operations
    api_keys: CommaList = Field(
        default_factory=list,
        description="Accepted API keys (X-API-Key or Authorization: Bearer); empty = no auth.",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        default="info", description="Log level of the JSON logs."
    )
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight requests may still finish."
    )
    api_processes: int = Field(
        default=1,
        ge=1,
        description="API processes sharing the port (uvicorn workers); more than 1 needs "
        "JLAD_QUEUE=redis. Each process answers /metrics for itself.",
    )

    @field_validator("trusted_proxies", "models", "api_keys", mode="before")
    @classmethod
    def _parse_comma_list(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("root_path")
    @classmethod
    def _normalise_root_path(cls, value: str) -> str:
        value = value.strip()
        if not value or value == "/":
            return ""
        return "/" + value.strip("/")

    @model_validator(mode="after")
    def _check_deadlines(self) -> Settings:
        if self.deadline_ms > self.max_deadline_ms:
            raise ValueError("JLAD_DEADLINE_MS must not exceed JLAD_MAX_DEADLINE_MS")
        return self

    @model_validator(mode="after")
    def _check_api_processes(self) -> Settings:
        # With the local queue every process would load its own models and batcher and
        # fight over the same cores; the Redis queue is what lets API processes share work.
        if self.api_processes > 1 and self.queue != "redis":
            raise ValueError("JLAD_API_PROCESSES > 1 needs JLAD_QUEUE=redis")
        return self
