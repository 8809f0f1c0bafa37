"""The OpenAPI document of the running configuration, the service's contract.

FastAPI generates the document from the routes and the pydantic models; this module adds
what depends on the configuration, so that the document says what this process does:

- security schemes, the `security` of the protected routes and their 401 answers only when
  API keys are configured (JLAD_API_KEYS);
- the limits that are settings: most `points` (JLAD_MAX_QUERY_POINTS), most `targets`
  (JLAD_MAX_TARGETS), the largest X-Deadline-Ms (JLAD_MAX_DEADLINE_MS);
- the request body schemas (service.schemas.REQUEST_SCHEMAS) and the Problem schema, and
  problem+json in place of FastAPI's default validation-error answer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from service.problems import UNAUTHORIZED, VALIDATION_ERROR, problem_openapi_responses
from service.routes import api, require_api_key
from service.schemas import REQUEST_SCHEMAS, form_property, without_null
from service.schemas import Problem as ProblemSchema
from service.settings import Settings

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "ApiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "One of the keys in JLAD_API_KEYS.",
    },
    "Bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "The same key as `Authorization: Bearer <key>`.",
    },
}
# Either scheme is enough.
SECURITY: list[dict[str, list[str]]] = [{"ApiKey": []}, {"Bearer": []}]

_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def protected_operations() -> set[tuple[str, str]]:
    """(path, method) of every route of the `api` router, which all ask for an API key."""
    assert any(d.dependency is require_api_key for d in api.dependencies)
    return {
        (route.path_format, method.lower())
        for route in api.routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in route.methods or ()
    }


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if method in _HTTP_METHODS:
                yield path, method, operation


def _set_max_items(schemas: dict[str, Any], body: str, field: str, limit: int) -> None:
    """maxItems of the array `field` of the `body` request (JSON and multipart)."""
    json_field = schemas[f"{body}JSON"]["properties"][field]
    for alternative in [json_field, *json_field.get("anyOf", [])]:
        if alternative.get("type") == "array":
            alternative["maxItems"] = limit
    form_field = schemas[f"{body}Form"]["properties"][field]
    if form_field.get("type") == "array":  # file parts
        form_field["maxItems"] = limit
    else:  # JSON text in one part
        schemas[f"{body}Form"]["properties"][field] = form_property(without_null(json_field))


def complete_document(document: dict[str, Any], app: FastAPI, settings: Settings) -> None:
    """Turn FastAPI's `document` into the contract of this configuration (in place)."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = ProblemSchema.model_json_schema()
    # Copies: each app's document gets its own limits.
    schemas.update(copy.deepcopy(REQUEST_SCHEMAS))

    # Limits that are settings.
    _set_max_items(schemas, "Correspond", "points", settings.max_query_points)
    _set_max_items(schemas, "Propagate", "targets", settings.max_targets)

    protected = protected_operations()
    validation_problem = problem_openapi_responses(VALIDATION_ERROR)[422]
    for path, method, operation in _operations(document):
        for parameter in operation.get("parameters", []):
            # A query parameter or header is absent or has a value; it is never null.
            parameter["schema"] = without_null(parameter["schema"])
            if parameter.get("in") == "header" and parameter["name"].lower() == "x-deadline-ms":
                parameter["schema"]["maximum"] = settings.max_deadline_ms
        responses = operation.setdefault("responses", {})
        # FastAPI documents its own validation answer; ours is problem+json, and only where
        # a parameter can fail validation.
        default_422 = responses.get("422", {}).get("content", {}).get("application/json", {})
        if default_422.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
            if any(
                p.get("in") != "path" or p.get("schema", {}).get("type") != "string"
                for p in operation.get("parameters", [])
            ):
                responses["422"] = validation_problem
            else:
                del responses["422"]
        operation.pop("security", None)
        if settings.api_keys and (path, method) in protected:
            operation["security"] = copy.deepcopy(SECURITY)
            responses["401"] = problem_openapi_responses(UNAUTHORIZED, instance=path)[401]
            operation["responses"] = dict(sorted(responses.items()))

    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if settings.api_keys:
        components["securitySchemes"] = copy.deepcopy(SECURITY_SCHEMES)
    else:
        components.pop("securitySchemes", None)


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve the completed document at /openapi.json (and to /docs)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = generate()
        complete_document(document, app, settings)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
