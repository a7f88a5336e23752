"""`labscale serve` log-probabilities: `echo` + `logprobs` on /v1/completions (prompt log-probabilities, as vLLM
serves them), token-id and batched prompts, chat `logprobs` / `top_logprobs`; and the `openai:` backend's
`loglikelihood: completions` mode against it, scoring exactly like the local backend on the same model.
(lm-evaluation-harness as the client, on the real embedded model: test_lm_eval_serve.py.)"""

from __future__ import annotations

import math

import httpx2 as httpx
import openai
import pytest
from test_serve import make_lora, running

from labscale.config import ModelSpec
from labscale.models.base import LoglikelihoodRequest
from labscale.models.registry import resolve_model
from labscale.serve.app import create_app
from labscale.serve.batcher import Batcher
from labscale.serve.server import load_backend

PAIRS = [  # (context, continuation), as multiple-choice tasks send them
    ("The patient reports chest pain. Question: what hurts? Answer:", " the chest"),
    ("The patient reports chest pain. Question: what hurts? Answer:", " the head"),
    ("Doctor: How are you feeling today? Patient:", " I have a headache"),
    ("Is the sky blue? Answer: ", "Yes"),  # trailing space: it moves to the continuation (lm-eval's rule)
]


@pytest.fixture(scope="module")
def local(tiny_llm):
    return load_backend(f"hf:{tiny_llm}", {}, batch_size=4)


@pytest.fixture(scope="module")
def url(tiny_llm):
    backend = load_backend(f"hf:{tiny_llm}", {}, batch_size=4)
    with running(create_app(backend, Batcher(backend, batch_size=4, wait_ms=5), "tiny")) as base:
        yield base


def _post(url: str, path: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json={"model": "tiny", **body}, timeout=60)


def _continuation_logprob(lp: dict, start: int, end: int | None = None) -> float:
    return sum(v for o, v in zip(lp["text_offset"], lp["token_logprobs"]) if o >= start and (end is None or o < end))


