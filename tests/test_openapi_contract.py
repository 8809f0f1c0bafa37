"""The OpenAPI document is the contract (issue 17).

- schemathesis' command line runs every check against a real `python -m service`, once
  with API keys off and once with keys on: no failure, and the service's own request
  metrics show no 5xx while every inference route did answer 2xx;
- a client generated from the document by openapi-python-client calls /landmarks and
  /correspond, multipart and JSON, without hand edits;
- the document describes the running configuration, and an empty text field means the
  same to the document and to the server (refused).

schemathesis' pytest plugin does not run under pytest 9, so its CLI runs in a subprocess.
What the hooks in tests/schemathesis_hooks.py add (real image content in positive cases)
is explained there.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.schemas import CorrespondJSON, LandmarksJSON, PropagateJSON, option_schemas
from tests.service_support import PROBLEM_PREFIX, assert_problem, chelsea, encode, free_port

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "s3cret-key"
MAX_POINTS = 16
# Cases per operation and phase; the coverage phase adds its own boundary cases.
MAX_EXAMPLES = 5
SEED = 17
CODEGEN = "openapi-python-client==0.29.1"
INFERENCE = ("/landmarks", "/correspond", "/propagate")
PROTECTED = ("/models", "/models/{name}", *INFERENCE)


def _start(model_dir: Path, log: Path, api_keys: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JLAD_")}
    env.update(
        JLAD_HOST="127.0.0.1",
        JLAD_PORT=str(port),
        JLAD_MODEL_DIR=str(model_dir),
        # The faces model is the quicker one; the contract is the same for every model.
        JLAD_MODELS="faces",
        JLAD_DEFAULT_MODEL="faces",
        JLAD_INTRA_OP_THREADS="1",
        JLAD_MAX_QUERY_POINTS=str(MAX_POINTS),
        JLAD_LOG_LEVEL="warning",
        JLAD_API_KEYS=api_keys,
        OMP_NUM_THREADS="1",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return process, f"http://127.0.0.1:{port}"


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"python -m service exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"python -m service not ready in time: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def services(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two `python -m service` processes on free loopback ports: API keys off and on."""
    logs = tmp_path_factory.mktemp("service-logs")
    started = {
        "keys off": (*_start(model_dir, logs / "off.log", ""), logs / "off.log"),
        "keys on": (*_start(model_dir, logs / "on.log", f"{API_KEY},another"), logs / "on.log"),
    }
    try:
        for process, url, log in started.values():
            _wait_ready(process, url, log)
        yield {name: url for name, (_, url, _) in started.items()}
    finally:
        for process, _, _ in started.values():
            process.send_signal(signal.SIGTERM)
        for process, _, _ in started.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _requests_by_route_and_status(url: str) -> dict[tuple[str, int], float]:
    text = httpx.get(url + "/metrics").text
    return {
        (sample.labels["route"], int(sample.labels["status"])): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "jlad_requests"
        for sample in family.samples
        if sample.name == "jlad_requests_total"
    }


def _schemathesis(url: str, workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        url + "/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--no-shrink",
        "--request-timeout",
        "60",
        *extra,
    ]
    # The CLI keeps its example database in the working directory: a temporary one.
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=540
    )


def test_schemathesis_finds_no_failure_with_keys_off_or_on(
    services: dict[str, str], tmp_path: Path
) -> None:
    runs = {
        "keys off": (services["keys off"], ()),
        "keys on": (services["keys on"], ("--header", f"X-API-Key: {API_KEY}")),
    }
    before = {name: _requests_by_route_and_status(url) for name, url in services.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(_schemathesis, url, tmp_path / name.replace(" ", "-"), *extra)
            for name, (url, extra) in runs.items()
        }
        results = {name: future.result() for name, future in futures.items()}
    for name, result in results.items():
        output = result.stdout + result.stderr
        summary = re.search(r"(\d+) generated, (\d+) passed", output)
        print(f"schemathesis {name}: {summary.group(0) if summary else output[-300:]}")
        assert result.returncode == 0 and "No issues found" in output, f"{name}:\n{output[-8000:]}"
        assert summary is not None and int(summary.group(1)) >= 200, output[-2000:]

    for name, url in services.items():
        # What the runs asked (the readiness polls before them got 503s by design).
        earlier = before[name]
        counts = {
            key: n - earlier.get(key, 0)
            for key, n in _requests_by_route_and_status(url).items()
            if n > earlier.get(key, 0)
        }
        server_errors = {key: n for key, n in counts.items() if key[1] >= 500}
        assert not server_errors, (name, server_errors)
        # The generated requests reached the models: every inference route answered 2xx.
        for route in INFERENCE:
            assert counts.get((route, 200), 0) > 0, (name, route, counts)
        unauthorized = {route for (route, status) in counts if status == 401}
        if name == "keys on":
            # schemathesis probed every protected operation without a key, and was refused.
            assert unauthorized == set(PROTECTED), counts
        else:
            assert not unauthorized, counts


