"""The `openai:` backend against real HTTP servers on loopback: faults and retries, recorded failures, keys, cost
accounting and the cost limit. (Evaluation through `labscale serve` is in test_serve_eval.py.)"""

from __future__ import annotations

import json
import random
import sqlite3

import pytest
from fault_server import FaultServer, prompt_words
from helpers import cli, counts, dump, write_experiment

KEY_VAR = "LABSCALE_TEST_API_KEY"
SECRET = "sk-test-SECRET-7f3a9c"
PRICE = {"input": 2.0, "output": 8.0}

ROWS = [  # id, question (with scripted faults), gold answer
    ("ok1", "Is water wet? [[answer:yes]]", "yes"),
    ("ok2", "Is fire cold? [[answer:no]]", "no"),
    ("wrong", "Is ice hot? [[answer:yes]]", "no"),
    ("rate", "Rate limited once [[fault:429]] [[answer:yes]]", "yes"),
    ("err2", "Two server errors [[fault:500x2]] [[answer:no]]", "no"),
    ("hang", "Hangs once [[fault:hang]] [[answer:yes]]", "yes"),
    ("bad", "Malformed once [[fault:malformed]] [[answer:no]]", "no"),
    ("dead", "Always failing [[fault:500x99]] [[answer:yes]]", "yes"),
    ("b400", "Rejected [[fault:400]] [[answer:no]]", "no"),
    ("nouse", "No usage [[fault:nousage]] [[answer:yes]]", "yes"),
]


def _task(tmp_path, rows=ROWS):
    data = tmp_path / "qa.csv"
    data.write_text("id,question,answer\n" + "".join(f'{i},"{q}",{a}\n' for i, q, a in rows))
    return {"name": "qa", "data": str(data), "type": "classify", "input": "{{ question }}", "target": "answer",
            "id_column": "id", "labels": ["yes", "no"], "instruction": "Answer yes or no.",
            "split_fractions": [0.0, 0.0, 1.0]}


def _model(server, **extra):
    return {"id": "openai:fake-gpt", "base_url": server.url, "api_key_env": KEY_VAR, "price": PRICE,
            "max_retries": 2, "timeout_s": 1.0, "concurrency": 4, **extra}


@pytest.fixture
def fast_backoff(monkeypatch):
    import labscale.models.openai_api as api

    monkeypatch.setattr(api, "BACKOFF_BASE_S", 0.05)
    monkeypatch.setenv(KEY_VAR, SECRET)


def _experiment(tmp_path, server, name="api", **extra):
    fields = {"name": name, "models": [_model(server)], "bootstrap_samples": 200, **extra}
    if "tasks" not in fields:  # (not built first: it would overwrite a given task's data file)
        fields["tasks"] = [_task(tmp_path)]
    return write_experiment(tmp_path / f"{name}.yaml", **fields)


def _predictions(db):
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = {r["example_id"]: dict(r) for r in conn.execute("SELECT * FROM predictions")}
    conn.close()
    return rows


