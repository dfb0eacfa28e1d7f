"""Drives citadel-gateway with the official `openai` Python client.

Run by tests/openai_client.rs with env GATEWAY_URL, API_KEY, BURST_KEY,
MODEL, ALIAS, LOADING_MODEL. Prints `OK <check>` per check; exits non-zero on
the first failure.
"""
import os
import sys

import openai
from openai import OpenAI

url = os.environ["GATEWAY_URL"] + "/v1"
key = os.environ["API_KEY"]
model = os.environ["MODEL"]
alias = os.environ["ALIAS"]
loading = os.environ["LOADING_MODEL"]

client = OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def ok(what):
    print("OK", what, flush=True)


def expect_status(exc_type, status, fn):
    try:
        fn()
    except exc_type as e:
        assert e.status_code == status, (e.status_code, e)
        body = e.body if isinstance(e.body, dict) else {}
        # The client unwraps {"error": {...}} into body.
        assert "message" in body and "code" in body, e.body
        return e
    raise AssertionError(f"expected {exc_type.__name__} ({status})")


print("openai", openai.__version__, flush=True)

ids = [m.id for m in client.models.list().data]
assert model in ids and alias in ids, ids
assert loading not in ids, ids
ok("models.list")

r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=5
)
assert r.choices[0].message.content, r
assert r.usage is None or r.usage.total_tokens > 0
ok("chat")

r = client.chat.completions.create(
    model=alias, messages=[{"role": "user", "content": "hello"}], max_tokens=3
)
assert r.model == model, r.model
ok("chat via alias")

parts = []
n = 0
with client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=6, stream=True
) as stream:
    for chunk in stream:
        n += 1
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
assert n >= 6 and "".join(parts), (n, parts)
ok(f"chat stream ({n} chunks)")

r = client.completions.create(model=model, prompt="once upon", max_tokens=4)
assert r.choices[0].text, r
ok("completions")

parts = []
for chunk in client.completions.create(model=model, prompt="x", max_tokens=4, stream=True):
    parts.append(chunk.choices[0].text if chunk.choices else "")
assert "".join(parts), parts
ok("completions stream")

r = client.embeddings.create(model=model, input=["a", "b"])
assert len(r.data) == 2 and len(r.data[0].embedding) > 0, r
ok("embeddings")

expect_status(
    openai.NotFoundError,
    404,
    lambda: client.chat.completions.create(
        model="no-such-model", messages=[{"role": "user", "content": "x"}]
    ),
)
ok("unknown model -> NotFoundError 404")

e = expect_status(
    openai.InternalServerError,
    503,
    lambda: client.chat.completions.create(
        model=loading, messages=[{"role": "user", "content": "x"}]
    ),
)
assert e.response.headers.get("retry-after"), e.response.headers
ok("loading model -> 503 with Retry-After")

bad = OpenAI(base_url=url, api_key="sk-wrong", max_retries=0)
expect_status(openai.AuthenticationError, 401, lambda: bad.models.list())
ok("bad key -> AuthenticationError 401")

expect_status(
    openai.APIStatusError,
    413,
    lambda: client.completions.create(model=model, prompt="x" * 200_000, max_tokens=1),
)
ok("large body -> 413")

burst = OpenAI(base_url=url, api_key=os.environ["BURST_KEY"], max_retries=0)
err = None
for _ in range(100):
    try:
        burst.models.list()
    except openai.RateLimitError as e:
        err = e
        break
assert err is not None and err.status_code == 429, "no 429"
assert err.response.headers.get("retry-after"), err.response.headers
ok("rate limit -> RateLimitError 429 with Retry-After")

print("ALL OK", flush=True)