def test_document_describes_the_running_configuration(services: dict[str, str]) -> None:
    for name, url in services.items():
        document = httpx.get(url + "/openapi.json").json()
        schemes = document["components"].get("securitySchemes")
        for path, item in document["paths"].items():
            for method, operation in item.items():
                protected = name == "keys on" and path in PROTECTED
                assert ("security" in operation) == protected, (name, method, path)
                assert ("401" in operation["responses"]) == protected, (name, method, path)
                if protected:
                    answer = httpx.request(method, url + path.replace("{name}", "faces"))
                    assert_problem(answer, 401, "unauthorized")
                    header = operation["responses"]["401"]["headers"]["WWW-Authenticate"]
                    assert header["required"] and answer.headers["www-authenticate"]
        if name == "keys off":
            assert schemes is None
            assert httpx.get(url + "/models").status_code == 200
        else:
            assert schemes is not None
            assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}
            # Both schemes the document names do let a request in.
            assert httpx.get(url + "/models", headers={"X-API-Key": API_KEY}).status_code == 200
            bearer = {"Authorization": f"Bearer {API_KEY}"}
            assert httpx.get(url + "/models", headers=bearer).status_code == 200


def test_every_problem_status_is_documented_with_examples(services: dict[str, str]) -> None:
    document = httpx.get(services["keys on"] + "/openapi.json").json()
    problem = jsonschema.Draft202012Validator(document["components"]["schemas"]["Problem"])
    for path in INFERENCE:
        responses = document["paths"][path]["post"]["responses"]
        assert {"400", "401", "404", "406", "413", "415", "422", "429", "500", "503", "504"} <= set(
            responses
        ), path
        assert set(responses["200"]["content"]) == {
            "application/json",
            "image/png",
            "application/x-npz",
        }
        for status, response in responses.items():
            if status == "200":
                continue
            content = response["content"]["application/problem+json"]
            assert content["schema"] == {"$ref": "#/components/schemas/Problem"}
            for example in content["examples"].values():
                value = example["value"]
                problem.validate(value)
                assert value["status"] == int(status) and value["type"].startswith(PROBLEM_PREFIX)
        assert responses["429"]["headers"]["Retry-After"]["required"]
    correspond = document["paths"]["/correspond"]["post"]["responses"]["422"]
    kinds = {
        value["value"]["type"]
        for value in correspond["content"]["application/problem+json"]["examples"].values()
    }
    assert PROBLEM_PREFIX + "points-out-of-bounds" in kinds


