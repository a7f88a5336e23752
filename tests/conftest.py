"""Shared fixtures. Tests never touch the network: HF_HUB_OFFLINE is set before anything imports transformers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


def pytest_collection_modifyitems(items):
    """A test that loads a real embedded model takes seconds at least: `real_model` implies `slow`, so the fast set
    (-m "not slow") never loads one."""
    for item in items:
        if item.get_closest_marker("real_model") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The patient reports chest pain and shortness of breath since yesterday.",
    "Doctor: How are you feeling today? Patient: I have a headache and a mild fever.",
    "Summarize the following dialogue as a clinical note. The capital of France is Paris.",
    "Answer with yes or no. Is the sky blue? Yes. Is grass red? No.",
    "0123456789 .,:;!?'\"()[]{}<>-_/\\ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def make_tiny_llm(folder, chat_template: str | None = CHATML, add_bos: bool = False, seed: int = 0) -> str:
    """Save a tiny random Llama (hidden 64, 2 layers) with a small byte-level BPE tokenizer into `folder`.

    Special tokens: <unk>=0, <s>=1 (BOS), <|im_end|>=2 (EOS and pad), <|im_start|>=3. `add_bos` makes the
    tokenizer prepend <s> like Llama-2 tokenizers do."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(_CORPUS * 20, trainer=trainer)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> str:
    """A tiny random Llama with a ChatML chat template, saved as an HF folder (load with `hf:<path>`)."""
    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="session")
def tiny_llm_plain(tmp_path_factory) -> str:
    """Like tiny_llm but without a chat template, and with a tokenizer that prepends BOS."""
    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llm-plain"), chat_template=None, add_bos=True)


# -- fine-tuning tests: one torch thread, and a small dialogue → complaint task ("notes") -------------------------

SYMPTOMS = ["headache", "fever", "cough", "chest pain", "nausea", "back pain", "sore throat", "dizziness"]
SINCE = ["yesterday", "monday", "last week", "two days", "this morning", "friday"]


@pytest.fixture(scope="module")
def one_thread():
    """Deterministic and steady on a shared 2-core machine (OpenMP spinning makes 2 threads far slower under load).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    """A folder with notes.csv: 40 short dialogue → complaint rows (24 train, 4 dev, 12 test)."""
    import csv
    import random

    folder = tmp_path_factory.mktemp("notes")
    rng = random.Random(0)
    with open(folder / "notes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "note"])
        for i in range(40):
            s, d = rng.choice(SYMPTOMS), rng.choice(SINCE)
            w.writerow([i, f"Doctor: What brings you in? Patient: I have had {s} since {d}.", f"{s} since {d}"])
    return folder


@pytest.fixture(scope="module")
def exp_file(notes, tiny_llm):
    """notes.yaml beside the data: an experiment defining the notes task on the tiny model."""
    from helpers import notes_spec, write_experiment

    return write_experiment(notes / "notes.yaml", name="notes", models=[f"hf:{tiny_llm}"], tasks=[notes_spec()])
