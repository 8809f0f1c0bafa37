"""Property-based requests generated from the service's own OpenAPI document: never a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error

from tests.service_support import RunningServer, serve, service_settings


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[RunningServer]:
    config = service_settings(
        model_dir,
        models=["faces"],
        default_model="faces",
        max_upload_bytes=256 * 1024,
        max_query_points=8,
    )
    with serve(config) as running:
        yield running


# schemathesis' own pytest plugin does not run under pytest 9 yet, so each operation's
# strategy is driven by hypothesis directly: the same generated cases, the same check.
@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def _exercise(data: st.DataObject, strategy: st.SearchStrategy[schemathesis.Case]) -> None:
    case = data.draw(strategy)
    case.call_and_validate(checks=[not_a_server_error])


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=str)
def test_no_server_errors(server: RunningServer, mode: schemathesis.GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    failures = []
    for operation in operations:
        try:
            _exercise(strategy=operation.as_strategy(generation_mode=mode))
        except Unsatisfiable:
            # Nothing to get wrong: e.g. GET /healthz has no input to make negative.
            assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # collect all operations' failures, then report
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    # The generated requests really reached the service.
    metrics = text_string_to_metric_families(server.state.metrics.render().decode())
    routes = {s.labels["route"] for f in metrics if f.name == "jlad_requests" for s in f.samples}
    assert {"/landmarks", "/correspond", "/propagate", "/models/{name}"} <= routes


def test_openapi_documents_both_request_encodings(server: RunningServer) -> None:
    import httpx

    spec = httpx.get(server.url + "/openapi.json").json()
    body = spec["paths"]["/correspond"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    schemas = spec["components"]["schemas"]
    form = schemas[body["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert form["properties"]["source"]["format"] == "binary"
    as_json = schemas[body["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert as_json["properties"]["source"]["type"] == "string"
    assert "Problem" in schemas
