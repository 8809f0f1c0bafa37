"""jlad client: talk to a jlad service, and the small numpy helpers every part shares.

The client side (`JladClient`, `AsyncJladClient`, `propagate_sequence`, the `jlad` CLI) needs
only numpy, Pillow, httpx and tqdm. `flowio`, `viz`, `warp` and `masks` are plain numpy
helpers that the service and the training code import too.
"""

from jlad_client._version import __version__
from jlad_client.client import NO_RETRY, AsyncJladClient, JladClient, RetryPolicy
from jlad_client.errors import JladError, ProblemError, TransportError
from jlad_client.masks import propagate_mask
from jlad_client.results import (
    CorrespondenceResult,
    Landmark,
    LandmarksResult,
    Match,
    ModelInfo,
    ModelRef,
    PropagationResult,
    ReadyStatus,
    Size,
)

__all__ = [
    "NO_RETRY",
    "AsyncJladClient",
    "CorrespondenceResult",
    "JladClient",
    "JladError",
    "Landmark",
    "LandmarksResult",
    "Match",
    "ModelInfo",
    "ModelRef",
    "ProblemError",
    "PropagationResult",
    "ReadyStatus",
    "RetryPolicy",
    "Size",
    "TransportError",
    "__version__",
    "propagate_mask",
]