def _form_field(url: str, path: str, field: str, text: str) -> httpx.Response:
    image = encode(chelsea())
    files: dict[str, Any] = {
        "/landmarks": {"image": ("c.png", image)},
        "/correspond": {"source": ("s.png", image), "target": ("t.png", image)},
        "/propagate": {
            "source": ("s.png", image),
            "mask": ("m.png", encode(chelsea()[..., 0] // 128)),
            "targets": ("t.png", image),
        },
    }[path]
    return httpx.post(url + path, files=files, data={field: text}, timeout=60)


@pytest.mark.parametrize(
    ("path", "model"),
    [("/landmarks", LandmarksJSON), ("/correspond", CorrespondJSON), ("/propagate", PropagateJSON)],
)
def test_an_empty_text_field_is_refused_by_document_and_server(
    services: dict[str, str], path: str, model: Any
) -> None:
    url = services["keys off"]
    document = httpx.get(url + "/openapi.json").json()
    form = document["components"]["schemas"][model.__name__.removesuffix("JSON") + "Form"]
    options = [
        name
        for name in option_schemas(model)
        if form["properties"][name].get("format") != "binary"
        and form["properties"][name].get("type") != "array"
    ]
    assert options
    for field in options:
        assert not jsonschema.Draft202012Validator(form["properties"][field]).is_valid(""), field
        assert_problem(_form_field(url, path, field, ""), 422, "validation-error")


def test_form_fields_read_as_the_document_says(services: dict[str, str]) -> None:
    url = services["keys off"]
    document = httpx.get(url + "/openapi.json").json()
    form = document["components"]["schemas"]
    pattern = form["CorrespondForm"]["properties"]["points"]["pattern"]
    for text, accepted in [("[[10, 20.5], [0,0]]", True), ("[[1, 2, 3]]", False), ("1,2", False)]:
        assert (re.search(pattern, text) is not None) == accepted, text
        status = _form_field(url, "/correspond", "points", text).status_code
        assert (status == 200) == accepted, (text, status)
    too_many = json.dumps([[1, 1]] * (MAX_POINTS + 1))
    assert re.search(pattern, too_many) is None
    assert_problem(_form_field(url, "/correspond", "points", too_many), 422, "too-many-points")
    for text, accepted in [("false", True), ("True", True), ("1", False), ("yes", False)]:
        status = _form_field(url, "/propagate", "keep_if_neighbours_agree", text).status_code
        assert (status == 200) == accepted, (text, status)
    for text, accepted in [("0.25", True), ("1e-3", True), ("1.5", False), ("NaN", False)]:
        status = _form_field(url, "/propagate", "min_confidence", text).status_code
        assert (status == 200) == accepted, (text, status)


# -- a client generated from the document ------------------------------------------------


@pytest.fixture(scope="module")
def codegen() -> Path:
    """openapi-python-client, installed once per virtualenv into a folder of its own: it
    pins an older httpx than the service's, which must not replace the venv's."""
    target = Path(sys.prefix) / ("codegen-" + CODEGEN.replace("==", "-"))
    if not (target / "openapi_python_client").is_dir():
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        result = subprocess.run(
            [*pip, "--target", str(target), CODEGEN], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"pip install {CODEGEN}: {result.stderr[-3000:]}"
    return target


def test_a_generated_client_works_without_edits(
    services: dict[str, str], codegen: Path, tmp_path: Path
) -> None:
    url = services["keys on"]
    spec = tmp_path / "openapi.json"
    spec.write_bytes(httpx.get(url + "/openapi.json").content)
    (tmp_path / "config.yaml").write_text("post_hooks: []\n")
    package = tmp_path / "jlad_generated"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(spec),
            "--output-path",
            str(package),
            "--meta",
            "none",
            "--config",
            str(tmp_path / "config.yaml"),
        ],
        env={**os.environ, "PYTHONPATH": str(codegen)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # A document the generator has to guess about shows up as warnings.
    assert "Warning" not in output and "Unable" not in output, output

    sys.path.insert(0, str(tmp_path))
    try:
        generated = importlib.import_module("jlad_generated")
        client_mod = importlib.import_module("jlad_generated.client")
        models = importlib.import_module("jlad_generated.models")
        types = importlib.import_module("jlad_generated.types")
        landmarks = importlib.import_module("jlad_generated.api.inference.landmarks")
        correspond = importlib.import_module("jlad_generated.api.inference.correspond")
        _call_generated(url, generated, client_mod, models, types, landmarks, correspond)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.split(".")[0] == "jlad_generated"]:
            del sys.modules[name]


def _call_generated(
    url: str,
    generated: Any,
    client_mod: Any,
    models: Any,
    types: Any,
    landmarks: Any,
    correspond: Any,
) -> None:
    picture = chelsea()
    height, width = picture.shape[:2]
    png = encode(picture)

    def file(name: str) -> Any:
        return types.File(payload=io.BytesIO(png), file_name=name, mime_type="image/png")

    client = client_mod.AuthenticatedClient(base_url=url, token=API_KEY, timeout=60)
    with client:
        as_form = landmarks.sync(client=client, body=models.LandmarksForm(image=file("c.png")))
        as_json = landmarks.sync(
            client=client, body=models.LandmarksJSON(image=base64.b64encode(png).decode())
        )
        for answer in (as_form, as_json):
            assert isinstance(answer, models.LandmarksResponse), answer
            assert (answer.image_size.width, answer.image_size.height) == (width, height)
            assert answer.landmarks
            for mark in answer.landmarks:
                assert -0.5 <= mark.x <= width - 0.5 and -0.5 <= mark.y <= height - 0.5
        # The form and JSON encodings of one request get one answer.
        assert [(m.x, m.y) for m in as_form.landmarks] == [(m.x, m.y) for m in as_json.landmarks]

        points = [[10.0, 20.0], [200.5, 100.0]]
        form = models.CorrespondForm(
            source=file("s.png"), target=file("t.png"), points=json.dumps(points)
        )
        by_form = correspond.sync(client=client, body=form)
        b64 = base64.b64encode(png).decode()
        by_json = correspond.sync(
            client=client,
            body=models.CorrespondJSON(source=b64, target=b64, points=points),
        )
        for answer in (by_form, by_json):
            assert isinstance(answer, models.CorrespondResponse), answer
            assert [list(m.source) for m in answer.matches] == points
            assert answer.flow.shape[-1] == 2
        assert [m.target for m in by_form.matches] == [m.target for m in by_json.matches]

        # Problems come back as the document's Problem model.
        unknown = landmarks.sync_detailed(
            client=client, body=models.LandmarksForm(image=file("c.png")), model="zebra"
        )
        assert unknown.status_code == 404
        assert unknown.parsed.type_ == PROBLEM_PREFIX + "unknown-model"
    anonymous = client_mod.Client(base_url=url, timeout=60)
    with anonymous:
        refused = landmarks.sync_detailed(
            client=anonymous, body=models.LandmarksForm(image=file("c.png"))
        )
        assert refused.status_code == 401
        assert refused.parsed.type_ == PROBLEM_PREFIX + "unauthorized"
    assert generated.__name__ == "jlad_generated"