def test_echo_logprobs_equal_the_local_loglikelihoods(url, local):
    expected = local.loglikelihood([LoglikelihoodRequest(c, x) for c, x in PAIRS])
    for (context, continuation), want in zip(PAIRS, expected):
        ctx = context.rstrip()
        text = ctx + context[len(ctx):] + continuation
        r = _post(url, "completions", prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"] == text and choice["finish_reason"] == "length"
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == local.count_tokens(text)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # the first token has no context
        assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
        got = _continuation_logprob(lp, len(ctx))
        assert got == pytest.approx(want.logprob, abs=1e-4)
        assert r.json()["usage"] == {"prompt_tokens": len(lp["tokens"]), "completion_tokens": 0,
                                     "total_tokens": len(lp["tokens"])}


def test_token_id_and_batched_prompts(url, local):
    """lm-eval sends token ids, several prompts per request; each gets its own choice, by index."""
    texts = [c + x for c, x in PAIRS[:3]]
    ids = [local.encode(t) for t in texts]
    r = _post(url, "completions", prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    for text, seq, choice in zip(texts, ids, choices):
        single = _post(url, "completions", prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0).json()
        a, b = choice["logprobs"], single["choices"][0]["logprobs"]
        assert a["tokens"] == b["tokens"] and len(a["tokens"]) == len(seq)
        assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(a["token_logprobs"][1:], b["token_logprobs"][1:]))
        assert all(1 <= len(t) <= 2 for t in a["top_logprobs"][1:])  # (two tokens may decode alike)
    one = _post(url, "completions", prompt=ids[0], max_tokens=2, temperature=0)  # a flat list is one prompt
    assert one.status_code == 200 and len(one.json()["choices"]) == 1
    gen = _post(url, "completions", prompt=texts[0], max_tokens=2, temperature=0)
    assert one.json()["choices"][0]["text"] == gen.json()["choices"][0]["text"]


def test_echo_with_one_greedy_token_is_lm_evals_request(url, local):
    """lm-eval asks max_tokens 1, temperature 0, logprobs 1, echo: the prompt's tokens, then the greedy one."""
    text = PAIRS[2][0]
    r = _post(url, "completions", prompt=[local.encode(text)], max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.json()["choices"][0]["logprobs"]
    n = local.count_tokens(text)
    assert len(lp["token_logprobs"]) == n + 1
    plain = _post(url, "completions", prompt=text, max_tokens=1, temperature=0).json()["choices"][0]["text"]
    assert r.json()["choices"][0]["text"] == text + plain
    top = lp["top_logprobs"][n]
    assert lp["token_logprobs"][n] == pytest.approx(max(top.values()))  # greedy: the top-1 alternative


def test_completion_and_chat_logprobs(url, local):
    r = _post(url, "completions", prompt="The sky is", max_tokens=5, logprobs=3, temperature=0)
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and lp["text_offset"][0] == 0
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(1 <= len(t) <= 3 for t in lp["top_logprobs"])
    echoed = _post(url, "completions", prompt="The sky is", max_tokens=5, logprobs=3, echo=True,
                   temperature=0).json()["choices"][0]
    assert echoed["text"] == "The sky is" + choice["text"]
    assert echoed["logprobs"]["token_logprobs"][-len(lp["tokens"]):] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-5 for c in content)  # greedy: top-1 is the token


BAD = [
    ({"prompt": [1, 10**6]}, "prompt"),  # outside the vocabulary
    ({"prompt": [[1, 2], [-1]]}, "prompt.1"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": ["a"] * 65}, "prompt"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ({"prompt": "x", "echo": True, "logprobs": 1, "stream": True}, "logprobs"),
    ({"prompt": ["a", "b"], "stream": True}, "prompt"),
    ({"prompt": "hello " * 600, "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt"),  # beyond the context
]


@pytest.mark.parametrize("fields,param", BAD, ids=[p + str(i) for i, (_, p) in enumerate(BAD)])
def test_bad_log_probability_requests_are_400s_naming_the_field(url, fields, param):
    r = _post(url, "completions", **{"max_tokens": 1, **fields})
    assert r.status_code == 400, (fields, r.text)
    assert r.json()["error"]["param"] == param, r.json()


def test_chat_top_logprobs_need_logprobs(url):
    r = _post(url, "chat/completions", messages=[{"role": "user", "content": "hi"}], max_tokens=1, top_logprobs=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_a_server_with_per_request_adapters_refuses_logprobs(tiny_llm, tmp_path):
    backend = load_backend(f"hf:{tiny_llm}", {"alpha": make_lora(tiny_llm, tmp_path / "a", 1)}, batch_size=2)
    with running(create_app(backend, Batcher(backend, batch_size=2), "tiny", ["alpha"])) as base:
        r = _post(base, "completions", prompt="x", max_tokens=0, echo=True, logprobs=1)
        assert r.status_code == 400 and "adapter:<folder>" in r.json()["error"]["message"]
        assert _post(base, "completions", prompt="x", max_tokens=1).status_code == 200


def test_openai_backend_in_completions_mode_scores_like_the_local_backend(url, local, tiny_llm):
    spec = ModelSpec(id="openai:tiny", base_url=url + "/v1", api_key_env=None, loglikelihood="completions")
    remote = resolve_model(spec)
    assert remote.info.supports_loglikelihood and remote.info.notice is None
    requests = [LoglikelihoodRequest(c, x) for c, x in PAIRS]
    got = remote.loglikelihood(requests)
    want = local.loglikelihood(requests)
    for g, w in zip(got, want):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
        assert (g.n_tokens, g.is_greedy) == (w.n_tokens, w.is_greedy)


def test_an_adapter_model_serves_logprobs_with_its_adapter_on(tiny_llm, tmp_path, local):
    folder = make_lora(tiny_llm, tmp_path / "lora", 3)
    backend = load_backend(f"adapter:{folder}", {}, batch_size=2)
    context, continuation = PAIRS[0]
    want = backend.loglikelihood([LoglikelihoodRequest(context, continuation)])[0].logprob
    base = local.loglikelihood([LoglikelihoodRequest(context, continuation)])[0].logprob
    assert abs(want - base) > 1e-3  # the adapter changes the scores
    with running(create_app(backend, Batcher(backend, batch_size=2), "tuned")) as base_url:
        r = httpx.post(f"{base_url}/v1/completions", timeout=60, json={
            "model": "tuned", "prompt": context + continuation, "max_tokens": 0, "echo": True, "logprobs": 1})
        assert r.status_code == 200, r.text
        got = _continuation_logprob(r.json()["choices"][0]["logprobs"], len(context))
    assert got == pytest.approx(want, abs=1e-4)
