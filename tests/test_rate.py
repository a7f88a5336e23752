"""`labscale rate`: items, blinded sessions (seeded order, opaque codes, ~10% repeats, resume), the API's
validation and errors, the access token, the CLI's one-line errors, an LLM judge (a scripted backend here; the
real embedded model in test_report_real.py), and the report's Human evaluation section."""

from __future__ import annotations

import json
import sqlite3

import httpx2 as httpx
import pytest
from helpers import cli, dump
from rate_helpers import MODELS, rating_db, serving
from synthetic import make_db, run_spec

from labscale.engine.store import Store
from labscale.rate.items import load_items
from labscale.rate.sessions import sequence


@pytest.fixture
def db(tmp_path):
    return rating_db(tmp_path / "r.db")


def _blind(text: str) -> None:
    for secret in (*MODELS, "run0", "zero-shot", "fp-"):
        assert secret not in text, secret


def test_items_and_sequence(db):
    store = Store(db, readonly=True)
    absolute = load_items(store, 1, "absolute", "summ")
    pairwise = load_items(store, 1, "pairwise", None)
    everything = load_items(store, 1, "absolute", None)
    store.close()
    assert len(absolute) == 20 and len(pairwise) == 10 and len(everything) == 24
    assert absolute[0].instruction == "Summarize the dialogue." and absolute[0].input == "input 0"
    slots = sequence(absolute, seed=7)
    assert len(slots) == 22  # 10% repeated
    repeats = [s for s in slots if s.repeat]
    for r in repeats:
        first = next(s for s in slots if s.item is r.item and not s.repeat)
        assert r.position > first.position and r.code != first.code
    assert [s.code for s in sequence(absolute, 7)] == [s.code for s in slots]  # deterministic in the seed
    assert [s.item.key for s in sequence(absolute, 8)] != [s.item.key for s in slots]  # another rater's order
    sides = [s.swapped for s in sequence(pairwise, 7)]
    assert any(sides) and not all(sides)


@pytest.mark.slow
def test_rate_resume_and_store(db):
    with serving(db) as (url, items):
        c = httpx.Client(base_url=url)
        page = c.get("/")
        assert page.status_code == 200 and "Content-Security-Policy" in page.headers
        _blind(page.text)
        s = c.post("/api/session", json={"rater": "alice"}).json()
        assert s["total"] == 22 and s["done"] == 0
        _blind(json.dumps(s))
        clicked = []
        for grade in "ABCDA":
            code = s["item"]["code"]
            s = c.post("/api/rate", json={"rater": "alice", "code": code, "rating": grade, "seconds": 1.5}).json()
            _blind(json.dumps(s))
            clicked.append((code, grade))
        assert s["done"] == 5
        # the same code again: 409, the first rating kept
        r = c.post("/api/rate", json={"rater": "alice", "code": clicked[0][0], "rating": "D"})
        assert r.status_code == 409 and "already rated" in r.json()["error"]
        # a new session object for the same rater (closed tab, server restart) resumes at the sixth item
        resumed = c.post("/api/session", json={"rater": "alice"}).json()
        assert resumed["done"] == 5 and resumed["item"]["code"] == s["item"]["code"]
        other = c.post("/api/session", json={"rater": "bob"}).json()
        assert other["done"] == 0 and other["item"]["code"] != resumed["item"]["code"]
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT item, rating, seconds, repeat, run_id FROM ratings ORDER BY position").fetchall()
    seed = conn.execute("SELECT seed FROM rating_sessions WHERE rater='alice'").fetchone()[0]
    conn.close()
    assert [(r[0], r[1]) for r in rows] == clicked and all(r[2] == 1.5 for r in rows)
    with serving(db) as (url, _):  # a restarted server: same seed, same place
        s = httpx.post(f"{url}/api/session", json={"rater": "alice"}).json()
        assert s["done"] == 5 and s["item"]["code"] == resumed["item"]["code"]
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT seed FROM rating_sessions WHERE rater='alice'").fetchone()[0] == seed
    conn.close()


