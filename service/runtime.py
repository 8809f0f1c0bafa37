"""ONNX Runtime sessions for the model repository, and running a batch of jobs on them.

Nothing here knows about HTTP: `InferenceEngine.run_batch(jobs)` is what the in-process
batcher calls on its worker thread, and what a separate queue worker process calls too.

The repository is Triton-like (docs/CONTRACT.md): `<model_dir>/<name>/<version>/manifest.json`
plus the graphs it lists with their sha256. The highest version of each name is served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service import fpenv
from service.imaging import model_input
from service.jobs import AlignOutput, InferenceJob, InferenceResult, LandmarkOutput
from service.priority import call_at_lower_priority

if TYPE_CHECKING:
    from service.metrics import ServiceMetrics
    from service.settings import Settings

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "jlad.manifest/1"
GRAPHS = ("backbone", "landmarks", "align")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
F32 = NDArray[np.float32]


class ModelLoadError(RuntimeError):
    """The repository, a manifest or a graph cannot be used; the message says how to fix it."""


class ProviderError(ModelLoadError):
    """The execution provider asked for did not load (e.g. CUDA on a machine without it)."""


@dataclass(frozen=True)
class ModelInfo:
    """One model version of the repository, read from its manifest."""

    name: str
    version: str
    root: Path
    manifest: dict[str, Any]

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) the backbone takes."""
        return int(self.manifest["input"]["height"]), int(self.manifest["input"]["width"])

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the feature grid."""
        feats = self.manifest["features"]
        return int(feats["height"]), int(feats["width"])

    @property
    def num_landmarks(self) -> int:
        return int(self.manifest["num_landmarks"])

    @property
    def variants(self) -> list[str]:
        return sorted(self.manifest.get("variants", {}))

    def graph_path(self, precision: str, graph: str) -> tuple[Path, str]:
        """Path of one graph and the sha256 its manifest records."""
        try:
            entry = self.manifest["variants"][precision][graph]
            return self.root / entry["path"], str(entry["sha256"])
        except KeyError:
            raise ModelLoadError(
                f"{self.root / 'manifest.json'}: no {precision} variant of graph '{graph}' "
                f"(variants: {', '.join(self.variants) or 'none'}); set JLAD_PRECISION to one "
                "of them or re-export the model"
            ) from None


def _version_key(version: str) -> tuple[int, int | str]:
    return (1, int(version)) if version.isdigit() else (0, version)


def read_manifest(version_dir: Path) -> ModelInfo:
    """Read and check `version_dir/manifest.json`."""
    path = version_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read the manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        raise ModelLoadError(f"{path}: not a {MANIFEST_SCHEMA} manifest")
    for key in ("name", "version", "input", "features", "num_landmarks", "variants"):
        if key not in manifest:
            raise ModelLoadError(f"{path}: the manifest lacks '{key}'")
    return ModelInfo(str(manifest["name"]), str(manifest["version"]), version_dir, manifest)


def find_models(model_dir: Path, names: Sequence[str] = ()) -> dict[str, ModelInfo]:
    """The highest version of every model under `model_dir` (or of `names` only)."""
    if not model_dir.is_dir():
        raise ModelLoadError(
            f"model repository {model_dir.resolve()} does not exist; run `make models` or set "
            "JLAD_MODEL_DIR"
        )
    found: dict[str, ModelInfo] = {}
    for name_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        if names and name_dir.name not in names:
            continue
        versions = [v for v in name_dir.iterdir() if (v / "manifest.json").is_file()]
        if versions:
            latest = max(versions, key=lambda v: _version_key(v.name))
            found[name_dir.name] = read_manifest(latest)
    missing = [n for n in names if n not in found]
    if missing:
        raise ModelLoadError(f"models {missing} not found under {model_dir.resolve()}")
    if not found:
        raise ModelLoadError(
            f"no models (<name>/<version>/manifest.json) under {model_dir.resolve()}; "
            "run `make models`"
        )
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_graph(path: Path, expected_sha256: str) -> None:
    """Refuse a graph file whose bytes are not the ones the manifest was written for."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: graph file missing; re-export with `make models`")
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise ModelLoadError(
            f"{path}: sha256 {actual} does not match the manifest ({expected_sha256}); the "
            "file is corrupt or from another export — re-export with `make models`"
        )


