"""What the API side (`service.queue`) and the workers (`service.worker`) share about Redis.

Key names, the fields of stream entries, how clients are built from the settings (short
timeouts, no hidden retry loops, AUTH and TLS), and the queue's Prometheus metrics.
docs/QUEUE.md describes the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.settings import Settings

# Errors that mean "Redis is not reachable right now" (AuthenticationError is a
# ConnectionError too; BusyLoadingError a ConnectionError while Redis loads its data).
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)

# Fields of a request entry (stream `settings.redis_stream`). Metadata are separate fields,
# readable with redis-cli; the model work is one msgpack payload (service.redis_codec).
F_JOB = b"job"  # job id: unique per submission (the client's request id may repeat)
F_REPLY = b"reply"  # reply stream of the API process waiting for the result
F_DEADLINE = b"deadline"  # wall-clock seconds (time.time()) after which nobody waits
F_ENQUEUED = b"enqueued"  # wall-clock seconds when the API added the entry
F_REQUEST = b"request"  # X-Request-ID, for logs only
F_IMAGES = b"images"  # images in the payload: batch capacity without decoding
F_PAYLOAD = b"payload"

# Fields of a reply entry (stream `<stream>:replies:<api id>`).
F_STATUS = b"status"  # one of the REPLY_* values
F_DETAIL = b"detail"
F_WORKER = b"worker"
REPLY_OK = b"ok"
REPLY_FAILED = b"failed"  # the models raised on this job
REPLY_DEAD = b"dead-letter"  # given up after too many deliveries or an unreadable entry

StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]


def read_entries(answer: Any) -> StreamEntries:
    """The entries of an XREAD/XREADGROUP answer on one stream (RESP2, as redis-py parses it)."""
    if not answer:
        return []
    return cast(StreamEntries, answer[0][1])


@dataclass(frozen=True)
class QueueKeys:
    """Redis key names of one queue (one stream and its group)."""

    stream: str
    group: str

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueKeys:
        return cls(settings.redis_stream, settings.redis_group)

    @property
    def dead_letters(self) -> str:
        """Stream recording dead-lettered jobs (ids and reasons, no payload)."""
        return f"{self.stream}:dead"

    def replies(self, api_id: str) -> str:
        """Reply stream of one API process."""
        return f"{self.stream}:replies:{api_id}"


def reply_ttl_s(settings: Settings) -> int:
    """Life of a reply stream after its last write: longer than any request waits."""
    return math.ceil(settings.max_deadline_ms / 1000) + 60


def reply_maxlen(settings: Settings) -> int:
    """Bound of a reply stream; its reader drains it continuously, so this is a safety net."""
    return max(256, 4 * settings.max_queue)


DEAD_LETTER_MAXLEN = 1000
DEAD_LETTER_TTL_S = 7 * 24 * 3600


def redacted_url(url: str) -> str:
    """`url` without its password, for logs and /readyz."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# One immediate retry replaces a pooled connection that died with a Redis restart; anything
# more (redis-py's default backs off for seconds) would hide an outage from the callers.
_RETRIES = 1


def _client_options(settings: Settings, read_timeout_s: float | None) -> dict[str, Any]:
    timeout = settings.redis_timeout_ms / 1000
    return {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout if read_timeout_s is None else read_timeout_s,
        # One immediate retry replaces a pooled connection that died with a Redis restart;
        # anything more would hide an outage behind seconds of backoff.
        "health_check_interval": 0,
    }


def sync_client(settings: Settings, *, read_timeout_s: float | None = None) -> redis.Redis:
    """A client for `JLAD_REDIS_URL` (redis:// or rediss://); JLAD_REDIS_PASSWORD, when set,
    is used instead of a password in the URL."""
    pool = redis.ConnectionPool.from_url(
        settings.redis_url,
        retry=Retry(NoBackoff(), _RETRIES),
        **_client_options(settings, read_timeout_s),
    )
    if settings.redis_password is not None:
        pool.connection_kwargs["password"] = settings.redis_password.get_secret_value()
    return redis.Redis(connection_pool=pool)