@pytest.mark.parametrize("body, status, message", [
    ({"rater": "alice", "code": "0123456789ab", "rating": "A"}, 404, "no item '0123456789ab'"),
    ({"rater": "alice", "code": "zz", "rating": "A"}, 400, "invalid item code"),
    ({"rater": "<script>", "code": "0123456789ab", "rating": "A"}, 400, "invalid rater id"),
    ({"rater": "alice", "code": "0123456789ab"}, 400, "missing field 'rating'"),
    ({"rater": "alice", "code": "0123456789ab", "rating": "A", "model": "x"}, 400, "unknown field 'model'"),
    ({"rater": "alice", "code": "0123456789ab", "rating": "A", "seconds": -1}, 400, "invalid seconds"),
    ([1, 2], 400, "must be a JSON object"),
])
def test_bad_posts_are_4xx_with_a_message_and_store_nothing(db, body, status, message):
    before = dump(db)
    with serving(db) as (url, _):
        r = httpx.post(f"{url}/api/rate", json=body)
        assert r.status_code == status and message in r.json()["error"], r.text
        r = httpx.post(f"{url}/api/rate", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "JSON object" in r.json()["error"]
        r = httpx.post(f"{url}/api/rate", content=b"x" * (70 << 10), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
    assert [x for x in dump(db) if "rating" in x] == [x for x in before if "rating" in x]


def test_a_wrong_rating_for_the_mode_is_refused(db):
    with serving(db, mode="pairwise") as (url, _):
        s = httpx.post(f"{url}/api/session", json={"rater": "alice"}).json()
        assert len(s["item"]["outputs"]) == 2
        r = httpx.post(f"{url}/api/rate", json={"rater": "alice", "code": s["item"]["code"], "rating": "A"})
        assert r.status_code == 400 and "not one of left, right, tie, both_bad" in r.json()["error"]


def test_access_token(db):
    with serving(db, token="s3cret") as (url, _):
        assert httpx.get(f"{url}/").status_code == 200  # the page holds no data
        r = httpx.post(f"{url}/api/session", json={"rater": "alice"})
        assert r.status_code == 401 and "token" in r.json()["error"]
        r = httpx.post(f"{url}/api/session", json={"rater": "alice"}, headers={"X-Labscale-Token": "nope"})
        assert r.status_code == 401
        r = httpx.post(f"{url}/api/session", json={"rater": "alice"}, headers={"X-Labscale-Token": "s3cret"})
        assert r.status_code == 200


def test_cli_errors(tmp_path, db, capsys, monkeypatch):
    code, _, err = cli(capsys, monkeypatch, "rate", "--db", tmp_path / "none.db")
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, monkeypatch, "rate", "--db", db, "--task", "sum")
    assert code == 2 and "did you mean 'summ'?" in err
    code, _, err = cli(capsys, monkeypatch, "rate", "--db", db, "--mode", "ranking")
    assert code == 2 and "unknown --mode 'ranking'" in err
    code, _, err = cli(capsys, monkeypatch, "rate", "--db", db, "--task", "cls", "--mode", "pairwise")
    assert code == 2 and "nothing to compare pairwise" in err
    monkeypatch.delenv("RATE_TOKEN", raising=False)
    code, _, err = cli(capsys, monkeypatch, "rate", "--db", db, "--token-env", "RATE_TOKEN")
    assert code == 2 and "--token-env RATE_TOKEN: that environment variable is not set" in err
    mc = make_db(tmp_path / "mc.db", [run_spec("mc", "m", "zero-shot", [1.0, 0.0], protocol="loglikelihood")])
    before = dump(mc)
    code, _, err = cli(capsys, monkeypatch, "rate", "--db", mc)
    assert code == 2 and "has no generated outputs to rate" in err and err.count("\n") == 1
    assert dump(mc) == before


class Scripted:
    """A judge backend answering from a script: absolute → a grade per prompt, pairwise → prefers 'closed'."""

    def __init__(self, answers):
        from labscale.models.base import ModelInfo

        self.answers, self.calls = answers, 0
        self.info = ModelInfo(name="judge", fingerprint="fp-judge-1", backend="test", context_length=4096)

    def render(self, messages):
        return messages[-1]["content"]

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, requests, progress=None):
        from labscale.models.base import GenerationResult

        out = []
        for r in requests:
            self.calls += 1
            out.append(GenerationResult(text=self.answers(r.prompt), prompt_tokens=1, new_tokens=1, latency_s=0.0,
                                        compute_s=0.0, finish_reason="stop"))
        return out

    def close(self):
        pass