def resolve_providers(spec: str, available: Sequence[str]) -> list[str]:
    """Provider list for ONNX Runtime from the JLAD_PROVIDERS value.

    `auto`: CUDA then CPU where CUDA is available, else CPU; `cpu`; `cuda` (CUDA, then CPU
    for the nodes CUDA lacks); or explicit comma-separated provider names.
    """
    value = spec.strip().lower()
    if value == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if value == "cpu":
        return [CPU]
    if value == "cuda":
        return [CUDA, CPU]
    return [p.strip() for p in spec.split(",") if p.strip()]


def session_options(intra_op_threads: int = 0, *, spinning: bool = False) -> ort.SessionOptions:
    """The ONNX Runtime options every jlad session uses (the service's and the bench's).

    Denormals are flushed to zero: the soft-argmaxes of the align graph exponentiate scores
    far below the maximum, and on Intel CPUs arithmetic on the resulting subnormal floats
    traps to microcode: the align graph took 1.8x as long on a Xeon (377 vs 209 ms for 4
    pairs; outputs identical). `spinning=False` keeps idle intra-op threads off the cores
    that the event loop and the other sessions need (measured in bench/: spinning made
    batch-1 CPU inference 2.7x slower in the service).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class Session:
    """An ONNX Runtime session made with `session_options` whose runs flush subnormal floats
    in the calling thread too (as its pool threads do), while neither creating nor running
    it changes that thread's floating-point environment (service/fpenv.py says why)."""

    def __init__(self, path: Path, options: ort.SessionOptions, providers: Sequence[str]) -> None:
        self.inner = fpenv.isolated(
            lambda: ort.InferenceSession(str(path), sess_options=options, providers=providers)
        )
        self._environment = fpenv.flushing_subnormals()

    def run(self, names: list[str] | None, feed: dict[str, Any]) -> list[Any]:
        with fpenv.applied(self._environment):
            outputs: list[Any] = self.inner.run(names, feed)
        return outputs

    def get_inputs(self) -> list[Any]:
        return list(self.inner.get_inputs())

    def get_outputs(self) -> list[Any]:
        return list(self.inner.get_outputs())

    def get_providers(self) -> list[str]:
        return list(self.inner.get_providers())

    def get_session_options(self) -> ort.SessionOptions:
        return self.inner.get_session_options()


class ModelSessions:
    """The three ONNX Runtime sessions of one model, at one precision."""

    def __init__(
        self,
        info: ModelInfo,
        precision: str,
        providers: list[str],
        *,
        allow_cpu_fallback: bool,
        intra_op_threads: int = 0,
    ) -> None:
        self.info = info
        self.precision = precision
        options = session_options(intra_op_threads)
        self.sessions: dict[str, Session] = {}
        for graph in GRAPHS:
            path, sha = info.graph_path(precision, graph)
            verify_graph(path, sha)
            try:
                self.sessions[graph] = Session(path, options, providers)
            except Exception as exc:
                raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
        active = self.sessions["backbone"].get_providers()
        self.provider = active[0]
        if providers and providers[0] != CPU and self.provider != providers[0]:
            message = (
                f"{info.name}: {providers[0]} was requested but ONNX Runtime runs "
                f"{self.provider} (is onnxruntime-gpu installed and a GPU visible?)"
            )
            if not allow_cpu_fallback:
                raise ProviderError(message + "; set JLAD_ALLOW_CPU_FALLBACK=true to serve on CPU")
            log.warning("%s; serving on CPU (JLAD_ALLOW_CPU_FALLBACK)", message)
        self._half = {
            graph: session.get_inputs()[0].type == "tensor(float16)"
            for graph, session in self.sessions.items()
        }
        # Read once: the batch loop asks per batch whether the landmark graph takes the image.
        self._inputs = {
            graph: frozenset(i.name for i in session.get_inputs())
            for graph, session in self.sessions.items()
        }

    def takes(self, graph: str, name: str) -> bool:
        """Whether `graph` has an input called `name`."""
        return name in self._inputs[graph]

    def run(self, graph: str, inputs: dict[str, F32], chunk: int) -> dict[str, F32]:
        """Run `graph` on `inputs` (batch axis first), at most `chunk` items at a time.

        Returns the graph's outputs by name, as float32, concatenated over chunks.
        """
        session = self.sessions[graph]
        names = [o.name for o in session.get_outputs()]
        dtype = np.float16 if self._half[graph] else np.float32
        total = next(iter(inputs.values())).shape[0]
        parts: list[list[NDArray[Any]]] = []
        for start in range(0, total, chunk):
            feed = {
                k: v[start : start + chunk].astype(dtype, copy=False) for k, v in inputs.items()
            }
            parts.append(session.run(names, feed))
        # one chunk (the usual case): its arrays as they are, not a concatenated copy
        return {
            name: (
                parts[0][i] if len(parts) == 1 else np.concatenate([p[i] for p in parts])
            ).astype(np.float32, copy=False)
            for i, name in enumerate(names)
        }


