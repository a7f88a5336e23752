"""The report's Human evaluation section: the ratings `labscale rate` stored (and an LLM judge's), per task.

Absolute ratings: the A/B/C/D distribution per model × setting with 95% bootstrap CIs; pairwise: win rates and a
Bradley–Terry ranking with bootstrap CIs; inter-rater agreement (Krippendorff's α: ordinal for A–D, nominal for
pairwise) and each rater's consistency on repeated items; an LLM judge next to the humans with its agreement with
them (exact agreement with the human majority, and α with the judge counted as one more rater) and its
parse-failure rate. Statistics and their sources: rate/stats.py. Only a rater's first rating of an item counts;
the repeats measure consistency.
"""

from __future__ import annotations

from collections import defaultdict

from labscale.engine.store import Store
from labscale.report.format import fmt, table
from labscale.report.runs import StoredRun


def _pct(share) -> str:
    value, low, high = share
    if value is None:
        return "n/a"
    return f"{100 * value:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"


def _ci(t) -> str:
    return f"{fmt(t[0])} [{fmt(t[1])}, {fmt(t[2])}]"


def _combine_judge(pair_outcomes: list[str | None]) -> str | None:
    """A judge's two orders of one pair → one outcome: agreeing orders win, disagreeing ones tie."""
    parsed = [o for o in pair_outcomes if o is not None]
    if not parsed:
        return None
    if len(parsed) == 1:
        return parsed[0]
    return parsed[0] if len(set(parsed)) == 1 else "tie"


def human_data(store: Store, runs: list[StoredRun], n_boot: int, seed: int) -> dict:
    """Per task: {"absolute": …, "pairwise": …} summaries (see the module docstring); {} without ratings."""
    from labscale.rate.stats import (GRADE_VALUE, GRADES, OUTCOME_CODE, alpha, canonical, consistency, majority,
                                     pairwise, share_ci)

    rows = store.ratings([r.id for r in runs])
    if not rows:
        return {}
    by_id = {r.id: r for r in runs}
    label = {r.id: f"{r.model} · {r.setting}" for r in runs}
    out: dict = {}
    for task in dict.fromkeys(r.task for r in runs):
        task_rows = [x for x in rows if by_id[x["run_id"]].task == task]
        if not task_rows:
            continue
        entry: dict = {}
        # -- absolute ------------------------------------------------------------------------------------------
        absolute = [x for x in task_rows if x["mode"] == "absolute"]
        if absolute:
            human = [x for x in absolute if x["source"] == "human" and not x["repeat"] and x["rating"]]
            judges = sorted({x["rater"] for x in absolute if x["source"] == "judge"})
            per_run = []
            for rid in dict.fromkeys(x["run_id"] for x in absolute):
                grades = [x["rating"] for x in human if x["run_id"] == rid]
                row = {"run_id": rid, "label": label[rid], "n": len(grades),
                       "shares": {g: share_ci([float(v == g) for v in grades], n_boot, seed) for g in GRADES},
                       "a_or_b": share_ci([float(v in ("A", "B")) for v in grades], n_boot, seed), "judges": {}}
                for j in judges:
                    jg = [x["rating"] for x in absolute if x["rater"] == j and x["run_id"] == rid]
                    ok = [g for g in jg if g]
                    row["judges"][j] = {"n": len(jg), "failures": len(jg) - len(ok),
                                        "shares": {g: share_ci([float(v == g) for v in ok], n_boot, seed)
                                                   for g in GRADES}}
                per_run.append(row)
            units: dict = defaultdict(dict)
            for x in human:
                units[(x["run_id"], x["example_id"])][x["rater"]] = GRADE_VALUE[x["rating"]]
            entry["absolute"] = {"runs": per_run, "raters": sorted({x["rater"] for x in human}),
                                 "alpha": alpha(units, "ordinal"),
                                 "units_multi": sum(len(v) >= 2 for v in units.values()),
                                 "consistency": _consistency(absolute, lambda x: (x["run_id"], x["example_id"]),
                                                             lambda x: x["rating"], n_boot, seed),
                                 "judges": {}}
            for j in judges:
                jrows = [x for x in absolute if x["rater"] == j]
                judged = {(x["run_id"], x["example_id"]): x["rating"] for x in jrows}
                agree = []
                with_judge: dict = {u: dict(v) for u, v in units.items()}
                for u, g in judged.items():
                    if g is None:
                        continue
                    with_judge.setdefault(u, {})[j] = GRADE_VALUE[g]
                    maj = majority([GRADES[4 - v] for v in units.get(u, {}).values()])
                    if maj is not None:
                        agree.append(float(maj == g))
                entry["absolute"]["judges"][j] = {
                    "prompts": len(jrows), "failures": sum(x["rating"] is None for x in jrows),
                    "agreement": share_ci(agree, n_boot, seed), "agreement_n": len(agree),
                    "alpha_with_humans": alpha(with_judge, "ordinal")}
        # -- pairwise ------------------------------------------------------------------------------------------
        pair_rows = [x for x in task_rows if x["mode"] == "pairwise"]
        if pair_rows:
            human = [x for x in pair_rows if x["source"] == "human" and not x["repeat"] and x["rating"]]
            outcomes = [canonical(x["run_id"], x["other_run_id"], x["rating"]) for x in human]
            res = pairwise(outcomes, n_boot=n_boot, seed=seed)
            units = defaultdict(dict)
            for x, (a, b, o) in zip(human, outcomes):
                units[(a, b, x["example_id"])][x["rater"]] = OUTCOME_CODE[o]
            entry["pairwise"] = {"result": res, "labels": label, "raters": sorted({x["rater"] for x in human}),
                                 "alpha": alpha(units, "nominal"),
                                 "units_multi": sum(len(v) >= 2 for v in units.values()),
                                 "consistency": _consistency(
                                     pair_rows, lambda x: (*sorted((x["run_id"], x["other_run_id"])), x["example_id"]),
                                     lambda x: canonical(x["run_id"], x["other_run_id"], x["rating"])[2], n_boot,
                                     seed),
                                 "judges": {}}
            for j in sorted({x["rater"] for x in pair_rows if x["source"] == "judge"}):
                jrows = [x for x in pair_rows if x["rater"] == j]
                both: dict = defaultdict(list)
                for x in jrows:
                    a, b = sorted((x["run_id"], x["other_run_id"]))
                    both[(a, b, x["example_id"])].append(
                        None if x["rating"] is None else canonical(x["run_id"], x["other_run_id"], x["rating"])[2])
                combined = {u: _combine_judge(v) for u, v in both.items()}
                j_outcomes = [(u[0], u[1], o) for u, o in combined.items() if o is not None]
                agree, with_judge = [], {u: dict(v) for u, v in units.items()}
                inv = {v: k for k, v in OUTCOME_CODE.items()}
                for u, judged_outcome in combined.items():
                    if judged_outcome is None:
                        continue
                    with_judge.setdefault(u, {})[j] = OUTCOME_CODE[judged_outcome]
                    maj = majority([inv[v] for v in units.get(u, {}).values()])
                    if maj is not None:
                        agree.append(float(maj == judged_outcome))
                entry["pairwise"]["judges"][j] = {
                    "prompts": len(jrows), "failures": sum(x["rating"] is None for x in jrows),
                    "order_disagreements": sum(1 for v in both.values() if len(v) == 2 and None not in v
                                               and v[0] != v[1]),
                    "result": pairwise(j_outcomes, n_boot=n_boot, seed=seed),
                    "agreement": share_ci(agree, n_boot, seed), "agreement_n": len(agree),
                    "alpha_with_humans": alpha(with_judge, "nominal")}
        out[task] = entry
    return out


