#!/usr/bin/env python3
"""End-to-end check of `realm serve` with the official `openai` Python client.

    openai_client.py BASE_URL ADMIN_TOKEN MODEL

Creates its own tenant through the admin API, then drives the tenant API the way applications
do: models, chat completions (plain, streamed with usage, n, seed), completions (plain and
streamed), JSON mode, and the client's typed errors. Exits non-zero on the first failed check.
"""

import json
import sys

import openai
from openai import OpenAI
from realm_admin import admin


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    base, admin_token, model = sys.argv[1:4]
    tenant = admin(base, admin_token, "POST", "/admin/tenants", {"name": "openai-client"})
    client = OpenAI(base_url=base + "/v1", api_key=tenant["api_key"], max_retries=0)

    ids = [m.id for m in client.models.list()]
    check(model in ids, f"{model} not in {ids}")
    check(client.models.retrieve(model).id == model, "models.retrieve")

    messages = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    check(r.object == "chat.completion", r)
    choice = r.choices[0]
    check(choice.message.role == "assistant", r)
    check(isinstance(choice.message.content, str), r)
    check(choice.finish_reason in ("length", "stop"), r)
    check(r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 6, r.usage)
    check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage)

    # Streaming gives the same greedy text, chunk by chunk, then a usage-only chunk.
    text, usage, finish = "", None, None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        check(chunk.object == "chat.completion.chunk", chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    check(text == choice.message.content, f"stream {text!r} != plain {choice.message.content!r}")
    check(finish == choice.finish_reason, finish)
    check(usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage)

    # n choices, each with its own seed (seed + i).
    a = client.chat.completions.create(model=model, messages=messages, max_tokens=5,
                                       temperature=1.0, seed=11, n=2)
    check([c.index for c in a.choices] == [0, 1], a)
    check(a.choices[0].message.content != a.choices[1].message.content, a)
    # A seed reproduces a request that runs alone (batched sequences may differ in the last
    # bits of their logits: best-effort, as OpenAI's seed is).
    kw = dict(model=model, messages=messages, max_tokens=5, temperature=1.0, seed=11)
    x = client.chat.completions.create(**kw)
    y = client.chat.completions.create(**kw)
    check(x.choices[0].message.content == y.choices[0].message.content, "same seed, different text")

    # Completions: raw text continued, plain and streamed alike.
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                                  temperature=0)
    check(c.object == "text_completion", c)
    check(isinstance(c.choices[0].text, str) and c.usage.completion_tokens > 0, c)
    streamed = "".join(
        ch.choices[0].text
        for ch in client.completions.create(model=model, prompt="The capital of France is",
                                            max_tokens=5, temperature=0, stream=True)
        if ch.choices
    )
    check(streamed == c.choices[0].text, f"{streamed!r} != {c.choices[0].text!r}")

    # JSON mode runs the constrained decoder: whatever comes out is a JSON prefix, and a
    # finished one parses.
    j = client.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                       temperature=0, response_format={"type": "json_object"})
    out = j.choices[0].message.content
    check(out.lstrip().startswith("{"), f"JSON mode produced {out!r}")
    if j.choices[0].finish_reason == "stop":
        json.loads(out)

    # The client's typed errors map from our status codes.
    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        check(e.body.get("code") == "model_not_found", e.body)
    try:
        client.chat.completions.create(model=model, messages=messages, temperature=5)
        raise AssertionError("temperature 5 accepted")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "temperature", e.body)
    bad = OpenAI(base_url=base + "/v1", api_key="rk-wrong", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError:
        pass

    print(f"openai client {openai.__version__}: all checks passed", file=sys.stderr)


if __name__ == "__main__":
    main()