def take_rows(array: NDArray[Any], rows: list[int]) -> NDArray[Any]:
    """`array[rows]`, as a view when the rows are consecutive (as a single request's are):
    one image's features are 1.5 MB, a copy of them 0.1 ms."""
    first = rows[0]
    if rows == list(range(first, first + len(rows))):
        return array[first : first + len(rows)]
    return array[rows]


class InferenceEngine:
    """All served models, and `run_batch` to run jobs on them.

    A batch runs the backbone once on every image of every job, then the landmark head on the
    images that asked for it and the alignment head on every requested (source, target) pair.
    """

    def __init__(self, models: dict[str, ModelSessions], max_chunk: int = 8) -> None:
        self.models = models
        self.max_chunk = max_chunk

    @classmethod
    def load(
        cls,
        infos: dict[str, ModelInfo],
        *,
        precision: str,
        providers: str,
        allow_cpu_fallback: bool,
        intra_op_threads: int = 0,
        max_chunk: int = 8,
        nice: int = 0,
    ) -> InferenceEngine:
        """Sessions for every model in `infos`. `nice` > 0: they are created in a thread
        that many nice levels down, so ONNX Runtime's pool threads run at that priority
        (service/priority.py)."""
        provider_list = resolve_providers(providers, ort.get_available_providers())
        if precision == "int8" and provider_list[:1] != [CPU]:
            if providers.strip().lower() != "auto":
                raise ProviderError(
                    f"JLAD_PRECISION=int8 is for CPUs (quantized QDQ graphs), but "
                    f"JLAD_PROVIDERS={providers} asks for {provider_list[0]}; serve fp16 on "
                    "GPUs or set JLAD_PROVIDERS=cpu"
                )
            provider_list = [CPU]

        def create() -> dict[str, ModelSessions]:
            sessions = {}
            for name, info in infos.items():
                started = time.monotonic()
                sessions[name] = ModelSessions(
                    info,
                    precision,
                    provider_list,
                    allow_cpu_fallback=allow_cpu_fallback,
                    intra_op_threads=intra_op_threads,
                )
                log.info(
                    "loaded model %s/%s (%s, %s) in %.2fs",
                    name,
                    info.version,
                    precision,
                    sessions[name].provider,
                    time.monotonic() - started,
                )
            return sessions

        return cls(call_at_lower_priority(create, nice), max_chunk=max_chunk)

    def warm_up(self) -> dict[str, float]:
        """Run every graph of every model once (first runs allocate); seconds per model."""
        seconds = {}
        for name, sessions in self.models.items():
            h, w = sessions.info.input_size
            job = InferenceJob(
                name, np.zeros((2, 3, h, w), np.uint8), landmarks=[0], pairs=[(0, 1)]
            )
            started = time.monotonic()
            self.run_batch([job])
            seconds[name] = time.monotonic() - started
        return seconds

    def run_batch(self, jobs: Sequence[InferenceJob]) -> list[InferenceResult]:
        """Results for `jobs`, in order. Jobs of several models are run model by model."""
        results: list[InferenceResult | None] = [None] * len(jobs)
        by_model: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            by_model.setdefault(job.model, []).append(i)
        for model, indices in by_model.items():
            group = [jobs[i] for i in indices]
            for i, result in zip(indices, self._run_model(model, group), strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    def _run_model(self, model: str, jobs: list[InferenceJob]) -> list[InferenceResult]:
        sessions = self.models[model]
        h, w = sessions.info.input_size
        for job in jobs:
            if job.images.shape[1:] != (3, h, w) or job.images.dtype != np.uint8:
                raise ValueError(
                    f"job images {job.images.dtype} {job.images.shape} do not fit {model} "
                    f"(uint8, 3, {h}, {w})"
                )
        offsets = np.cumsum([0] + [j.num_images for j in jobs])
        # each job's pixels / 255 straight into the batch: the one copy concatenating made
        images = np.empty((int(offsets[-1]), 3, h, w), np.float32)
        for job, start in zip(jobs, offsets[:-1], strict=True):
            model_input(job.images, out=images[start : start + job.num_images])

        started = time.monotonic()
        features = sessions.run("backbone", {"image": images}, self.max_chunk)["features"]
        backbone_done = time.monotonic()

        lm_rows = [int(offsets[k]) + i for k, j in enumerate(jobs) for i in j.landmarks]
        landmark_outputs: dict[str, F32] = {}
        if lm_rows:
            feed = {"features": take_rows(features, lm_rows)}
            if sessions.takes("landmarks", "image"):  # a zooming landmark graph (CONTRACT.md)
                feed["image"] = take_rows(images, lm_rows)
            landmark_outputs = sessions.run("landmarks", feed, self.max_chunk)
        src_rows = [int(offsets[k]) + s for k, j in enumerate(jobs) for s, _ in j.pairs]
        tgt_rows = [int(offsets[k]) + t for k, j in enumerate(jobs) for _, t in j.pairs]
        align_outputs: dict[str, F32] = {}
        if src_rows:
            align_outputs = sessions.run(
                "align",
                {
                    "source_features": take_rows(features, src_rows),
                    "target_features": take_rows(features, tgt_rows),
                },
                self.max_chunk,
            )
        finished = time.monotonic()

        timings = {
            "backbone_ms": (backbone_done - started) * 1000,
            "heads_ms": (finished - backbone_done) * 1000,
        }
        results = []
        lm_at = 0
        pair_at = 0
        for job in jobs:
            landmarks = []
            for _ in job.landmarks:
                out = {k: v[lm_at] for k, v in landmark_outputs.items()}
                landmarks.append(LandmarkOutput(out["points"], out["confidence"], out["heatmaps"]))
                lm_at += 1
            alignments = []
            for _ in job.pairs:
                out = {k: v[pair_at] for k, v in align_outputs.items()}
                alignments.append(
                    AlignOutput(out["mapping"], out["log_sigma"][0], out["confidence"][0])
                )
                pair_at += 1
            results.append(
                InferenceResult(landmarks, alignments, dict(timings), batch_images=len(images))
            )
        return results

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "version": s.info.version,
                "precision": s.precision,
                "provider": s.provider,
            }
            for name, s in self.models.items()
        ]


def load_engine(
    infos: dict[str, ModelInfo], settings: Settings, metrics: ServiceMetrics
) -> InferenceEngine:
    """The sessions of `infos` as `settings` ask, warmed up, with the provider gauge set:
    how both the API process (local queue) and the Redis queue's worker load the models."""
    engine = InferenceEngine.load(
        infos,
        precision=settings.precision,
        providers=settings.providers,
        allow_cpu_fallback=settings.allow_cpu_fallback,
        intra_op_threads=settings.intra_op_threads,
        max_chunk=settings.max_batch_size,
        nice=settings.inference_nice,
    )
    log.info("warmed up", extra={"warmup_seconds": engine.warm_up()})
    for m in engine.describe():
        metrics.provider.labels(m["name"], m["version"], m["provider"], m["precision"]).set(1)
    return engine