def async_client(settings: Settings, *, read_timeout_s: float | None = None) -> redis.asyncio.Redis:
    """As `sync_client`, for asyncio."""
    pool = redis.asyncio.ConnectionPool.from_url(
        settings.redis_url,
        retry=AsyncRetry(NoBackoff(), _RETRIES),
        **_client_options(settings, read_timeout_s),
    )
    if settings.redis_password is not None:
        pool.connection_kwargs["password"] = settings.redis_password.get_secret_value()
    return redis.asyncio.Redis(connection_pool=pool)


def is_busy_group(exc: redis.ResponseError) -> bool:
    return str(exc).startswith("BUSYGROUP")


def is_missing_group(exc: redis.ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


@dataclass
class StreamState:
    """What XLEN and XINFO GROUPS say about the queue."""

    length: int = 0  # entries in the stream: waiting or being run
    lag: int = 0  # not yet delivered to any worker
    pending: int = 0  # delivered, not yet acknowledged
    consumers: int = 0  # workers known to the group (live or not yet cleaned up)

    @classmethod
    def parse(cls, length: int, groups: list[dict[str, Any]], group: str) -> StreamState:
        for info in groups:
            name = info.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == group:
                lag = info.get("lag")
                return cls(
                    length=int(length),
                    # Redis reports no lag when it cannot tell (after deletions): the length
                    # minus the pending entries is then the best bound.
                    lag=int(lag) if lag is not None else max(0, length - int(info["pending"])),
                    pending=int(info["pending"]),
                    consumers=int(info["consumers"]),
                )
        return cls(length=int(length), lag=int(length))


_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class QueueMetrics:
    """The Redis queue's metrics (prefix `jlad_queue_`), added to a process's registry.

    Each process fills what it sees: the API its replies and the stream's state, a worker
    the claims, retries, dead letters, expiries and time in queue of what it runs.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.redis_up = Gauge("jlad_queue_redis_up", "1 while Redis answers", registry=r)
        self.length = Gauge(
            "jlad_queue_length", "Jobs in the stream (waiting or being run)", registry=r
        )
        self.lag = Gauge("jlad_queue_lag", "Jobs not yet read by any worker", registry=r)
        self.pending = Gauge(
            "jlad_queue_pending", "Jobs read by a worker, not yet acknowledged", registry=r
        )
        self.consumers = Gauge(
            "jlad_queue_consumers", "Workers registered in the consumer group", registry=r
        )
        self.claimed = Counter(
            "jlad_queue_claimed", "Jobs taken over from a silent worker", registry=r
        )
        self.retried = Counter(
            "jlad_queue_retried", "Taken-over jobs run again (not dead-lettered)", registry=r
        )
        self.dead_lettered = Counter(
            "jlad_queue_dead_lettered",
            "Jobs answered with an error instead of being run again",
            ["reason"],
            registry=r,
        )
        self.expired = Counter(
            "jlad_queue_expired", "Jobs skipped because their deadline had passed", registry=r
        )
        self.failed = Counter("jlad_queue_failed", "Jobs the models raised on", registry=r)
        self.wait_seconds = Histogram(
            "jlad_queue_wait_seconds",
            "Time from entering the stream to the start of the batch running it",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.batch_sources = Histogram(
            "jlad_queue_batch_sources",
            "API processes whose jobs share one batch",
            buckets=(1, 2, 3, 4, 6, 8, 16),
            registry=r,
        )
        self.replies = Counter(
            "jlad_queue_replies",
            "Replies read by an API process: delivered (answered a waiting request), "
            "duplicate (the request was already answered), late (nobody waits any more)",
            ["outcome"],
            registry=r,
        )

    def observe_state(self, state: StreamState) -> None:
        self.length.set(state.length)
        self.lag.set(state.lag)
        self.pending.set(state.pending)
        self.consumers.set(state.consumers)