@pytest.mark.slow
def test_faults_are_retried_recorded_and_the_run_completes(tmp_path, capsys, monkeypatch, fast_backoff):
    with FaultServer(key=SECRET, hang_s=2.5) as server:
        exp = _experiment(tmp_path, server)
        db = tmp_path / "api.db"
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
        assert code == 0, err
        # attempts per example: retried until success, or until max_retries=2 is spent
        assert {m: server.count(m) for m in ("Is water", "Rate limited", "Two server", "Hangs once", "Malformed",
                                             "Always failing", "Rejected", "No usage")} == {
            "Is water": 1, "Rate limited": 2, "Two server": 3, "Hangs once": 2, "Malformed": 2,
            "Always failing": 3, "Rejected": 1, "No usage": 1}
        t = server.times("Rate limited")
        assert t[1] - t[0] >= 0.95  # Retry-After: 1 honoured (the plain backoff here is 0.05 s)
        assert "failed requests: 2" in out
        assert counts(out) == (8, 0)

        preds = _predictions(db)
        assert "HTTP 500" in preds["dead"]["error"] and "after 3 attempts" in preds["dead"]["error"]
        assert "HTTP 400" in preds["b400"]["error"] and "context length" in preds["b400"]["error"]
        assert all(preds[k]["error"] is None for k in preds if k not in ("dead", "b400"))
        assert preds["hang"]["prediction"] == "yes" and preds["bad"]["prediction"] == "no"

        conn = sqlite3.connect(db)
        (acc,) = conn.execute("SELECT value FROM scores WHERE metric='accuracy'").fetchone()
        eff = json.loads(conn.execute("SELECT efficiency_json FROM runs").fetchone()[0])
        conn.close()
        assert acc == pytest.approx(7 / 10)  # 'wrong' is wrong, the two failures are scored wrong
        assert eff["failed"] == 2 and eff["retries"] == 1 + 2 + 1 + 1 + 2
        assert eff["usage_estimated"] == 1

        # cost: the API's usage × price, by hand (the no-usage reply is estimated by labscale, not by the server)
        system_and_user = {i: f"Answer yes or no.\n\n{q}" for i, q, _ in ROWS}
        ok = [i for i, *_ in ROWS if i not in ("dead", "b400", "nouse")]
        prompt_tokens = sum(prompt_words([{"content": system_and_user[i]}]) for i in ok)
        completion_tokens = len(ok)  # one-word replies
        conn = sqlite3.connect(db)
        (p_nouse, c_nouse) = conn.execute(
            "SELECT prompt_tokens, new_tokens FROM generations WHERE usage_estimated=1").fetchone()
        conn.close()
        expected = ((prompt_tokens + p_nouse) * 2.0 + (completion_tokens + c_nouse) * 8.0) / 1e6
        assert eff["prompt_tokens"] == prompt_tokens + p_nouse
        assert eff["cost_usd"] == pytest.approx(expected)
        report = (tmp_path / "api.md").read_text()
        assert "## API cost" in report and f"${expected:.4f}" in report
        assert "**Failed requests**" in report and "2/10" in report

        # a re-run retries only the failed requests
        before = server.total
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
        assert code == 0, err
        assert server.total - before == 3 + 1  # "dead" 3 attempts again, "b400" once
        assert counts(out) == (0, 8) and "failed requests: 2" in out


def test_api_key_never_reaches_database_report_or_output(tmp_path, capsys, monkeypatch, fast_backoff):
    with FaultServer(key=SECRET) as server:
        exp = _experiment(tmp_path, server, tasks=[_task(tmp_path, ROWS[:3])])
        db = tmp_path / "api.db"
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
        assert code == 0, err
        assert all(h.get("authorization") == f"Bearer {SECRET}" for h in server.headers)
    for path in tmp_path.iterdir():
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in out + err


def _scan_for(secret: str, folder, *texts: str) -> list[str]:
    """Every file under `folder` and every text that contains `secret`."""
    hits = [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    return hits + [t[:80] for t in texts if secret in t]


@pytest.mark.slow
def test_keys_echoed_in_error_bodies_are_redacted_everywhere(tmp_path, capsys, monkeypatch, fast_backoff):
    """A server that echoes the key in 400, 500 and 401 bodies: the key reaches no file, stdout or stderr."""
    rows = [("ok1", "Is water wet? [[answer:yes]]", "yes"), ("e400", "Echo [[fault:echo400]]", "no"),
            ("e500", "Echo [[fault:echo500x99]]", "yes")]
    with FaultServer(key=SECRET) as server:
        exp = _experiment(tmp_path, server, tasks=[_task(tmp_path, rows)])
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "api.db")
    assert code == 0, err
    preds = _predictions(tmp_path / "api.db")
    assert "HTTP 400" in preds["e400"]["error"] and "[REDACTED]" in preds["e400"]["error"]
    assert "HTTP 500" in preds["e500"]["error"] and "[REDACTED]" in preds["e500"]["error"]
    assert _scan_for(SECRET, tmp_path, out, err) == []
    with FaultServer(key="another-key-123", echo_key=True) as server:
        exp = _experiment(tmp_path, server, name="api401", tasks=[_task(tmp_path, rows[:1])])
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "api401.db")
    assert code == 2 and "401" in err and "[REDACTED]" in err, err
    assert _scan_for(SECRET, tmp_path, out, err) == []


def test_redact_masks_registered_values_and_credential_shapes():
    from labscale.secrets import redact, register

    register("my-own-key-value-42")
    text = ("key my-own-key-value-42; Authorization: Bearer abc.DEF-123_xyz; sk-proj-AAAA1111BBBB2222; "
            'api_key="zzzzzzzzzz"; the word token stays')
    out = redact(text)
    for leaked in ("my-own-key-value-42", "abc.DEF-123_xyz", "sk-proj-AAAA1111BBBB2222", "zzzzzzzzzz"):
        assert leaked not in out
    assert "Authorization: Bearer [REDACTED]" in out and "the word token stays" in out


