"""Deployment artefacts: Dockerfile, docker/ and k8s/ agree with each other and the service.

No Docker engine or cluster here, so the checks are static but real: hadolint lints the
Dockerfile, every built-in manifest of every overlay validates against the Kubernetes
OpenAPI schemas shipped offline by `kubernetes-validate`, custom resources (KEDA, Gateway
API) are checked field by field, and the numbers the gateway, the probes and the grace
periods use are recomputed from `service.settings.Settings` as each container would see it
(image ENV + ConfigMap + container env), never written down twice.

Overlays are rendered by a small kustomize subset below (resources, components, namespace,
images, strategic-merge and JSON 6902 patches: what k8s/ uses); where `kubectl` is
installed, its built-in kustomize renders them too and must give the same objects.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from packaging.requirements import Requirement

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKER = ROOT / "docker"
OVERLAYS = ("cpu", "gpu")
MIB = 1024 * 1024

# The deployment's rules, stated once (docs/DEPLOY.md explains them).
GATEWAY_TIMEOUT_MARGIN_S = 5  # the service's own 504 must beat the gateway's
EXIT_MARGIN_S = 5  # after the drain, time for the process to exit
# Oldest Kubernetes the manifests promise to work on, and the newest schemas shipped.
KUBERNETES_VERSIONS = ("1.29.0", kv_utils.latest_version())
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}
JLAD_COMPONENTS = ("api", "worker")
ENTRY_POINTS = {"api": ["python", "-m", "service"], "worker": ["python", "-m", "service.worker"]}

Manifest = dict[str, Any]


# --------------------------------------------------------------------------- the rules


def gateway_body_limit_bytes(settings: Settings) -> int:
    """Gateway body limit: JLAD_MAX_UPLOAD_BYTES (the whole body) rounded up to MiB + 1 MiB.

    At least the service's limit, so every body the service accepts gets through; 1 MiB
    more, so a body just over it still reaches the service and gets its problem+json 413.
    """
    return (math.ceil(settings.max_upload_bytes / MIB) + 1) * MIB


def gateway_timeout_s(settings: Settings) -> int:
    """Gateway read/send timeout: the longest deadline a client may ask for, plus a margin."""
    return math.ceil(settings.max_deadline_ms / 1000) + GATEWAY_TIMEOUT_MARGIN_S


def min_termination_grace_s(settings: Settings, pre_stop_s: int) -> int:
    """Kubernetes/compose grace: pre-stop delay + JLAD_SHUTDOWN_GRACE_S drain + exit margin."""
    return pre_stop_s + math.ceil(settings.shutdown_grace_s) + EXIT_MARGIN_S


# --------------------------------------------------------------------------- small parsers


PROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def project_version() -> str:
    return str(PROJECT["version"])


def load_documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def size_bytes(text: str) -> int:
    """nginx size syntax (`33m`, `512k`, `1g`, plain bytes) in bytes."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", text.strip())
    assert match, f"not an nginx size: {text!r}"
    return int(match[1]) * {"": 1, "k": 1024, "m": MIB, "g": 1024 * MIB}[match[2].lower()]


