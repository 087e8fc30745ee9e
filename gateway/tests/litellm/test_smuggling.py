"""A key holder cannot make a real LiteLLM proxy serve a model the key is not entitled to.

The chain is client -> gateway -> LiteLLM -> mock upstream. LiteLLM serves two models, `cheap`
and `expensive`, both forwarded to the mock, and the gateway calls it with LiteLLM's master key,
so LiteLLM honours every admin-only request field (fallbacks, api_base, tags, ...): the worst
case. The key here may use `cheap` only. Every attempt clears the mock's record first and then
checks the gateway's answer and which models the mock was asked for; at the end the mock must
have seen `cheap` and nothing else. Two controls first call LiteLLM directly with its master key
and show that it does serve `expensive` for the same tricks (`?model=`, `fallbacks`).

Needs TOLLGATE_GATEWAY_URL, TOLLGATE_CONTROL_API_URL, TOLLGATE_ADMIN_KEY, TOLLGATE_MOCK_URL,
TOLLGATE_LITELLM_URL and TOLLGATE_LITELLM_MASTER_KEY (scripts/test's `litellm` stage starts the
chain and sets them). The models `cheap` and `expensive` are made here through the control API,
so the database must not hold them yet (the stage uses a fresh one).
"""

import json
import os
import time

import openai
import pytest
import requests

GATEWAY = os.environ["TOLLGATE_GATEWAY_URL"]
API = os.environ["TOLLGATE_CONTROL_API_URL"] + "/api/v1"
ADMIN = {"Authorization": "Bearer " + os.environ["TOLLGATE_ADMIN_KEY"]}
MOCK = os.environ["TOLLGATE_MOCK_URL"]
LITELLM = os.environ["TOLLGATE_LITELLM_URL"]
MASTER = os.environ["TOLLGATE_LITELLM_MASTER_KEY"]

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "one two three"}]
TIMEOUT = 30

# Every model the mock was asked for while a request went through the gateway (the controls,
# which call LiteLLM directly, are not counted).
SEEN_THROUGH_GATEWAY = []


def mock_clear():
    requests.delete(MOCK + "/mock/requests", timeout=TIMEOUT).raise_for_status()


def mock_requests():
    """What the mock received since the last clear: [(path, model)], `model` as the body names it."""
    resp = requests.get(MOCK + "/mock/requests", timeout=TIMEOUT)
    resp.raise_for_status()
    seen = []
    for rec in resp.json():
        try:
            model = json.loads(rec["body"])["model"]
        except (TypeError, ValueError, KeyError):
            model = f"<no model: {rec['method']} {rec['path']} body {rec['body']!r:.80}>"
        seen.append((rec["path"], model))
    return seen


def through_gateway(send):
    """Clears the mock's record, calls send() and returns (its result, the models and the paths
    the mock was asked for)."""
    mock_clear()
    result = send()
    seen = mock_requests()
    SEEN_THROUGH_GATEWAY.extend(model for _, model in seen)
    return result, [model for _, model in seen], [path for path, _ in seen]


def admin_post(path, body):
    resp = requests.post(API + path, json=body, headers=ADMIN, timeout=TIMEOUT)
    assert resp.status_code in (200, 201), f"POST {path}: {resp.status_code} {resp.text}"
    return resp.json()


def assert_only_cheap(models):
    assert models, "the mock saw no request: the call did not reach LiteLLM's provider"
    assert set(models) == {"cheap"}, f"the mock was asked for {models}"


def assert_gateway_refused(resp, models, status=400, code="invalid_request"):
    assert resp.status_code == status, f"gateway answered {resp.status_code}: {resp.text}"
    # The gateway's own error (LiteLLM's carry a numeric string code, e.g. "400").
    assert resp.json()["error"]["code"] == code, resp.text
    assert models == [], f"the request reached the mock, which was asked for {models}"