def test_rejected_key_stops_with_one_line_and_keeps_the_report(tmp_path, capsys, monkeypatch, fast_backoff):
    with FaultServer(key="another-key") as server:
        exp = _experiment(tmp_path, server, tasks=[_task(tmp_path, ROWS[:3])])
        db = tmp_path / "api.db"
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
        assert server.total <= 3  # no retries on 401
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "401" in lines[0] and f"${KEY_VAR}" in lines[0], err
    assert "pending" in (tmp_path / "api.md").read_text()


def test_missing_key_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(KEY_VAR, raising=False)
    with FaultServer() as server:
        exp = _experiment(tmp_path, server)
        db = tmp_path / "api.db"
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
        assert server.total == 0
    assert code == 2 and f"${KEY_VAR}" in err and "optional: true" in err
    assert not db.exists()


@pytest.mark.slow
def test_optional_model_without_key_is_skipped_visibly(tmp_path, capsys, monkeypatch, tiny_llm):
    monkeypatch.delenv(KEY_VAR, raising=False)
    with FaultServer() as server:
        exp = write_experiment(tmp_path / "opt.yaml", name="opt", tasks=[_task(tmp_path, ROWS[:3])],
                               models=[f"hf:{tiny_llm}", _model(server, optional=True)], bootstrap_samples=200)
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "opt.db")
        assert server.total == 0
    assert code == 0, err
    assert f"notice: skipped optional model 'openai:fake-gpt': ${KEY_VAR} is not set" in err
    report = (tmp_path / "opt.md").read_text()
    assert "**Notice:** skipped optional model 'openai:fake-gpt'" in report
    assert "openai:fake-gpt |" not in report.split("## Models")[1].split("##")[0]


def test_cost_limit_stops_before_it_is_exceeded_and_resumes(tmp_path, capsys, monkeypatch, fast_backoff):
    rows = [(f"q{i}", f"Question number {i} [[answer:yes]]", "yes") for i in range(12)]
    price = {"input": 1000.0, "output": 1000.0}  # $ per 1M tokens: a request costs about a cent
    with FaultServer(key=SECRET) as server:
        model = _model(server, price=price, concurrency=2, batch_size=4)
        exp = write_experiment(tmp_path / "cap.yaml", name="cap", models=[model], tasks=[_task(tmp_path, rows)],
                               generation={"max_new_tokens": 4}, cost_limit=0.1, bootstrap_samples=200)
        db = tmp_path / "cap.db"
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
        assert code == 2 and "cost_limit $0.10 reached" in err and "raise cost_limit" in err
        sent = server.total
        assert 0 < sent < 12
        conn = sqlite3.connect(db)
        p, c = conn.execute("SELECT SUM(prompt_tokens), SUM(new_tokens) FROM generations").fetchone()
        conn.close()
        assert (p + c) * 1000.0 / 1e6 <= 0.1  # actual spending stayed under the cap
        assert "pending" in (tmp_path / "cap.md").read_text()

        # the same limit again: what is stored counts, nothing more is spent
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
        assert code == 2 and server.total == sent
        # a higher limit finishes the rest without repeating anything
        write_experiment(exp, name="cap", models=[model], tasks=[_task(tmp_path, rows)],
                         generation={"max_new_tokens": 4}, cost_limit=1.0, bootstrap_samples=200)
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
        assert code == 0, err
        assert server.total == 12 and counts(out) == (12 - sent, sent)


def test_cost_limit_needs_a_price(tmp_path, capsys, monkeypatch, fast_backoff):
    with FaultServer(key=SECRET) as server:
        model = _model(server)
        del model["price"]
        exp = write_experiment(tmp_path / "np.yaml", name="np", models=[model], tasks=[_task(tmp_path, ROWS[:2])],
                               cost_limit=1.0)
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "np.db")
    assert code == 2 and "no price is known for model 'openai:fake-gpt'" in err
    assert not (tmp_path / "np.db").exists()


def test_multiple_choice_on_an_api_model_uses_the_letter_protocol(tmp_path, capsys, monkeypatch, fast_backoff):
    with FaultServer(key=SECRET) as server:  # answers "A" to everything
        exp = write_experiment(tmp_path / "mc.yaml", name="mc", models=[_model(server)], tasks=["openbookqa"],
                               limit=5, bootstrap_samples=200)
        db = tmp_path / "mc.db"
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
        assert code == 0, err
        assert server.total == 5
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT protocol FROM runs").fetchone()[0] == "generate"
    preds = [json.loads(p) for (p,) in conn.execute("SELECT stats_json FROM predictions")]
    conn.close()
    assert len(preds) == 5
    report = (tmp_path / "mc.md").read_text()
    assert "| openai:fake-gpt | zero-shot | generate |" in report
    # the row names the metric its cell shows (an API model has no log-likelihoods, so no acc_norm)
    assert "openbookqa (acc, generate, n=5) | 0.200 [0.000, 0.600] |" in report


