"""The official OpenAI Python SDK against a running gateway.

Needs TOLLGATE_GATEWAY_URL, TOLLGATE_CONTROL_API_URL and TOLLGATE_ADMIN_KEY (scripts/test's
`sdk` stage starts the stack and sets them). The test makes its own model, user, subscription
and key through the control API.
"""

import json
import os
import time
import urllib.request
import uuid

import openai
import pytest

GATEWAY = os.environ["TOLLGATE_GATEWAY_URL"]
API = os.environ["TOLLGATE_CONTROL_API_URL"] + "/api/v1"
ADMIN = {"Authorization": "Bearer " + os.environ["TOLLGATE_ADMIN_KEY"]}


def admin_post(path, body):
    req = urllib.request.Request(
        API + path, data=json.dumps(body).encode(), headers={**ADMIN, "content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status in (200, 201)
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def setup():
    suffix = uuid.uuid4().hex[:8]
    chat, embed, other = f"sdk-chat-{suffix}", f"sdk-embed-{suffix}", f"sdk-other-{suffix}"
    for model in (chat, embed, other):
        admin_post("/models", {"id": model, "input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002})
    user = admin_post("/users", {"email": f"sdk-{suffix}@example.com", "name": "SDK"})
    for model in (chat, embed):
        admin_post("/subscriptions", {"user_id": user["id"], "model_id": model})
    key = admin_post("/keys", {"user_id": user["id"], "name": "sdk", "models": [chat, embed]})["key"]
    client = openai.OpenAI(base_url=GATEWAY + "/v1", api_key=key, max_retries=0)
    # The gateway learns about new models through invalidation: wait until it lists them.
    deadline = time.time() + 10
    while {m.id for m in client.models.list()} != {chat, embed}:
        assert time.time() < deadline, "gateway never listed the new models"
        time.sleep(0.05)
    return {"client": client, "chat": chat, "embed": embed, "other": other, "key": key}


def test_chat(setup):
    reply = setup["client"].chat.completions.create(
        model=setup["chat"], messages=[{"role": "user", "content": "one two three"}]
    )
    assert reply.choices[0].message.content == "tok tok tok tok "
    assert reply.usage.prompt_tokens == 3
    assert reply.usage.completion_tokens == 4


def test_stream_without_usage(setup):
    chunks = list(
        setup["client"].chat.completions.create(
            model=setup["chat"], messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok tok tok tok "
    assert all(c.usage is None for c in chunks), "usage chunk reached a client that did not ask"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_with_usage(setup):
    chunks = list(
        setup["client"].chat.completions.create(
            model=setup["chat"],
            messages=[{"role": "user", "content": "a b"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.prompt_tokens == 2
    assert last.usage.completion_tokens == 4


def test_embeddings(setup):
    result = setup["client"].embeddings.create(model=setup["embed"], input=["a b", "c"])
    assert len(result.data) == 2
    assert result.usage.prompt_tokens == 3


def test_models_list(setup):
    assert {m.id for m in setup["client"].models.list()} == {setup["chat"], setup["embed"]}


def test_wrong_key_is_authentication_error(setup):
    client = openai.OpenAI(base_url=GATEWAY + "/v1", api_key="sk-tg-" + "x" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(model=setup["chat"], messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "invalid_api_key"


def test_unsubscribed_model_is_permission_denied(setup):
    with pytest.raises(openai.PermissionDeniedError) as err:
        setup["client"].chat.completions.create(model=setup["other"], messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_allowed"


def test_unknown_model_is_not_found(setup):
    with pytest.raises(openai.NotFoundError) as err:
        setup["client"].chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    assert "no-such-model" in err.value.message


def test_bad_request(setup):
    with pytest.raises(openai.BadRequestError) as err:
        setup["client"].chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "invalid_request"
