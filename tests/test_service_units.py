"""Known answers for the pure pieces: settings, field conversions, content negotiation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jlad_client.coords import normalised_to_pixels
from pydantic import ValidationError

from service import fields
from service.inputs import JSON, NPZ, PNG, negotiate
from service.outputs import CorrespondPlan
from service.problems import ALL_KINDS, Problem, kind_for_status
from service.schemas import CorrespondOptions
from service.settings import Settings


def cell_centres_normalised(h: int, w: int) -> np.ndarray:
    """(2, h, w) normalised (x, y) of each cell centre: the identity mapping."""
    xs = (2 * np.arange(w) + 1) / w - 1
    ys = (2 * np.arange(h) + 1) / h - 1
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx, gy]).astype(np.float32)


# -- settings ----------------------------------------------------------------------------


def test_settings_read_jlad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JLAD_API_KEYS", "alpha, beta,,")
    monkeypatch.setenv("JLAD_TRUSTED_PROXIES", "10.0.0.1,10.0.0.2")
    monkeypatch.setenv("JLAD_ROOT_PATH", "jlad/")
    monkeypatch.setenv("JLAD_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("JLAD_MODEL_DIR", "/srv/models")
    monkeypatch.setenv("JLAD_LOG_LEVEL", "DEBUG")
    settings = Settings()
    assert settings.api_keys == ["alpha", "beta"]
    assert settings.trusted_proxies == ["10.0.0.1", "10.0.0.2"]
    assert settings.root_path == "/jlad"
    assert settings.max_batch_size == 4
    assert settings.model_dir == Path("/srv/models")
    assert settings.log_level == "debug"


def test_settings_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("JLAD_")]:
        monkeypatch.delenv(name)
    s = Settings()
    assert (s.host, s.port, s.default_model, s.providers) == ("127.0.0.1", 8000, "objects", "auto")
    assert (s.queue, s.precision, s.api_keys, s.root_path) == ("local", "fp32", [], "")
    assert s.model_dir == Path("models")


def test_settings_refuse_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JLAD_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("JLAD_MAX_BATCH_SIZE")
    monkeypatch.setenv("JLAD_PRECISION", "int4")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("JLAD_PRECISION", "int8")
    assert Settings().precision == "int8"
    # several API processes share work only through the Redis queue
    monkeypatch.setenv("JLAD_API_PROCESSES", "2")
    with pytest.raises(ValidationError, match="JLAD_QUEUE=redis"):
        Settings()
    monkeypatch.setenv("JLAD_QUEUE", "redis")
    assert Settings().api_processes == 2


# -- problems ----------------------------------------------------------------------------


def test_problem_kinds_are_unique_and_typed() -> None:
    slugs = [k.slug for k in ALL_KINDS]
    assert len(slugs) == len(set(slugs))
    assert all(k.type_uri == "https://jlad.dev/problems/" + k.slug for k in ALL_KINDS)
    assert kind_for_status(404).slug == "not-found"
    assert kind_for_status(418).status == 418


# -- fields ------------------------------------------------------------------------------


def test_identity_mapping_gives_zero_flow_on_the_grid() -> None:
    mapping = cell_centres_normalised(4, 6)
    flow = fields.dense_flow(mapping, "grid", (120, 80), (120, 80))
    assert flow.shape == (4, 6, 2)
    np.testing.assert_allclose(flow, 0, atol=1e-4)


def test_identity_mapping_gives_zero_flow_inside_at_pixel_resolution() -> None:
    mapping = cell_centres_normalised(4, 4)
    flow = fields.dense_flow(mapping, "pixels", (64, 32), (64, 32))
    assert flow.shape == (32, 64, 2)
    # Between the outermost cell centres the bilinear upsampling is exact.
    np.testing.assert_allclose(flow[4:-4, 8:-8], 0, atol=1e-3)


def test_uniform_shift_of_the_mapping_is_a_uniform_pixel_flow() -> None:
    width, height, dx, dy = 80, 40, 10.0, -4.0
    mapping = cell_centres_normalised(4, 8)
    mapping[0] += 2 * dx / width
    mapping[1] += 2 * dy / height
    flow = fields.dense_flow(mapping, "grid", (width, height), (width, height))
    np.testing.assert_allclose(flow[..., 0], dx, atol=1e-4)
    np.testing.assert_allclose(flow[..., 1], dy, atol=1e-4)


def test_flow_scales_between_images_of_different_sizes() -> None:
    # Identity in normalised space, source 100 x 50 and target 200 x 80: cell centres move.
    mapping = cell_centres_normalised(2, 4)
    flow = fields.dense_flow(mapping, "grid", (100, 50), (200, 80))
    j = np.arange(4)
    np.testing.assert_allclose(flow[0, :, 0], (j + 0.5) * (200 / 4 - 100 / 4), atol=1e-4)
    i = np.arange(2)
    np.testing.assert_allclose(flow[:, 0, 1], (i + 0.5) * (80 / 2 - 50 / 2), atol=1e-4)


def test_points_at_cell_centres_sample_the_mapping_exactly() -> None:
    rng = np.random.default_rng(0)
    mapping = rng.uniform(-1, 1, (2, 4, 4)).astype(np.float32)
    confidence = rng.uniform(0, 1, (4, 4)).astype(np.float32)
    centres = fields.grid_cell_centres(4, 4, 64, 64).reshape(-1, 2)
    matched, conf = fields.match_points(mapping, confidence, centres, (64, 64), (32, 48))
    expected = normalised_to_pixels(mapping.transpose(1, 2, 0).reshape(-1, 2), (48, 32))
    np.testing.assert_allclose(matched, expected, atol=1e-4)
    np.testing.assert_allclose(conf, confidence.reshape(-1), atol=1e-6)


def test_landmarks_in_pixels_follow_align_corners_false() -> None:
    corners = np.array([[-1, -1], [1, 1], [0, 0]], np.float32)
    np.testing.assert_allclose(
        fields.landmarks_to_pixels(corners, 10, 20), [[-0.5, -0.5], [9.5, 19.5], [4.5, 9.5]]
    )


# -- negotiation and planning ------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "offers", "expected"),
    [
        (None, [JSON, NPZ, PNG], JSON),
        ("*/*", [JSON, NPZ, PNG], JSON),
        ("image/png", [JSON, NPZ, PNG], PNG),
        ("image/*", [JSON, NPZ, PNG], PNG),
        ("application/x-npz", [JSON, NPZ, PNG], NPZ),
        ("image/png;q=0.5, application/json;q=0.9", [JSON, NPZ, PNG], JSON),
        ("image/png, */*;q=0.1", [JSON, NPZ, PNG], PNG),
        ("*/*", [PNG, JSON, NPZ], PNG),
        ("application/*, image/png;q=0", [PNG, JSON, NPZ], JSON),
    ],
)
def test_negotiate_picks_the_preferred_media_type(
    accept: str | None, offers: list[str], expected: str
) -> None:
    assert negotiate(accept, offers) == expected


@pytest.mark.parametrize("accept", ["text/html", "image/jpeg", "application/xml", "image/png;q=0"])
def test_negotiate_refuses_what_it_cannot_produce(accept: str) -> None:
    with pytest.raises(Problem) as exc:
        negotiate(accept, [JSON, NPZ] if accept.startswith("image/png") else [JSON, NPZ, PNG])
    assert exc.value.kind.status == 406


def test_correspond_plan_runs_only_the_alignments_it_needs() -> None:
    grid = CorrespondPlan.of(CorrespondOptions(), JSON)
    assert (grid.sampling, grid.pairs()) == ("grid", [(0, 1)])
    target = CorrespondPlan.of(CorrespondOptions(resolution="target"), JSON)
    assert target.pairs() == [(1, 0)]
    target_points = CorrespondPlan.of(
        CorrespondOptions(resolution="target", points=[(1.0, 2.0)]), JSON
    )
    assert target_points.pairs() == [(0, 1), (1, 0)]
    warped = CorrespondPlan.of(CorrespondOptions(view="warped"), PNG)
    assert warped.pairs() == [(1, 0)]
    landmarks = CorrespondPlan.of(CorrespondOptions(view="landmarks"), PNG)
    assert (landmarks.pairs(), landmarks.landmarks) == ([], True)
    png_default = CorrespondPlan.of(CorrespondOptions(), PNG)
    assert (png_default.sampling, png_default.pairs()) == ("source", [(0, 1)])


def test_take_rows_is_a_view_for_consecutive_rows_and_a_gather_otherwise() -> None:
    from service.runtime import take_rows

    array = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    for rows in ([1, 2, 3], [0], [3, 1], [0, 2, 4], [2, 2]):
        taken = take_rows(array, rows)
        np.testing.assert_array_equal(taken, array[rows])
        assert np.shares_memory(taken, array) == (rows in ([1, 2, 3], [0]))
        assert taken.flags["C_CONTIGUOUS"]


def test_freeze_startup_heap_spares_old_cycles_and_collects_new_ones() -> None:
    import gc
    import weakref

    from service.heap import freeze_startup_heap

    class Node:
        other: object = None

    def cycle() -> weakref.ref[Node]:
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    gc.unfreeze()
    try:
        old = cycle()  # garbage already, but not yet collected
        gc.disable()  # no automatic collection between the steps below
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        assert old() is None  # freeze collects first: what was garbage is gone
        kept = Node()
        kept.other = kept
        before = weakref.ref(kept)
        gc.freeze()  # as if `kept` had existed at startup
        del kept
        new = cycle()
        gc.collect()
        assert new() is None  # made after the freeze: collected
        assert before() is not None  # frozen: never collected, even as garbage
    finally:
        gc.enable()
        gc.unfreeze()


def test_every_route_and_dependency_runs_on_the_event_loop() -> None:
    """FastAPI hands every plain `def` endpoint or dependency to a worker thread and back:
    two thread switches each, per request (~0.2 ms of `/correspond` at concurrency 1). None
    of jlad's block, so all are `async def`."""
    import inspect

    from fastapi.routing import APIRoute

    from service import demo, routes

    seen: list[str] = []

    def walk(dependant: Any, where: str) -> None:
        for dep in dependant.dependencies:
            if dep.call is not None:
                seen.append(f"{where}: {dep.call.__name__}")
                assert inspect.iscoroutinefunction(dep.call), seen[-1]
            walk(dep, where)

    endpoints = [r for router in (routes.public, routes.api, demo.router) for r in router.routes]
    assert {"/landmarks", "/correspond", "/healthz"} <= {getattr(r, "path", "") for r in endpoints}
    for route in endpoints:
        assert isinstance(route, APIRoute)
        assert inspect.iscoroutinefunction(route.dependant.call), route.path
        walk(route.dependant, route.path)
    assert any(s.endswith("state_dependency") for s in seen)
    assert any(s.endswith("request_deadline") for s in seen)