@pytest.mark.slow
def test_mixed_protocols_name_both_metrics(tmp_path, capsys, monkeypatch, fast_backoff, tiny_llm):
    with FaultServer(key=SECRET) as server:
        exp = write_experiment(tmp_path / "mix.yaml", name="mix", models=[_model(server), f"hf:{tiny_llm}"],
                               tasks=["openbookqa"], limit=3, bootstrap_samples=200)
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "mix.db")
    assert code == 0, err
    report = (tmp_path / "mix.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| openbookqa (acc_norm; acc where answered"))
    assert "(acc, generate)" in row and "loglikelihood" in row


def test_a_model_whose_every_request_failed_has_no_score_and_the_run_fails(tmp_path, capsys, monkeypatch,
                                                                           fast_backoff):
    rows = [(f"d{i}", f"Always failing {i} [[fault:500x99]]", "yes") for i in range(3)]
    some = [("ok1", "Is water wet? [[answer:yes]]", "yes"), ("d9", "Always failing [[fault:500x99]]", "yes")]
    with FaultServer(key=SECRET) as server:
        dead = _task(tmp_path, rows)
        (tmp_path / "dead.csv").write_text((tmp_path / "qa.csv").read_text())
        half = _task(tmp_path, some)
        exp = _experiment(tmp_path, server, tasks=[{**dead, "name": "dead", "data": str(tmp_path / "dead.csv")},
                                                   {**half, "name": "half"}], **{"models": [_model(server,
                                                                                                    max_retries=0)]})
        db = tmp_path / "api.db"
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "1 run(s) got no successful answer" in lines[0] and "dead" in lines[0], err
    report = (tmp_path / "api.md").read_text()
    assert "| dead (accuracy, n=3) | failed 3/3 |" in report
    assert "(1 failed) |" in next(line for line in report.splitlines() if line.startswith("| half (accuracy"))
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM scores s JOIN runs r ON r.id = s.run_id WHERE r.task='dead'"
                        ).fetchone()[0] == 0
    assert "0.000 [0.000, 0.000]" not in report


def test_api_only_fields_are_rejected_on_local_models(tmp_path, capsys, monkeypatch):
    exp = write_experiment(tmp_path / "bad.yaml", name="bad", tasks=["fact-check"],
                           models=[{"id": "embedded:smollm2-135m-instruct", "base_url": "http://x/v1"}])
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "bad.db")
    assert code == 2 and "base_url only apply to openai:<model> entries" in err


def test_failed_database_rows_are_untouched_by_a_bad_file(tmp_path, capsys, monkeypatch, fast_backoff):
    with FaultServer(key=SECRET) as server:
        exp = _experiment(tmp_path, server, tasks=[_task(tmp_path, ROWS[:2])])
        db = tmp_path / "api.db"
        assert cli(capsys, monkeypatch, "run", exp, "--db", db)[0] == 0
        before = dump(db)
        bad = write_experiment(tmp_path / "bad.yaml", name="api", tasks=[_task(tmp_path, ROWS[:2])],
                               models=[_model(server, base_url="ftp://nowhere")])
        code, out, err = cli(capsys, monkeypatch, "run", bad, "--db", db)
    assert code == 2 and "is not an http(s) URL" in err
    assert dump(db) == before


@pytest.mark.parametrize("model, field, expected", [
    ("openai:fake-gpt", None, "max_tokens"),
    ("openai:o3-mini", None, "max_completion_tokens"),
    ("openai:gpt-5-mini", None, "max_completion_tokens"),
    ("openai:fake-gpt", "max_completion_tokens", "max_completion_tokens"),
])
def test_the_output_budget_goes_in_the_field_the_model_accepts(tmp_path, capsys, monkeypatch, fast_backoff,
                                                               model, field, expected):
    with FaultServer(key=SECRET) as server:
        entry = {**_model(server), "id": model, **({"token_limit_field": field} if field else {})}
        exp = write_experiment(tmp_path / "tl.yaml", name="tl", models=[entry], tasks=[_task(tmp_path, ROWS[:1])],
                               generation={"max_new_tokens": 7}, bootstrap_samples=200)
        code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "tl.db")
        assert code == 0, err
        (body,) = server.bodies
    assert body[expected] == 7 and {"max_tokens", "max_completion_tokens"} - {expected} & body.keys() == set()


# -- units ------------------------------------------------------------------------------------------------------