@pytest.fixture(scope="module")
def key():
    admin_post("/models", {"id": "cheap", "input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002})
    admin_post("/models", {"id": "expensive", "input_cost_per_token": 0.0001, "output_cost_per_token": 0.0002})
    user = admin_post("/users", {"email": "smuggler@example.com", "name": "Smuggler"})
    admin_post("/subscriptions", {"user_id": user["id"], "model_id": "cheap"})
    secret = admin_post("/keys", {"user_id": user["id"], "name": "cheap-only", "models": ["cheap"]})["key"]
    # The gateway learns about new models through invalidation: wait until it lists the key's.
    deadline = time.time() + 10
    while True:
        resp = requests.get(GATEWAY + "/v1/models", headers=bearer(secret), timeout=TIMEOUT)
        if resp.status_code == 200 and {m["id"] for m in resp.json()["data"]} == {"cheap"}:
            return secret
        assert time.time() < deadline, f"gateway never listed exactly the model cheap: {resp.status_code} {resp.text}"
        time.sleep(0.05)


def bearer(secret):
    return {"Authorization": "Bearer " + secret}


def gateway_post(secret, body, path=CHAT, headers=None, raw=None):
    hdrs = {**bearer(secret), "content-type": "application/json", **(headers or {})}
    data = raw if raw is not None else json.dumps(body)
    return requests.post(GATEWAY + path, data=data, headers=hdrs, timeout=TIMEOUT)


def cheap(**extra):
    return {"model": "cheap", "messages": MESSAGES, "max_tokens": 8, **extra}


# ---------------------------------------------------------------- controls
# LiteLLM called directly with its master key: these show that the attacks below are real
# against this LiteLLM (were they not, a passing test would prove nothing).


def litellm_direct(body, query=""):
    mock_clear()
    resp = requests.post(
        LITELLM + CHAT + query, json=body, headers={"Authorization": "Bearer " + MASTER}, timeout=TIMEOUT
    )
    return resp, [model for _, model in mock_requests()]


def test_control_litellm_serves_the_query_strings_model():
    resp, models = litellm_direct(cheap(), query="?model=expensive")
    assert resp.status_code == 200, resp.text
    assert models == ["expensive"], f"LiteLLM {resp.status_code}, mock saw {models}"


def test_control_litellm_honours_fallbacks():
    resp, models = litellm_direct(cheap(fallbacks=["expensive"], mock_testing_fallbacks=True))
    assert resp.status_code == 200, resp.text
    assert models == ["expensive"], f"LiteLLM {resp.status_code}, mock saw {models}"


# ---------------------------------------------------------------- through the gateway


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_query_string_model_is_dropped(key, stream):
    resp, models, paths = through_gateway(
        lambda: gateway_post(key, cheap(stream=stream), path=CHAT + "?model=expensive")
    )
    assert resp.status_code == 200, resp.text
    assert_only_cheap(models)
    assert all("?" not in p for p in paths), f"the query string reached the provider: {paths}"


def test_fallbacks_are_refused(key):
    resp, models, _ = through_gateway(
        lambda: gateway_post(key, cheap(fallbacks=["expensive"], mock_testing_fallbacks=True))
    )
    assert_gateway_refused(resp, models)


@pytest.mark.parametrize(
    "field,value",
    [
        pytest.param("context_window_fallbacks", [{"cheap": ["expensive"]}], id="context_window_fallbacks"),
        pytest.param("content_policy_fallbacks", [{"cheap": ["expensive"]}], id="content_policy_fallbacks"),
        pytest.param("api_base", "http://127.0.0.1:1", id="api_base"),
        pytest.param("metadata", {"tags": ["x"]}, id="metadata.tags"),
        pytest.param("metadata", {"model_group": "expensive"}, id="metadata.model_group"),
        pytest.param("litellm_metadata", {"tags": ["x"], "model_group": "expensive"}, id="litellm_metadata"),
        pytest.param(
            "user_config",
            {"model_list": [{"model_name": "cheap", "litellm_params": {"model": "openai/expensive"}}]},
            id="user_config",
        ),
        pytest.param(
            "model_list", [{"model_name": "cheap", "litellm_params": {"model": "openai/expensive"}}], id="model_list"
        ),
        pytest.param("specific_deployment", True, id="specific_deployment"),
        pytest.param("tags", ["x"], id="tags"),
    ],
)
def test_litellm_fields_are_refused(key, field, value):
    resp, models, _ = through_gateway(lambda: gateway_post(key, cheap(**{field: value})))
    assert_gateway_refused(resp, models)


@pytest.mark.parametrize(
    "raw",
    [
        # Python's json (LiteLLM) keeps the last of repeated keys.
        '{"model": "cheap", "messages": [{"role": "user", "content": "hi"}], "model": "expensive"}',
        '{"model": "cheap", "messages": [{"role": "user", "content": "hi"}], "mod\\u0065l": "expensive"}',
        '{"model": "cheap", "messages": [{"role": "user", "content": "hi"}], "fall\\u0062acks": ["expensive"],'
        ' "mock_testing_fallbacks": true}',
    ],
    ids=["repeated-model", "escaped-repeated-model", "escaped-fallbacks"],
)
def test_json_tricks_are_refused(key, raw):
    resp, models, _ = through_gateway(lambda: gateway_post(key, None, raw=raw))
    assert_gateway_refused(resp, models)


@pytest.mark.parametrize(
    "path", ["/openai/deployments/expensive/chat/completions", "/engines/expensive/chat/completions"]
)
def test_litellm_model_in_path_routes_are_not_proxied(key, path):
    resp, models, _ = through_gateway(lambda: gateway_post(key, cheap(), path=path))
    assert 400 <= resp.status_code < 500, f"gateway answered {resp.status_code}: {resp.text}"
    assert models == [], f"the request reached the mock, which was asked for {models}"


def test_litellm_headers_are_not_forwarded_either_way(key):
    resp, models, _ = through_gateway(
        lambda: gateway_post(key, cheap(), headers={"x-litellm-api-key": "sk-anything", "x-litellm-tags": "x"})
    )
    # Had LiteLLM seen x-litellm-api-key, it would have checked that key instead and answered 401.
    assert resp.status_code == 200, resp.text
    assert_only_cheap(models)
    leaked = [h for h in resp.headers if h.lower().startswith(("x-litellm-", "llm_provider-"))]
    assert leaked == [], f"LiteLLM's response headers reached the client: {leaked}"


def test_unentitled_model_is_forbidden(key):
    resp, models, _ = through_gateway(lambda: gateway_post(key, {"model": "expensive", "messages": MESSAGES}))
    assert_gateway_refused(resp, models, status=403, code="model_not_allowed")


def test_openai_sdk_extra_query_model_is_dropped(key):
    client = openai.OpenAI(base_url=GATEWAY + "/v1", api_key=key, max_retries=0)
    reply, models, _ = through_gateway(
        lambda: client.chat.completions.create(
            model="cheap", messages=MESSAGES, max_tokens=8, extra_query={"model": "expensive"}
        )
    )
    assert reply.choices[0].message.content
    assert_only_cheap(models)


def test_openai_sdk_extra_body_fallbacks_are_refused(key):
    client = openai.OpenAI(base_url=GATEWAY + "/v1", api_key=key, max_retries=0)

    def send():
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="cheap",
                messages=MESSAGES,
                max_tokens=8,
                extra_body={"fallbacks": ["expensive"], "mock_testing_fallbacks": True},
            )
        return err.value

    err, models, _ = through_gateway(send)
    assert err.code == "invalid_request"
    assert models == [], f"the request reached the mock, which was asked for {models}"


def test_the_mock_only_ever_saw_cheap_through_the_gateway():
    # Runs last (pytest keeps file order): what every attempt above let through.
    assert SEEN_THROUGH_GATEWAY, "no request reached the mock through the gateway"
    assert set(SEEN_THROUGH_GATEWAY) == {"cheap"}, f"the mock was asked for {SEEN_THROUGH_GATEWAY}"