def _pairwise_answer(prompt: str) -> str:
    first = prompt.split("Response 1:")[1].split("Response 2:")[0]
    return "1" if "closed" in first else "2" if "summary 0" not in first else "maybe"


@pytest.mark.slow
def test_judge_both_orders_cache_and_report(db, capsys, monkeypatch):
    backend = Scripted(lambda p: "A" if "closed" in p.split("Response:")[1] else "Grade: D")
    monkeypatch.setattr("labscale.models.registry.resolve_model", lambda spec: backend)
    code, out, err = cli(capsys, monkeypatch, "rate", "--db", db, "--task", "summ", "--judge", MODELS[1])
    assert code == 0, err
    assert "20 prompts on 20 items (20 new, 0 cached), parse failures 0" in out
    code, out, _ = cli(capsys, monkeypatch, "rate", "--db", db, "--task", "summ", "--judge", MODELS[1])
    assert "(0 new, 20 cached)" in out and backend.calls == 20  # through the generation cache
    pair = Scripted(_pairwise_answer)
    monkeypatch.setattr("labscale.models.registry.resolve_model", lambda spec: pair)
    code, out, _ = cli(capsys, monkeypatch, "rate", "--db", db, "--mode", "pairwise", "--judge", MODELS[1])
    assert code == 0 and "20 prompts on 10 items" in out and "parse failures 1" in out  # both orders
    code, _, err = cli(capsys, monkeypatch, "rate", "--db", db, "--judge", "gpt-5")
    assert code == 2 and "--judge 'gpt-5' is not a model of this experiment" in err
    # humans: two raters agree on some items
    with serving(db) as (url, _):
        for rater in ("alice", "bob"):
            s = httpx.post(f"{url}/api/session", json={"rater": rater}).json()
            while s["item"]:
                grade = "A" if s["item"]["outputs"][0].startswith("closed") else "C"
                s = httpx.post(f"{url}/api/rate", json={"rater": rater, "code": s["item"]["code"],
                                                         "rating": grade}).json()
    code, out, _ = cli(capsys, monkeypatch, "report", "--db", db, "--out", db.with_suffix(".md"))
    text = db.with_suffix(".md").read_text()
    assert "## Human evaluation" in text and "### summ — absolute ratings" in text
    assert f"| {MODELS[0]} · zero-shot | 20 | 100% [100, 100] |" in text  # 2 raters × 10 items, all A
    assert "Krippendorff's α (ordinal) among 2 human raters: **1.000**" in text
    assert f"LLM judge `judge:{MODELS[1]}`: 50% [" in text  # A as the humans, D vs their C
    assert "| small-model-y · zero-shot | 10 | 0% [0, 0] | 0% [0, 0] | 0% [0, 0] | 100% [100, 100] | 0 |" in text
    assert "### summ — pairwise comparisons" in text and f"judge `judge:{MODELS[1]}` Bradley–Terry" in text
    assert "| alice | 2 | 100% [100, 100] |" in text  # consistent on both repeats


def test_a_database_from_before_ratings(tmp_path, capsys, monkeypatch):
    """Schema 3 (no predictions.input, no rating tables): the report reads it as is; `rate` shows the prompt as
    the input and the store's additive migration adds the tables when it first writes."""
    db = rating_db(tmp_path / "old.db", n=3)
    conn = sqlite3.connect(db)
    conn.executescript("ALTER TABLE predictions DROP COLUMN input; DROP TABLE ratings; DROP TABLE rating_sessions;"
                       "UPDATE meta SET value='3' WHERE key='schema_version';")
    conn.close()
    code, _, err = cli(capsys, monkeypatch, "report", "--db", db, "--html")
    assert code == 0, err
    assert "## Human evaluation" not in db.with_suffix(".md").read_text()
    assert "(see prompt)" in db.with_suffix(".html").read_text()
    with serving(db) as (url, items):
        assert items[0].input == "<|user|>input 0<|assistant|>"
        s = httpx.post(f"{url}/api/session", json={"rater": "carol"}).json()
        assert httpx.post(f"{url}/api/rate", json={"rater": "carol", "code": s["item"]["code"],
                                                    "rating": "B"}).status_code == 200
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "4"
    assert "input" in {r[1] for r in conn.execute("PRAGMA table_info(predictions)")}
    assert conn.execute("SELECT rating FROM ratings").fetchall() == [("B",)]
    conn.close()