def seconds(text: str | int) -> float:
    """`65`, `65s`, `1m5s` (nginx / Gateway API / compose durations) in seconds."""
    if isinstance(text, int):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)?", text.strip())
    assert parts and "".join(n + u for n, u in parts) == text.strip(), text
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
    return sum(float(number) * scale[unit] for number, unit in parts)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = pending + line
        pending = ""
        keyword, _, arguments = logical.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM first, base image with global ARGs resolved)."""
    global_args: dict[str, str] = {}
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, arguments in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if keyword == "ARG" and current is None:
            name, _, default = arguments.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            image, _, name = arguments.partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], image.strip())
            current = stages.setdefault(name.strip(), [])
            current.append(("FROM", image))
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current.append((keyword, arguments))
    return stages


def image_environment(stage: str) -> dict[str, str]:
    """The ENV a process in the `stage` image starts with."""
    environment: dict[str, str] = {}
    for keyword, arguments in dockerfile_stages()[stage]:
        if keyword == "ENV":
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                environment[name] = value
    return environment


def image_uid(stage: str) -> int:
    """The numeric uid the `stage` image runs as (USER uid[:gid])."""
    (user,) = [a for k, a in dockerfile_stages()[stage] if k == "USER"]
    return int(user.split(":")[0])


def stage_of_image(image: str) -> str:
    """Dockerfile target an image reference was built from: `.../jlad-gpu:0.1.0` -> gpu."""
    repository = image.split("@")[0].rsplit(":", 1)[0].rsplit("/", 1)[-1]
    assert repository in {"jlad-cpu", "jlad-gpu"}, f"not a jlad image: {image}"
    return repository.removeprefix("jlad-")


def env_file_values(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@contextmanager
def process_environment(environment: dict[str, str]) -> Iterator[None]:
    """os.environ as a process started with `environment` would have it (JLAD_* only)."""
    saved = dict(os.environ)
    try:
        for name in [n for n in os.environ if n.startswith("JLAD_")]:
            del os.environ[name]
        os.environ.update(environment)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def settings_from(environment: dict[str, str]) -> Settings:
    """The Settings a process started with exactly `environment` builds."""
    with process_environment(environment):
        return Settings()


def unknown_settings(names: Iterable[str]) -> list[str]:
    """JLAD_* names that are no field of Settings (a typo the service would silently ignore)."""
    fields = {f"JLAD_{name.upper()}" for name in Settings.model_fields}
    return sorted(n for n in names if n.startswith("JLAD_") and n not in fields)


# --------------------------------------------------------------------------- kustomize subset

# Strategic-merge keys of the built-in lists k8s/ patches; other lists are replaced whole,
# as kustomize does for them and for every list of a custom resource.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name"}
CLUSTER_SCOPED_KINDS = {"Namespace"}


def strategic_merge(target: Manifest, patch: Manifest) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            strategic_merge(target[key], value)
        elif key in MERGE_KEYS and isinstance(value, list) and isinstance(target.get(key), list):
            merge_key = MERGE_KEYS[key]
            existing = {item[merge_key]: item for item in target[key]}
            for item in value:
                if item[merge_key] in existing:
                    strategic_merge(existing[item[merge_key]], item)
                else:
                    target[key].append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def json6902(document: Manifest, operations: list[dict[str, Any]]) -> None:
    for operation in operations:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]
        ]
        node: Any = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if operation["op"] == "add":
                node.insert(index, copy.deepcopy(operation["value"]))
            elif operation["op"] == "replace":
                node[index] = copy.deepcopy(operation["value"])
            else:
                assert operation["op"] == "remove", operation
                del node[index]
        elif operation["op"] in {"add", "replace"}:
            assert operation["op"] == "add" or last in node, operation
            node[last] = copy.deepcopy(operation["value"])
        else:
            assert operation["op"] == "remove", operation
            del node[last]


def matches_target(document: Manifest, target: dict[str, str]) -> bool:
    group, _, version = document["apiVersion"].rpartition("/")
    return (
        target.get("kind", document["kind"]) == document["kind"]
        and target.get("name", document["metadata"]["name"]) == document["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def set_images(documents: list[Manifest], images: list[dict[str, str]]) -> None:
    for document in documents:
        pod = document.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, _, tag = container["image"].rpartition(":")
            if "/" in tag:  # the colon was a registry port: no tag
                name, tag = container["image"], ""
            for image in images:
                if image["name"] == name:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def render_kustomization(directory: Path) -> list[Manifest]:
    """The objects `kustomize build directory` makes, for the features k8s/ uses."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "components", "patches", "images"}
    assert set(kustomization) <= known, f"renderer lacks {set(kustomization) - known}"
    documents: list[Manifest] = []
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        path = (directory / entry).resolve()
        documents += render_kustomization(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        body = load_documents(directory / patch["path"])
        if "target" in patch:
            (operations,) = body
            hits = [d for d in documents if matches_target(d, patch["target"])]
            assert hits, f"patch {patch['path']} matches nothing"
            for document in hits:
                json6902(document, operations)
        else:
            for part in body:
                wanted = {"kind": part["kind"], "name": part["metadata"]["name"]}
                (document,) = [d for d in documents if matches_target(d, wanted)]
                strategic_merge(document, part)
    set_images(documents, kustomization.get("images", []))
    if "namespace" in kustomization:
        for document in documents:
            if document["kind"] not in CLUSTER_SCOPED_KINDS:
                document["metadata"]["namespace"] = kustomization["namespace"]
    return documents


def kustomization_with_gateway_api(directory: Path) -> Path:
    """A kustomization: the gpu overlay plus the optional Gateway API component."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "jlad",
                # kustomize refuses absolute paths here.
                "resources": [os.path.relpath(K8S / "overlays" / "gpu", directory)],
                "components": [os.path.relpath(K8S / "components" / "gateway-api", directory)],
            }
        )
    )
    return directory


def canonical(documents: list[Manifest]) -> dict[tuple[str, str, str], Any]:
    """Objects keyed by (kind, namespace, name), merge-keyed lists sorted: order-free."""

    def normalise(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: normalise(v) for k, v in node.items()}
        if isinstance(node, list):
            items = [normalise(v) for v in node]
            if items and all(isinstance(i, dict) and "name" in i for i in items):
                items.sort(key=lambda i: str(i["name"]))
            return items
        return node

    return {
        (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): normalise(d)
        for d in documents
    }


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Manifest]]:
    return request.param, render_kustomization(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {name: render_kustomization(K8S / "overlays" / name) for name in OVERLAYS}


# --------------------------------------------------------------------------- manifest lookups


def find(documents: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [
        d
        for d in documents
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def the(documents: list[Manifest], kind: str, name: str) -> Manifest:
    (document,) = find(documents, kind, name)
    return document


def workloads(documents: list[Manifest]) -> list[Manifest]:
    return [d for d in documents if d["kind"] in {"Deployment", "StatefulSet"}]


def component(workload: Manifest) -> str:
    return str(workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def jlad_workload(documents: list[Manifest], which: str) -> Manifest:
    return the(documents, "Deployment", f"jlad-{which}")


def container_environment(container: Manifest, documents: list[Manifest]) -> dict[str, str]:
    """What the container's process sees: image ENV, then envFrom, then env (k8s order)."""
    environment = image_environment(stage_of_image(container["image"]))
    for source in container.get("envFrom", []):
        config_map = the(documents, "ConfigMap", source["configMapRef"]["name"])
        environment.update(config_map["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
        else:
            reference = variable["valueFrom"]["secretKeyRef"]
            secrets = find(documents, "Secret", reference["name"])
            environment[variable["name"]] = (
                secrets[0]["stringData"][reference["key"]] if secrets else "from-secret"
            )
    return environment


def effective_settings(workload: Manifest, documents: list[Manifest]) -> Settings:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return settings_from(container_environment(container, documents))


def selector_matches(selector: Manifest, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present, value = expression["key"] in labels, labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression.get("values", []):
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def pod_labels(workload: Manifest) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


# =========================================================================== Dockerfile


def hadolint_findings(dockerfile: Path) -> list[dict[str, Any]]:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings: list[dict[str, Any]] = json.loads(result.stdout or "[]")
    assert (result.returncode == 0) == (not findings), result.stderr
    return findings


def test_hadolint_passes_on_the_dockerfile() -> None:
    assert hadolint_findings(ROOT / "Dockerfile") == []


def test_hadolint_is_live_and_rejects_an_unpinned_base(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fastapi\nCMD python -m service\n")
    codes = {finding["code"] for finding in hadolint_findings(bad)}
    assert {"DL3007", "DL3013"} <= codes, codes


def test_dockerfile_stages_bases_and_torch_pin() -> None:
    stages = dockerfile_stages()
    assert list(stages) == ["build", "gpu", "cpu"], "cpu last: the default of `docker build .`"
    for name, instructions in stages.items():
        base = instructions[0][1]
        repository, _, tag = base.partition("@")[0].rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: unpinned base {base}"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{name}: tag {tag} is not an exact version"
    assert "cudnn-runtime" in stages["gpu"][0][1]
    (torch_pin,) = [r for r in PROJECT["optional-dependencies"]["train"] if r.startswith("torch")]
    build = " ".join(a for _, a in stages["build"])
    default = re.search(r"TORCH_VERSION=(\S+)", (ROOT / "Dockerfile").read_text())
    assert default and torch_pin == f"torch=={default[1]}"
    assert "download.pytorch.org/whl/cpu" in build
    assert "model_export.export --checkpoints checkpoints --out /models" in build


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
def test_runtime_image_is_small_non_root_and_serves_on_the_settings_port(stage: str) -> None:
    instructions = dockerfile_stages()[stage]
    text = "\n".join(f"{k} {a}" for k, a in instructions)
    assert "torch" not in text, "runtime images carry no torch"
    assert "[serve]" in text and "[train]" not in text
    assert image_uid(stage) >= 10000, "numeric, non-root uid (runAsNonRoot can verify it)"
    settings = settings_from(image_environment(stage))
    assert settings.host == "0.0.0.0"
    (expose,) = [a for k, a in instructions if k == "EXPOSE"]
    assert int(expose) == settings.port
    assert settings.model_dir.as_posix() == "/opt/jlad/models"
    assert any(k == "COPY" and "--from=build" in a and "/models" in a for k, a in instructions)
    assert any(k == "HEALTHCHECK" and "healthcheck.py" in a for k, a in instructions)
    (cmd,) = [a for k, a in instructions if k == "CMD"]
    assert json.loads(cmd) == ENTRY_POINTS["api"]
    assert image_environment(stage)["HOME"] == "/tmp", "the only writable path when RO"
    assert unknown_settings(image_environment(stage)) == []


def test_gpu_image_swaps_in_onnxruntime_gpu() -> None:
    run = " ".join(a for k, a in dockerfile_stages()["gpu"] if k == "RUN")
    uninstall, install = (
        run.index("pip uninstall --yes onnxruntime"),
        run.index("onnxruntime-gpu=="),
    )
    assert run.index("[serve]") < uninstall < install, "CPU wheel out before the GPU one goes in"
    assert "CUDAExecutionProvider" in run


def dockerignore_includes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: last matching pattern wins; a match on a parent counts."""
    included = True
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = (
            re.escape(body)
            .replace(r"\*\*/", "(.*/)?")
            .replace(r"\*\*", ".*")
            .replace(r"\*", "[^/]*")
        )
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            included = negate
    return included


def test_dockerignore_sends_what_the_dockerfile_uses_and_nothing_else() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    used: list[str] = []
    for instructions in dockerfile_stages().values():
        for keyword, arguments in instructions:
            words = arguments.split()
            if keyword == "COPY" and not any(w.startswith("--from") for w in words):
                used += [w for w in words[:-1] if not w.startswith("--")]
            for mount in re.findall(r"--mount=(\S+)", arguments):
                fields = dict(f.split("=", 1) for f in mount.split(","))
                if "from" not in fields and "source" in fields:
                    used.append(fields["source"])
    assert used, "no build-context paths found"
    for path in used:
        assert (ROOT / path).exists() or path == "README.md", f"{path} missing"
        sample = f"{path}/x.py" if (ROOT / path).is_dir() else path
        assert dockerignore_includes(sample, patterns), f"{path} is used but excluded"
    for path in [
        ".venv/bin/python",
        "models/objects/1/manifest.json",
        ".git/HEAD",
        "tests/test_deploy.py",
        "runs/x.png",
        "service/__pycache__/app.pyc",
        "__pycache__/x.pyc",
    ]:
        assert not dockerignore_includes(path, patterns), f"{path} would be sent to the daemon"


@pytest.mark.parametrize("extra", ["serve", "train"])
def test_image_constraints_pin_every_requirement_of_the_extra(extra: str) -> None:
    pins = {}
    for line in (DOCKER / f"constraints-{extra}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            pins[requirement.name.lower().replace("_", "-")] = specifier.version
    for line in PROJECT["optional-dependencies"][extra] + PROJECT["dependencies"]:
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} unpinned in docker/constraints-{extra}.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])


# =========================================================================== Kubernetes schemas


def test_minimal_renderer_reads_every_overlay(rendered: dict[str, list[Manifest]]) -> None:
    for name, documents in rendered.items():
        kinds = sorted({d["kind"] for d in documents})
        assert {"Deployment", "ConfigMap", "ScaledObject", "Ingress"} <= set(kinds), (name, kinds)
        keys = [(d["kind"], d["metadata"]["name"]) for d in documents]
        assert len(keys) == len(set(keys)), f"{name}: duplicate objects"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (built-in kustomize) absent")
@pytest.mark.parametrize("target", [*OVERLAYS, "gpu+gateway-api"])
def test_minimal_renderer_agrees_with_kustomize(target: str, tmp_path: Path) -> None:
    directory = (
        kustomization_with_gateway_api(tmp_path / "k")
        if target == "gpu+gateway-api"
        else K8S / "overlays" / target
    )
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    by_kustomize = canonical([d for d in yaml.safe_load_all(result.stdout) if d])
    assert canonical(render_kustomization(directory)) == by_kustomize


def test_every_builtin_manifest_validates_against_the_kubernetes_schemas(
    overlay: tuple[str, list[Manifest]],
) -> None:
    name, documents = overlay
    validated = set()
    for document in documents:
        if (document["apiVersion"], document["kind"]) in CUSTOM_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)
        validated.add(document["kind"])
    expected = {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Ingress",
    }
    assert expected <= validated, f"{name}: {expected - validated} not rendered"


def test_schema_validation_rejects_a_broken_deployment(rendered: dict[str, list[Manifest]]) -> None:
    broken = copy.deepcopy(jlad_workload(rendered["cpu"], "api"))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kv_utils.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    typo = copy.deepcopy(jlad_workload(rendered["cpu"], "api"))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv_utils.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSIONS[-1], strict=True)


def test_only_known_custom_resources_escape_schema_validation(
    overlay: tuple[str, list[Manifest]],
) -> None:
    _, documents = overlay
    for document in documents:
        key = (document["apiVersion"], document["kind"])
        if key in CUSTOM_KINDS:
            with pytest.raises(kv_utils.SchemaNotFoundError):
                kubernetes_validate.validate(document, KUBERNETES_VERSIONS[-1], strict=True)


# =========================================================================== KEDA


def test_keda_scaled_object_scales_the_workers_on_the_service_stream(
    overlay: tuple[str, list[Manifest]],
) -> None:
    name, documents = overlay
    (scaled,) = find(documents, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    worker = the(documents, "Deployment", target["name"])
    assert component(worker) == "worker"
    assert "replicas" not in worker["spec"], "KEDA owns the worker replica count"
    assert not [
        h
        for h in find(documents, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == target["name"]
    ], "KEDA makes that HPA"
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["triggers"], "triggers are required"

    settings = effective_settings(worker, documents)
    config = the(documents, "ConfigMap", "jlad-config")["data"]
    url = urlsplit(settings.redis_url)
    namespace = scaled["metadata"]["namespace"]
    kinds_of_count = set()
    for trigger in spec["triggers"]:
        assert trigger["type"] == "redis-streams"
        metadata = trigger["metadata"]
        assert metadata["stream"] == config["JLAD_REDIS_STREAM"] == "jlad:requests"
        assert metadata["consumerGroup"] == config["JLAD_REDIS_GROUP"] == "jlad-workers"
        host, _, port = metadata["address"].rpartition(":")
        assert int(port) == (url.port or 6379)
        assert host in {url.hostname, f"{url.hostname}.{namespace}.svc.cluster.local"}, host
        assert metadata["enableTLS"] == str(url.scheme == "rediss").lower()
        assert int(metadata["databaseIndex"]) == int(url.path.strip("/") or 0)
        counts = {k: int(metadata[k]) for k in ("pendingEntriesCount", "lagCount") if k in metadata}
        assert len(counts) == 1, metadata
        for kind, count in counts.items():
            kinds_of_count.add(kind)
            assert count >= settings.max_batch_size, "a worker's target holds >= one full batch"
        authentication = the(
            documents, "TriggerAuthentication", trigger["authenticationRef"]["name"]
        )
        (password,) = [
            p for p in authentication["spec"]["secretTargetRef"] if p["parameter"] == "password"
        ]
        (container,) = worker["spec"]["template"]["spec"]["containers"]
        (env,) = [e for e in container["env"] if e["name"] == "JLAD_REDIS_PASSWORD"]
        assert env["valueFrom"]["secretKeyRef"] == {
            "name": password["name"],
            "key": password["key"],
        }
    assert kinds_of_count == {"pendingEntriesCount", "lagCount"}, name


# =========================================================================== workloads


def test_every_workload_has_probes_resources_and_a_locked_down_pod(
    overlay: tuple[str, list[Manifest]],
) -> None:
    name, documents = overlay
    assert workloads(documents)
    for workload in workloads(documents):
        where = f"{name}/{workload['metadata']['name']}"
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] > 0, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["enableServiceLinks"] is False, f"{where}: service links inject *_PORT vars"
        assert selector_matches(workload["spec"]["selector"], pod_labels(workload)), where
        for container in pod["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{where}: no {probe}"
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                assert resource in resources["requests"] and resource in resources["limits"], where
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert not security.get("capabilities", {}).get("add"), where
            image = container["image"]
            assert "@sha256:" in image or (":" in image.rsplit("/", 1)[-1]), f"{where}: no tag"
            assert not image.endswith(":latest"), where
            assert container.get("imagePullPolicy") != "Always", where


def test_jlad_workloads_agree_with_the_settings_they_run_with(
    overlay: tuple[str, list[Manifest]],
) -> None:
    name, documents = overlay
    for which in JLAD_COMPONENTS:
        workload = jlad_workload(documents, which)
        where = f"{name}/{which}"
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert pod["securityContext"]["runAsUser"] == image_uid(stage_of_image(container["image"]))
        environment = container_environment(container, documents)
        assert unknown_settings(environment) == [], where
        settings = settings_from(environment)
        assert container["command"] == ENTRY_POINTS[which], where
        assert container["image"].rsplit(":", 1)[1] == project_version(), where
        (port,) = container["ports"]
        assert port["name"] == "http" and port["containerPort"] == settings.port, where
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == settings.port, where
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        for probe in ("livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, where
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp must be writable"
        assert settings.host == "0.0.0.0", where
        assert settings.queue == "redis", where
        # Every request that was accepted can run out its deadline during the drain.
        assert settings.shutdown_grace_s * 1000 >= settings.max_deadline_ms, where
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        pre_stop_s = int(pre_stop["command"][1]) if pre_stop else 0
        if which == "api":
            assert pre_stop.get("command", [""])[0] == "sleep", "API leaves the endpoints first"
        assert pod["terminationGracePeriodSeconds"] >= min_termination_grace_s(
            settings, pre_stop_s
        ), where
        assert "replicas" not in workload["spec"], f"{where}: the autoscaler owns replicas"


def test_api_is_autoscaled_served_and_protected(overlay: tuple[str, list[Manifest]]) -> None:
    name, documents = overlay
    api = jlad_workload(documents, "api")
    (hpa,) = find(documents, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == api["metadata"]["name"]
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
    (service,) = [
        s
        for s in find(documents, "Service")
        if selector_matches({"matchLabels": s["spec"]["selector"]}, pod_labels(api))
    ]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    for workload in (api, jlad_workload(documents, "worker")):
        budgets = [
            p
            for p in find(documents, "PodDisruptionBudget")
            if selector_matches(p["spec"]["selector"], pod_labels(workload))
        ]
        assert len(budgets) == 1, f"{name}/{workload['metadata']['name']}: one PDB"


def test_redis_is_reachable_only_from_api_worker_and_keda(
    rendered: dict[str, list[Manifest]],
) -> None:
    documents = rendered["cpu"]
    redis = the(documents, "StatefulSet", "jlad-redis")
    policies = [
        p
        for p in find(documents, "NetworkPolicy")
        if selector_matches(p["spec"]["podSelector"], pod_labels(redis))
    ]
    assert len(policies) == 1
    (policy,) = policies
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["redis"]
    same_namespace = [p for p in rule["from"] if set(p) == {"podSelector"}]
    elsewhere = [p for p in rule["from"] if "namespaceSelector" in p]
    assert len(same_namespace) + len(elsewhere) == len(rule["from"])
    allowed = [
        w
        for w in workloads(documents)
        if any(selector_matches(p["podSelector"], pod_labels(w)) for p in same_namespace)
    ]
    assert sorted(component(w) for w in allowed) == ["api", "worker"]
    (keda,) = elsewhere
    assert keda["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    assert keda["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "keda-operator"}
    settings = effective_settings(jlad_workload(documents, "api"), documents)
    (service,) = find(documents, "Service", urlsplit(settings.redis_url).hostname)
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels(redis))
    assert service["spec"]["ports"][0]["port"] == urlsplit(settings.redis_url).port


def test_api_network_policy_admits_only_the_gateway_and_monitoring(
    rendered: dict[str, list[Manifest]],
) -> None:
    for documents in rendered.values():
        api = jlad_workload(documents, "api")
        (policy,) = [
            p
            for p in find(documents, "NetworkPolicy")
            if selector_matches(p["spec"]["podSelector"], pod_labels(api))
        ]
        for rule in policy["spec"]["ingress"]:
            assert [p["port"] for p in rule["ports"]] == ["http"]
            for peer in rule["from"]:
                assert set(peer) == {"namespaceSelector"}, "no pod of jlad's namespace"


def test_gpu_overlay_runs_workers_on_gpus_against_external_tls_redis(
    rendered: dict[str, list[Manifest]],
) -> None:
    documents = rendered["gpu"]
    worker = jlad_workload(documents, "worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert stage_of_image(container["image"]) == "gpu"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert any(
        t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"]
    )
    settings = effective_settings(worker, documents)
    assert settings.providers == "cuda" and not settings.allow_cpu_fallback
    assert settings.precision == "fp16"
    assert urlsplit(settings.redis_url).scheme == "rediss"
    assert not find(documents, "Secret"), "production secrets are never committed"
    assert not find(documents, "StatefulSet"), "production Redis is external"
    api = jlad_workload(documents, "api")
    (api_container,) = api["spec"]["template"]["spec"]["containers"]
    assert stage_of_image(api_container["image"]) == "cpu", "the API needs no GPU"
    for workload in workloads(documents):
        assert "/" in workload["spec"]["template"]["spec"]["containers"][0]["image"], (
            "production pulls from a registry"
        )


def test_cpu_overlay_is_self_contained_and_asks_for_no_gpu(
    rendered: dict[str, list[Manifest]],
) -> None:
    documents = rendered["cpu"]
    assert find(documents, "StatefulSet", "jlad-redis")
    (secret,) = find(documents, "Secret", "jlad-secrets")
    assert set(secret["stringData"]) == {"api-keys", "redis-password"}
    for workload in workloads(documents):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert "nvidia.com/gpu" not in json.dumps(container["resources"])


def test_secrets_are_referenced_never_inlined(overlay: tuple[str, list[Manifest]]) -> None:
    _, documents = overlay
    for which in JLAD_COMPONENTS:
        (container,) = jlad_workload(documents, which)["spec"]["template"]["spec"]["containers"]
        for variable in container["env"]:
            if variable["name"] in {"JLAD_API_KEYS", "JLAD_REDIS_PASSWORD"}:
                assert variable["valueFrom"]["secretKeyRef"]["name"] == "jlad-secrets"
        config = the(documents, "ConfigMap", "jlad-config")["data"]
        assert not {"JLAD_API_KEYS", "JLAD_REDIS_PASSWORD"} & set(config)
        assert "@" not in config["JLAD_REDIS_URL"], "no password in the Redis URL"


# =========================================================================== gateway


def test_ingress_matches_root_path_and_the_service_limits(
    overlay: tuple[str, list[Manifest]],
) -> None:
    name, documents = overlay
    api = jlad_workload(documents, "api")
    settings = effective_settings(api, documents)
    (ingress,) = find(documents, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert settings.root_path == "/jlad"
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["path"] == f"{settings.root_path}(/|$)(.*)"
    assert annotations[prefix + "use-regex"] == "true"
    assert annotations[prefix + "rewrite-target"] == "/$2"
    assert annotations[prefix + "x-forwarded-prefix"] == settings.root_path
    assert size_bytes(annotations[prefix + "proxy-body-size"]) == gateway_body_limit_bytes(
        settings
    ), f"{name}: body size must be {gateway_body_limit_bytes(settings) // MIB}m"
    assert size_bytes(annotations[prefix + "proxy-body-size"]) >= settings.max_upload_bytes
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert seconds(annotations[prefix + timeout]) == gateway_timeout_s(settings), timeout
    backend = path["backend"]["service"]
    service = the(documents, "Service", backend["name"])
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"]]
    assert port["targetPort"] == "http"
    for network in settings.trusted_proxies:
        assert network != "*", "trust the gateway's addresses, not everyone"
        ipaddress.ip_network(network)
    assert settings.trusted_proxies, f"{name}: forwarded headers from the gateway ignored"


def test_gateway_api_route_matches_root_path_and_timeouts(tmp_path: Path) -> None:
    documents = render_kustomization(kustomization_with_gateway_api(tmp_path / "k"))
    settings = effective_settings(jlad_workload(documents, "api"), documents)
    (route,) = find(documents, "HTTPRoute")
    assert route["spec"]["parentRefs"], "parentRefs are required to attach the route"
    (rule,) = route["spec"]["rules"]
    (match,) = rule["matches"]
    assert match["path"] == {"type": "PathPrefix", "value": settings.root_path}
    filters = {f["type"]: f for f in rule["filters"]}
    assert filters["URLRewrite"]["urlRewrite"]["path"] == {
        "type": "ReplacePrefixMatch",
        "replacePrefixMatch": "/",
    }
    assert {"name": "X-Forwarded-Prefix", "value": settings.root_path} in filters[
        "RequestHeaderModifier"
    ]["requestHeaderModifier"]["set"]
    for timeout in ("request", "backendRequest"):
        assert seconds(rule["timeouts"][timeout]) == gateway_timeout_s(settings)
    (backend,) = rule["backendRefs"]
    service = the(documents, "Service", backend["name"])
    assert backend["port"] in [p["port"] for p in service["spec"]["ports"]]
    assert (
        f"{gateway_body_limit_bytes(settings) // MIB} MiB"
        in (K8S / "components" / "gateway-api" / "httproute.yaml").read_text()
    )


# =========================================================================== docker compose


@pytest.fixture(scope="module")
def compose() -> Manifest:
    document: Manifest = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return document


def compose_environment(service: Manifest) -> dict[str, str]:
    """Image ENV + env_file + environment (defaults of ${VAR:-default} taken)."""
    environment = image_environment(stage_of_image(service["image"]))
    for env_file in service.get("env_file", []):
        environment.update(env_file_values(DOCKER / env_file))
    for key, value in service.get("environment", {}).items():
        environment[key] = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))
    return environment


def test_compose_stack_has_redis_two_apis_a_worker_and_a_gateway(compose: Manifest) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "api", "worker", "gateway"}
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["api"]["command"] == ENTRY_POINTS["api"]
    assert services["worker"]["command"] == ENTRY_POINTS["worker"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name}: no healthcheck"
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"
        if name in JLAD_COMPONENTS:
            assert image.endswith(f":{project_version()}")
            assert service["build"]["target"] == stage_of_image(image)
            assert service["read_only"] is True and "/tmp" in service["tmpfs"]
            assert service["cap_drop"] == ["ALL"]
            assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "ports" not in services["api"] and "ports" not in services["redis"], (
        "only the gateway is published"
    )


def test_compose_settings_gateway_and_grace_agree(compose: Manifest) -> None:
    services = compose["services"]
    settings = {}
    for name in JLAD_COMPONENTS:
        environment = compose_environment(services[name])
        assert unknown_settings(environment) == [], name
        settings[name] = settings_from(environment)
        assert settings[name].queue == "redis"
        assert urlsplit(settings[name].redis_url).hostname == "redis"
        assert seconds(services[name]["stop_grace_period"]) >= min_termination_grace_s(
            settings[name], 0
        ), name
        assert settings[name].shutdown_grace_s * 1000 >= settings[name].max_deadline_ms
    api = settings["api"]
    gateway = services["gateway"]
    address = gateway["networks"]["jlad"]["ipv4_address"]
    (subnet,) = [c["subnet"] for c in compose["networks"]["jlad"]["ipam"]["config"]]
    assert ipaddress.ip_address(address) in ipaddress.ip_network(subnet)
    assert api.trusted_proxies == [address], "trust exactly the gateway"
    nginx = (DOCKER / "nginx.conf").read_text()

    def directive(name: str) -> str:
        (value,) = re.findall(rf"^\s*{name}\s+([^;]+);", nginx, flags=re.MULTILINE)
        return value.strip()

    assert size_bytes(directive("client_max_body_size")) == gateway_body_limit_bytes(api)
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert seconds(directive(timeout)) == gateway_timeout_s(api), timeout
    assert f"location {api.root_path}/ " in nginx
    assert f"rewrite ^{api.root_path}/(.*)$ /$1 break;" in nginx
    assert f"X-Forwarded-Prefix {api.root_path};" in nginx
    assert f"http://api:{api.port}" in nginx


def test_compose_gpu_override_gives_the_worker_a_gpu() -> None:
    override = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    (worker,) = override["services"].values()
    assert set(override["services"]) == {"worker"}
    assert worker["build"]["target"] == stage_of_image(worker["image"]) == "gpu"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert unknown_settings(worker["environment"]) == []
    assert settings_from({k: str(v) for k, v in worker["environment"].items()}).providers == "cuda"


def run_health_check(port: int, path: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py"), *([path] if path else [])],
        env={**os.environ, "JLAD_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_health_check_script_follows_the_probe_status() -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Probes(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response({"/healthz": 200, "/readyz": 503}.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Probes)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert run_health_check(port).returncode == 0
        not_ready = run_health_check(port, "/readyz")
        assert not_ready.returncode == 1 and "HTTP 503" in not_ready.stderr
    finally:
        server.shutdown()
        server.server_close()
    dead = run_health_check(port)
    assert dead.returncode == 1 and "unhealthy" in dead.stderr