def test_price_lookup_matches_snapshots_to_their_family():
    from labscale.efficiency.cost import cost_usd, lookup

    assert lookup("gpt-4o").input == 2.50
    assert lookup("gpt-4o-mini-2024-07-18").input == 0.15
    assert lookup("gpt-4o-2024-08-06").output == 10.0
    assert lookup("openai/gpt-4.1-nano").input == 0.10
    assert lookup("my-local-model") is None and lookup("gpt-4ox") is None
    assert cost_usd(lookup("gpt-4o"), 1_000_000, 100_000) == pytest.approx(2.5 + 1.0)


def test_backoff_honours_retry_after_and_jitters_exponentially():
    from labscale.models.openai_api import BACKOFF_BASE_S, BACKOFF_MAX_S, _retry_after, backoff_s

    rng = random.Random(0)
    assert backoff_s(1, 2.0, rng) == 2.0
    assert backoff_s(1, 1e6, rng) == BACKOFF_MAX_S
    for attempt in range(1, 6):
        waits = [backoff_s(attempt, None, rng) for _ in range(50)]
        base = min(BACKOFF_BASE_S * 2 ** (attempt - 1), BACKOFF_MAX_S)
        assert all(base / 2 <= w <= base for w in waits) and len(set(waits)) > 1
    assert _retry_after({"retry-after": "3"}) == 3.0
    assert _retry_after({"retry-after-ms": "250"}) == 0.25
    assert _retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert _retry_after({}) is None


def test_spending_cap_reserves_the_worst_case():
    from labscale.efficiency.cost import CostLimitReached, SpendingCap

    cap = SpendingCap(1.0)
    cap.add("a", 0.5)
    cap.add("a", 0.5)  # the same stored request counted once
    assert cap.spent == 0.5
    assert cap.admit([0.2, 0.2, 0.2]) == 2
    with pytest.raises(CostLimitReached):
        cap.admit([0.6])
    assert SpendingCap(None).admit([1e9]) == 1


# -- loglikelihood: completions (scoring against labscale serve: test_serve_logprobs.py, test_lm_eval_serve.py) --


def test_completions_mode_on_an_endpoint_without_logprobs_is_one_line(tmp_path, capsys, monkeypatch, fast_backoff):
    with FaultServer(key=SECRET) as server:  # refuses /v1/completions with echo, as llama-server does
        exp = write_experiment(tmp_path / "mc.yaml", name="mc", tasks=["openbookqa"], limit=3,
                               models=[_model(server, loglikelihood="completions")])
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "mc.db")
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1, err
        assert "gives no prompt log-probabilities (HTTP 400: Only no echo is supported)" in lines[0]
        assert "loglikelihood_fallback: true" in lines[0] and SECRET not in err
        assert not (tmp_path / "mc.db").exists() and server.total == 0  # no chat request was made


def test_completions_mode_falls_back_to_letters_only_when_allowed(tmp_path, capsys, monkeypatch, fast_backoff):
    with FaultServer(key=SECRET) as server:
        exp = write_experiment(tmp_path / "mc.yaml", name="mc", tasks=["openbookqa"], limit=3, bootstrap_samples=200,
                               models=[_model(server, loglikelihood="completions", loglikelihood_fallback=True)])
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "mc.db")
        assert code == 0, err
        assert "notice: model 'openai:fake-gpt': the endpoint gives no prompt log-probabilities" in err
        assert server.total == 3  # the letter protocol: one chat request per question
    conn = sqlite3.connect(tmp_path / "mc.db")
    assert conn.execute("SELECT protocol FROM runs").fetchone()[0] == "generate"
    conn.close()
    assert "the letter protocol" in (tmp_path / "mc.md").read_text()


def test_completions_mode_on_an_unreachable_endpoint_is_one_line(tmp_path, capsys, monkeypatch, fast_backoff):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = {"id": "openai:x", "base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": None,
             "loglikelihood": "completions", "max_retries": 1}
    exp = write_experiment(tmp_path / "mc.yaml", name="mc", tasks=["openbookqa"], limit=2, models=[model])
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "mc.db")
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "cannot check that" in lines[0] and "connection failed" in lines[0], err
    assert not (tmp_path / "mc.db").exists()


@pytest.mark.parametrize("field,value", [("loglikelihood", "completions"), ("loglikelihood_fallback", True)])
def test_completions_mode_fields_only_on_api_entries(tmp_path, capsys, monkeypatch, field, value):
    exp = write_experiment(tmp_path / "bad.yaml", name="bad", tasks=["fact-check"],
                           models=[{"id": "embedded:smollm2-135m-instruct", field: value}])
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "bad.db")
    assert code == 2 and f"{field} only apply to openai:<model> entries" in err
