"""The OpenAPI document: valid 3.1, complete (every route the app serves), and
true (real answers of a running proxy validate against the schemas it names)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import orjson
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from starlette.routing import Route

from proxy.app import create_app
from proxy.fakes import FakeAnthropic, FakeOllama, FakeOpenAI
from proxy.openapi import openapi_spec
from tests.conftest import ServedApp, build_config, openai_provider

API_KEY = "sk-test"
ADMIN_KEY = "admin-secret"
METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return openapi_spec()


def schema_validator(spec: dict[str, Any], name: str) -> Draft202012Validator:
    """A validator for `#/components/schemas/<name>`, its references resolved in `spec`."""
    registry: Registry[Any] = Registry().with_resource("urn:spec", Resource.from_contents(spec, DRAFT202012))
    return Draft202012Validator({"$ref": f"urn:spec#/components/schemas/{name}"}, registry=registry)


def assert_valid(spec: dict[str, Any], name: str, instance: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in schema_validator(spec, name).iter_errors(instance)]
    assert errors == [], f"{name}: {errors}"


# -- the document itself -----------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"] == "3.1.0"
    errors = [str(error.message) for error in OpenAPIV31SpecValidator(spec).iter_errors()]
    assert errors == []


def test_every_schema_in_it_is_valid_json_schema(spec: dict[str, Any]) -> None:
    for name, schema in spec["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
        schema_validator(spec, name)  # every reference in it resolves


def test_every_reference_resolves(spec: dict[str, Any]) -> None:
    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(spec):
        assert ref.startswith("#/"), ref
        node: Any = spec
        for part in ref[2:].split("/"):
            node = node[part]


def test_each_call_builds_a_fresh_document() -> None:
    first = openapi_spec()
    first["paths"].clear()
    first["components"]["schemas"]["ErrorBody"]["required"].append("x")
    second = openapi_spec()
    assert second["paths"] and second["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    assert orjson.dumps(second) == orjson.dumps(openapi_spec())


def test_it_documents_exactly_the_routes_the_app_serves(spec: dict[str, Any]) -> None:
    app = create_app(
        build_config({"providers": {"p": openai_provider("http://127.0.0.1:9")}, "routes": {"default": ["p"]}})
    )
    served = set()
    for route in app.routes:
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        served |= {(path, method.lower()) for method in route.methods or () if method != "HEAD"}
    documented = {(path, method) for path, item in spec["paths"].items() for method in item if method in METHODS}
    assert documented == served


def test_operation_ids_are_unique(spec: dict[str, Any]) -> None:
    ids = [op["operationId"] for item in spec["paths"].values() for method, op in item.items() if method in METHODS]
    assert len(ids) == len(set(ids))


# -- what it says -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_chat_completions(spec: dict[str, Any], path: str) -> None:
    op = spec["paths"][path]["post"]
    assert op["security"] == [{"bearerAuth": []}]
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert op["requestBody"]["required"] is True
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    ok = op["responses"]["200"]
    assert set(ok["content"]) == {"application/json", "text/event-stream"}
    assert {
        "x-proxy-route",
        "x-proxy-provider",
        "x-proxy-attempts",
        "x-proxy-fallbacks",
        "x-proxy-trimmed",
        "x-request-id",
    } <= set(ok["headers"])
    assert {name for name, header in ok["headers"].items() if header["required"]} == {
        "x-proxy-route",
        "x-proxy-provider",
        "x-proxy-attempts",
        "x-request-id",
    }
    for status in ("400", "401", "404", "413", "503"):
        answer = op["responses"][status]
        assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        assert answer["headers"]["x-request-id"]["required"] is True
    assert "www-authenticate" in op["responses"]["401"]["headers"]


def test_the_request_schema(spec: dict[str, Any]) -> None:
    request = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert request["required"] == ["model", "messages"]
    assert request.get("additionalProperties", True) is not False  # unknown fields pass through
    properties = request["properties"]
    assert properties["model"]["type"] == "string"
    assert properties["messages"]["minItems"] == 1
    for name in (
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "tools",
        "tool_choice",
        "response_format",
        "user",
        "seed",
    ):
        assert name in properties, name
    message = spec["components"]["schemas"]["Message"]
    assert message["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant", "tool", "function"]
    assert message["required"] == ["role"]
    validate = schema_validator(spec, "ChatCompletionRequest")
    assert validate.is_valid({"model": "default", "messages": [{"role": "user", "content": "hi"}], "top_k": 3})
    assert validate.is_valid(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:,"}},
                    ],
                }
            ],
        }
    )
    assert validate.is_valid(
        {
            "model": "m",
            "messages": [{"role": "assistant", "content": None}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    for bad in (
        {"messages": [{"role": "user"}]},
        {"model": "m", "messages": []},
        {"model": "m"},
        {"model": "m", "messages": [{"role": "robot"}]},
        {"model": "m", "messages": [{"role": "user", "content": 5}]},
        {"model": "m", "messages": [{"role": "user"}], "stream": "yes"},
    ):
        assert not validate.is_valid(bad), bad


def test_the_error_body_is_openais(spec: dict[str, Any]) -> None:
    validate = schema_validator(spec, "ErrorBody")
    assert validate.is_valid({"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}})
    assert validate.is_valid({"error": {"message": "m", "type": "t", "param": "model", "code": "model_not_found"}})
    assert not validate.is_valid({"error": {"message": "m", "type": "t"}})
    assert not validate.is_valid({"message": "m"})


def test_every_error_answer_is_an_openai_error(spec: dict[str, Any]) -> None:
    own_shapes = {("/readyz", "503"), ("/admin/reload", "422")}  # Ready and ReloadOutcome, on purpose
    responses = spec["components"]["responses"]
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for status, answer in op["responses"].items():
                if status.startswith("2") or (path, status) in own_shapes:
                    continue
                if "$ref" in answer:
                    answer = responses[answer["$ref"].rsplit("/", 1)[1]]
                schema = answer["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)


def test_the_admin_endpoints(spec: dict[str, Any]) -> None:
    for path, item in spec["paths"].items():
        for op in item.values():
            if path.startswith("/admin/"):
                assert op["security"] == [{"adminBearerAuth": []}]
                assert {"200", "401", "404"} <= set(op["responses"])
            elif path == "/status":  # the HTML page: the admin key as HTTP Basic password (or bearer)
                assert op["security"] == [{"adminBasicAuth": []}, {"adminBearerAuth": []}]
                assert {"200", "401", "404"} <= set(op["responses"])
                assert op["responses"]["200"]["content"].keys() == {"text/html"}
                assert op["responses"]["401"]["headers"]["www-authenticate"]["required"] is True
            elif path.startswith("/v1/") or path == "/chat/completions":  # every /v1 path needs the client key
                assert op["security"] == [{"bearerAuth": []}], path
                assert "401" in op["responses"], path
            else:
                assert op["security"] == []
    disable = spec["paths"]["/admin/providers/{name}/disable"]["post"]
    assert disable["requestBody"]["required"] is False
    assert spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"].keys() == {"text/plain"}


# -- and it is true: a running proxy's answers validate --------------------------------------


@pytest.fixture
def proxy(serve: Callable[..., ServedApp]) -> Iterator[str]:
    with ExitStack() as stack:
        fake = stack.enter_context(FakeOpenAI("cloud"))
        served = serve(
            {
                "auth": {"keys": [API_KEY]},
                "server": {"admin_key": ADMIN_KEY},
                "providers": {"cloud": openai_provider(fake.url)},
                "routes": {"default": ["cloud"]},
            }
        )
        yield served.url


def test_the_served_document_is_this_one(proxy: str, http: httpx.Client) -> None:
    answer = http.get(proxy + "/openapi.json")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.json() == orjson.loads(orjson.dumps(openapi_spec()))


def test_real_answers_match_their_schemas(proxy: str, http: httpx.Client, spec: dict[str, Any]) -> None:
    key = {"authorization": f"Bearer {API_KEY}"}
    request = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}

    answer = http.post(proxy + "/v1/chat/completions", json=request, headers=key)
    assert answer.status_code == 200
    assert_valid(spec, "ChatCompletion", answer.json())
    required = [
        n
        for n, h in spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["headers"].items()
        if h["required"]
    ]
    assert all(name in answer.headers for name in required)
    assert int(answer.headers["x-proxy-attempts"]) >= 1

    streamed = http.post(
        proxy + "/v1/chat/completions",
        headers=key,
        json={**request, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    for event in events[:-1]:
        assert_valid(spec, "ChatCompletionChunk", orjson.loads(event))

    assert_valid(spec, "ModelList", http.get(proxy + "/v1/models", headers=key).json())
    assert_valid(spec, "Model", http.get(proxy + "/v1/models/default", headers=key).json())
    responded = http.post(proxy + "/v1/responses", json={"model": "default", "input": "hi"}, headers=key)
    assert_valid(spec, "Response", responded.json())
    events = http.post(proxy + "/v1/responses", json={"model": "default", "input": "hi", "stream": True}, headers=key)
    for line in events.text.splitlines():
        if line.startswith("data: "):
            assert_valid(spec, "ResponseStreamEvent", orjson.loads(line[6:]))
    embedded = http.post(proxy + "/v1/embeddings", json={"model": "default", "input": ["a", "b"]}, headers=key)
    assert_valid(spec, "EmbeddingList", embedded.json())
    assert_valid(spec, "Health", http.get(proxy + "/healthz").json())
    assert_valid(spec, "Ready", http.get(proxy + "/readyz").json())
    assert http.get(proxy + "/metrics").headers["content-type"].startswith("text/plain")

    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert_valid(spec, "AdminStatus", http.get(proxy + "/admin/status", headers=admin).json())
    assert_valid(spec, "AdminProviders", http.get(proxy + "/admin/providers", headers=admin).json())
    basic = httpx.BasicAuth("ops", ADMIN_KEY)
    assert http.get(proxy + "/status", auth=basic).headers["content-type"].startswith("text/html")
    refused = http.get(proxy + "/status")
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic ")
    assert_valid(spec, "ErrorBody", refused.json())
    switched = http.post(proxy + "/admin/providers/cloud/disable", json={"reason": "drill"}, headers=admin)
    assert_valid(spec, "ProviderSwitch", switched.json())
    assert_valid(spec, "ProviderSwitch", http.post(proxy + "/admin/providers/cloud/enable", headers=admin).json())
    reload = http.post(proxy + "/admin/reload", headers=admin)  # an in-memory config cannot be reloaded
    assert reload.status_code == 422
    assert_valid(spec, "ReloadOutcome", reload.json())


@pytest.mark.litellm
def test_translated_answers_match_too(
    serve: Callable[..., ServedApp], http: httpx.Client, spec: dict[str, Any]
) -> None:
    with FakeAnthropic("claude") as claude, FakeOllama("ollama") as ollama:
        served = serve(
            {
                "providers": {
                    "claude": {
                        "model": "anthropic/claude-sonnet-4-5-20250929",
                        "api_key": "sk-ant-test",
                        "api_base": claude.url,
                    },
                    "local": {"model": "ollama_chat/qwen2.5:7b", "api_base": ollama.url, "local": True},
                },
                "routes": {"default": ["claude", "local"]},
            }
        )
        for model in ("claude", "local"):
            request = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            answer = http.post(served.url + "/v1/chat/completions", json=request)
            assert answer.status_code == 200
            assert_valid(spec, "ChatCompletion", answer.json())
            streamed = http.post(
                served.url + "/v1/chat/completions",
                json={**request, "stream": True, "stream_options": {"include_usage": True}},
            )
            events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            for event in events[:-1]:
                assert_valid(spec, "ChatCompletionChunk", orjson.loads(event))


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        ("POST", "/v1/chat/completions", b"{", {"authorization": f"Bearer {API_KEY}"}, 400),
        ("POST", "/v1/chat/completions", b"{}", {}, 401),
        (
            "POST",
            "/v1/chat/completions",
            b'{"model":"nope","messages":[{"role":"user","content":"x"}]}',
            {"authorization": f"Bearer {API_KEY}"},
            404,
        ),
        ("GET", "/v1/models/nope", b"", {"authorization": f"Bearer {API_KEY}"}, 404),
        ("GET", "/v1/models", b"", {}, 401),
        (
            "POST",
            "/v1/responses",
            b'{"model":"default","input":"x","store":true}',
            {"authorization": f"Bearer {API_KEY}"},
            400,
        ),
        ("POST", "/v1/embeddings", b'{"model":"default","input":[]}', {"authorization": f"Bearer {API_KEY}"}, 400),
        ("GET", "/admin/status", b"", {"authorization": "Bearer wrong"}, 401),
        ("POST", "/admin/providers/nope/enable", b"", {"authorization": f"Bearer {ADMIN_KEY}"}, 404),
    ],
)
def test_real_errors_match_the_error_schema(
    proxy: str,
    http: httpx.Client,
    spec: dict[str, Any],
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
) -> None:
    answer = http.request(method, proxy + path, content=body, headers=headers)
    assert answer.status_code == status
    assert (
        str(status)
        in next(op for m, op in spec["paths"][_template(spec, path)].items() if m == method.lower())["responses"]
    )
    assert_valid(spec, "ErrorBody", answer.json())


def _template(spec: dict[str, Any], path: str) -> str:
    templates: list[str] = list(spec["paths"])
    for template in templates:
        if re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", template), path):
            return template
    raise AssertionError(f"no documented path matches {path}")


def test_admin_is_404_when_off(serve: Callable[..., ServedApp], http: httpx.Client, spec: dict[str, Any]) -> None:
    with FakeOpenAI("cloud") as fake:
        served = serve({"providers": {"cloud": openai_provider(fake.url)}, "routes": {"default": ["cloud"]}})
        answer = http.get(served.url + "/admin/status", headers={"authorization": "Bearer anything"})
    assert answer.status_code == 404
    assert_valid(spec, "ErrorBody", answer.json())