def _consistency(rows, unit, value, n_boot: int, seed: int) -> dict:
    """Per human rater: (share of repeats rated as the first time, CI, repeats)."""
    from labscale.rate.stats import consistency

    out = {}
    for rater in sorted({x["rater"] for x in rows if x["source"] == "human"}):
        mine = [x for x in rows if x["rater"] == rater and x["rating"]]
        first = {unit(x): value(x) for x in mine if not x["repeat"]}
        pairs = [(first[unit(x)], value(x)) for x in mine if x["repeat"] and unit(x) in first]
        if pairs:
            out[rater] = consistency(pairs, n_boot, seed)
    return out


def _alpha_text(kind: str, entry: dict) -> str:
    a = entry["alpha"]
    raters = len(entry["raters"])
    if a is None:
        return (f"Krippendorff's α ({kind}): n/a — it needs at least two raters on an item ({raters} human "
                f"rater(s), {entry['units_multi']} item(s) rated by two or more).")
    return (f"Krippendorff's α ({kind}) among {raters} human raters: **{a:.3f}** over {entry['units_multi']} item(s) "
            "rated by two or more (1 = perfect agreement, 0 = chance).")


def _judge_lines(entry: dict, kind: str) -> list[str]:
    lines = []
    for j, s in entry["judges"].items():
        fail = s["failures"] / s["prompts"] if s["prompts"] else 0.0
        agree = (f"{_pct(s['agreement'])} exact agreement with the human majority on {s['agreement_n']} item(s)"
                 if s["agreement_n"] else "no item with a human majority to compare with")
        a = s["alpha_with_humans"]
        extra = f", {s['order_disagreements']} pair(s) judged differently in the two orders (counted as ties)" \
            if "order_disagreements" in s else ""
        lines.append(f"- LLM judge `{j}`: {agree}; α ({kind}, humans + judge) "
                     f"{'n/a' if a is None else f'{a:.3f}'}; parse failures {s['failures']}/{s['prompts']} "
                     f"({100 * fail:.0f}%){extra}.")
    return lines + [""] if lines else []


