"""What travels between the HTTP layer and whatever runs the models.

An `InferenceJob` is one request's worth of model work, already decoded and resized to the
model's input size; an `InferenceResult` is the raw graph outputs for it. A `Dispatcher`
takes jobs and returns results: the in-process batcher (`service.batching`) is one, a Redis
stream queue with separate workers (`service.queue`, `JLAD_QUEUE=redis`) another. Everything
here is plain numpy + dataclasses so it can be serialised for another process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]
U8 = NDArray[np.uint8]


@dataclass(eq=False)  # identity, never array-by-array comparison
class InferenceJob:
    """One request's model work.

    `images`: (N, 3, H, W) uint8 RGB at the model's input size; the graphs see them / 255
    (`service.imaging.model_input`, applied by the engine to the whole batch).
    `landmarks`: indices into `images` to run the landmark head on.
    `pairs`: (source index, target index) pairs to run the alignment head on.
    `deadline`: wall-clock time (`time.time()`) after which the result is useless.
    """

    model: str
    images: U8
    landmarks: list[int] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    deadline: float = float("inf")
    request_id: str = ""

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def seconds_left(self, now: float | None = None) -> float:
        return self.deadline - (time.time() if now is None else now)


@dataclass
class LandmarkOutput:
    """Landmark head outputs for one image.

    `points`: (K, 2) normalised (x, y); `confidence`: (K,); `heatmaps`: (K, h, w).
    """

    points: F32
    confidence: F32
    heatmaps: F32


@dataclass
class AlignOutput:
    """Alignment head outputs for one (source, target) pair, on the source cell grid.

    `mapping`: (2, h, w) normalised target (x, y) of each source cell;
    `log_sigma`: (h, w); `confidence`: (h, w) in [0, 1].
    """

    mapping: F32
    log_sigma: F32
    confidence: F32


@dataclass
class InferenceResult:
    """Outputs for one job, in the order of its `landmarks` and `pairs` lists."""

    landmarks: list[LandmarkOutput]
    alignments: list[AlignOutput]
    # Share of the batch run attributed to this job, plus facts about the batch.
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_jobs: int = 1
    batch_images: int = 0


class DispatchError(Exception):
    """Base of the errors a dispatcher raises instead of returning a result."""


class QueueFull(DispatchError):
    """No room for the job; try again after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: float, message: str = "queue full") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(DispatchError):
    """The job's deadline passed before its result was ready."""


class ShuttingDown(DispatchError):
    """The dispatcher no longer takes jobs (shutdown) or is not started."""


class InferenceFailed(DispatchError):
    """The models raised while running the batch holding this job."""


@runtime_checkable
class Dispatcher(Protocol):
    """Runs `InferenceJob`s somewhere and hands back their `InferenceResult`s."""

    async def start(self) -> None:
        """Begin taking jobs."""

    def check_room(self) -> None:
        """Raise `QueueFull` when a job submitted now would surely be refused for lack of
        room. Cheap and conservative: routes call it before parsing the body, so that an
        overloaded service answers 429 without spending the event loop's time on multipart
        parsing or the images first."""

    async def submit(self, job: InferenceJob) -> InferenceResult:
        """Run `job` before `job.deadline`, or raise a `DispatchError`."""
        ...

    async def close(self, grace_s: float) -> None:
        """Stop taking jobs; finish those accepted within `grace_s`, fail the rest."""

    def describe(self) -> dict[str, Any]:
        """Facts for /readyz: kind, queue depth, whether it is accepting."""
        ...

    @property
    def ready(self) -> bool:
        """Whether jobs submitted now would be run."""
        ...