def _consistency_lines(entry: dict) -> list[str]:
    c = entry["consistency"]
    if not c:
        return []
    rows = [[r, str(n), _pct((v, lo, hi))] for r, (v, lo, hi, n) in c.items()]
    return ["Intra-rater consistency (items shown twice, ~10% of each rater's items):", ""] + table(
        ["rater", "repeats", "same rating both times"], rows)


def human_section(store: Store, runs: list[StoredRun], n_boot: int, seed: int) -> list[str]:
    """Empty when nothing was rated."""
    data = human_data(store, runs, n_boot, seed)
    if not data:
        return []
    lines = ["## Human evaluation", "",
             "Ratings from `labscale rate` (blinded: raters never see model names; order randomised per rater). "
             "Absolute grades: A valid and satisfying; B acceptable with minor errors; C relevant but with "
             "significant errors; D invalid or unacceptable. Pairwise: a win counts 1, a tie or \"both bad\" ½ for "
             "each. Brackets are 95% bootstrap CIs. Statistics: docs/report.md.", ""]
    for task, entry in data.items():
        if "absolute" in entry:
            a = entry["absolute"]
            lines += [f"### {task} — absolute ratings", ""]
            rows = [[r["label"], str(r["n"]), *[_pct(r["shares"][g]) for g in "ABCD"], _pct(r["a_or_b"])]
                    for r in a["runs"] if r["n"]]
            lines += table(["model · setting", "ratings", "A", "B", "C", "D", "A or B"], rows) if rows else \
                ["No human ratings yet (`labscale rate --db …`).", ""]
            for j in a["judges"]:
                jrows = [[r["label"], str(r["judges"][j]["n"]), *[_pct(r["judges"][j]["shares"][g]) for g in "ABCD"],
                          str(r["judges"][j]["failures"])] for r in a["runs"] if j in r["judges"]]
                lines += [f"LLM judge `{j}` on the same items:", ""] + table(
                    ["model · setting", "prompts", "A", "B", "C", "D", "parse failures"], jrows)
            lines += [_alpha_text("ordinal", a), ""] + _judge_lines(a, "ordinal") + _consistency_lines(a)
        if "pairwise" in entry:
            p = entry["pairwise"]
            res = p["result"]
            lines += [f"### {task} — pairwise comparisons", ""]
            judge_results = {j: s["result"] for j, s in p["judges"].items()}
            players = list(dict.fromkeys([*res.players, *[x for jr in judge_results.values() for x in jr.players]]))
            first_judge = next(iter(judge_results.values()), None)
            # ranked by the humans' strengths; runs only a judge compared follow, by the first judge's
            order = sorted(players, key=lambda x: (x not in res.strength, -res.strength[x][0] if x in res.strength
                                                   else -(first_judge.strength.get(x, (0,))[0] if first_judge else 0)))
            header = ["rank", "model · setting", "comparisons", "win rate", "Bradley–Terry strength"]
            for j in judge_results:
                header += [f"judge `{j}` win rate", f"judge `{j}` Bradley–Terry"]
            rows = []
            for rank, player in enumerate(order, 1):
                human = player in res.strength
                row = [str(rank), p["labels"].get(player, player), str(res.games.get(player, 0)),
                       _pct(res.win_rate[player]) if human else "n/a", _ci(res.strength[player]) if human else "n/a"]
                for jr in judge_results.values():
                    row += [_pct(jr.win_rate[player]) if player in jr.win_rate else "n/a",
                            _ci(jr.strength[player]) if player in jr.strength else "n/a"]
                rows.append(row)
            lines += table(header, rows)
            notes = [f"{res.comparisons} human comparisons; \"both bad\" in {100 * (res.both_bad or 0):.0f}%. "
                     "Strengths sum to 1 (P(i beats j) = πi / (πi + πj))."]
            if res.regularised:
                notes.append("Some run never lost (or never won): the fit adds ½ virtual win each way per compared "
                             "pair, so strengths are shrunk toward each other.")
            lines += [" ".join(notes), "", _alpha_text("nominal", p), ""] + _judge_lines(p, "nominal") + \
                _consistency_lines(p)
    return lines
