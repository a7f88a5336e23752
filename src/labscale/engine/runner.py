"""Execute planned runs through the generation cache, score them, and store everything.

Resume: finished runs are skipped; inside a run, every batch of generations is committed to the cache as soon as
it is produced, so a killed process loses at most the batch in flight and a re-run regenerates nothing stored.
"""

from __future__ import annotations

import json
import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from labscale.answers import parse_answer
from labscale.engine.cache import Counts, GenerationCache, generation_key, loglikelihood_key
from labscale.engine.parallel import LOCAL, Executor
from labscale.engine.plan import RunPlan
from labscale.engine.store import Store
from labscale.example import UNPARSEABLE, Outcome
from labscale.models.base import LoglikelihoodRequest


def _chunks(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


PLAIN_INTERVAL_S = 30.0  # seconds between plain progress lines of one run


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class PlainProgress:
    """Progress for a stderr that is not a terminal: one line when a run starts, one every PLAIN_INTERVAL_S
    seconds while it runs (done/total examples, rate, ETA), and one when it ends. The part of `rich.progress
    .Progress` the runner uses (add_task, advance, a context manager)."""

    def __init__(self, console: Console, n_runs: int):
        self.console = console
        self.n_runs = n_runs
        self.runs: list[dict] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def _say(self, run: dict, text: str) -> None:
        self.console.print(f"evaluate [{run['index']}/{self.n_runs}] {run['label']}: {text}", markup=False,
                           highlight=False, soft_wrap=True)

    def add_task(self, description: str, total: int, completed: int = 0) -> int:
        now = time.monotonic()
        run = {"index": len(self.runs) + 1, "label": description, "total": total, "done": completed,
               "started": now, "last": now, "base": None, "base_t": now}
        self.runs.append(run)
        if completed >= total:
            self._say(run, f"{completed}/{total} examples")
        else:
            self._say(run, f"{completed}/{total} examples, starting")
        return len(self.runs) - 1

    def advance(self, task_id: int, n: int) -> None:
        run = self.runs[task_id]
        run["done"] += n
        now = time.monotonic()
        if run["base"] is None:  # the first advance is what the cache already held: rates count from here
            run["base"], run["base_t"] = run["done"], now
        done, total = run["done"], run["total"]
        if done >= total:
            self._say(run, f"{done}/{total} examples, done in {_duration(now - run['started'])}")
        elif now - run["last"] >= PLAIN_INTERVAL_S:
            run["last"] = now
            made, elapsed = done - run["base"], now - run["base_t"]
            rate = made / elapsed if elapsed > 0 and made > 0 else None
            eta = f", ETA {_duration((total - done) / rate)}" if rate else ""
            per_s = f"{rate:.2f}/s" if rate else "rate n/a"
            self._say(run, f"{done}/{total} examples ({per_s}{eta})")


class Runner:
    """`executor`: where model calls run (engine/parallel.py; in this process by default)."""

    def __init__(self, store: Store, console: Console | None = None, bootstrap_samples: int = 1000,
                 cost_limit: float | None = None, executor: Executor = LOCAL):
        from labscale.efficiency.cost import SpendingCap

        self.executor = executor
        self.store = store
        self.console = console or Console(stderr=True)
        self.bootstrap_samples = bootstrap_samples
        self.generations = Counts()
        self.loglikelihoods = Counts()
        self.cap = SpendingCap(cost_limit)

    def estimate(self, plans: list[RunPlan]) -> list[tuple[int, int]]:
        """(requests, of them already cached) per run, before any work: what `run_all` will ask the models."""
        out = []
        for plan in plans:
            n = plan.requests
            if self._stored(plan):
                out.append((n, n))
                continue
            fp = plan.backend.info.fingerprint
            if plan.protocol == "loglikelihood":
                keys = [loglikelihood_key(fp, it.prompt, c) for it in plan.items for c in it.continuations]
                have = self.store.cached_loglikelihoods(keys)
            else:
                params = plan.decoding.key()
                keys = [generation_key(fp, it.prompt, params) for it in plan.items]
                have = self.store.cached_generations(keys)
            out.append((n, sum(k in have for k in keys)))
        return out

    def _stored(self, plan: RunPlan) -> bool:
        return self.store.run_status(plan.id) == "complete" and not self.store.run_failures(plan.id)

    def run_all(self, plans: list[RunPlan]) -> None:
        """Every run, with a rich progress bar on a terminal and plain periodic lines otherwise (CI logs, a pipe)."""
        progress: Progress | PlainProgress
        if self.console.is_terminal:
            progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=self.console, transient=False,
            )
        else:
            progress = PlainProgress(self.console, len(plans))
        with progress:
            for i, plan in enumerate(plans):
                if self._stored(plan):
                    counts = self.loglikelihoods if plan.protocol == "loglikelihood" else self.generations
                    counts.cached += plan.requests
                    progress.add_task(f"{plan.label} (stored)", total=len(plan.items), completed=len(plan.items))
                else:
                    bar = progress.add_task(plan.label, total=len(plan.items))
                    self._run(plan, lambda n, bar=bar: progress.advance(bar, n))
                # Free a model's weights once its last run is done.
                if i + 1 == len(plans) or plans[i + 1].backend is not plan.backend:
                    self.executor.close(plan.backend)

    def _run(self, plan: RunPlan, advance) -> None:
        from labscale.efficiency.meter import PeakRSS

        started = time.time()
        self._retries = 0
        with PeakRSS() as mem:
            if plan.protocol == "loglikelihood":
                outcomes, keys, records = self._loglikelihood(plan, advance)
            else:
                outcomes, keys, records = self._generate(plan, advance)
            predictions, scores, group_scores = self._score(plan, outcomes, keys)
        efficiency = self._efficiency(plan, outcomes, records, time.time() - started, mem.peak_bytes)
        failed = efficiency.get("failed")
        if failed:
            self.console.print(f"[yellow]{plan.label}: {failed} of {len(outcomes)} requests failed after retries "
                               "(scored as wrong; re-run the experiment to retry them)[/]")
        self.store.complete_run(plan.id, predictions, scores, efficiency, started, group_scores)

    # -- model calls through the cache ---------------------------------------------------------------------

    def _generate(self, plan: RunPlan, advance):
        calls = GenerationCache(self.store, self.generations, self.cap, self.executor).generate(
            plan.backend, [(it.prompt, it.tokens) for it in plan.items], plan.decoding, plan.model.batch_size, advance)
        self._retries += calls.retries
        outcomes = []
        for key, it in zip(calls.keys, plan.items):
            if key in calls.failures:
                outcomes.append(Outcome(it.example, "", UNPARSEABLE, failed=calls.failures[key]))
                continue
            text = calls.rows[key]["text"]
            prediction = parse_answer(plan.task, it.example, text, cot=plan.setting.kind == "cot")
            outcomes.append(Outcome(it.example, text, prediction, retrieved=it.retrieved))
        return outcomes, [[k] for k in calls.keys], [calls.rows[k] for k in dict.fromkeys(calls.keys)
                                                      if k in calls.rows]

    def _loglikelihood(self, plan: RunPlan, advance):
        fp = plan.backend.info.fingerprint
        keys = [[loglikelihood_key(fp, it.prompt, c) for c in it.continuations] for it in plan.items]
        flat = [k for ks in keys for k in ks]
        have = self.store.cached_loglikelihoods(flat)
        todo: dict[str, tuple[str, str, int]] = {}
        for ks, it in zip(keys, plan.items):
            for k, c in zip(ks, it.continuations):
                if k not in have and k not in todo:
                    todo[k] = (it.prompt, c, it.tokens)
        self.loglikelihoods.cached += sum(k in have for k in flat)
        done_examples = sum(1 for ks in keys if all(k in have for k in ks))
        advance(done_examples)
        pending = sorted(todo.items(), key=lambda kv: -kv[1][2])
        size = plan.model.batch_size * 4  # cheap forward passes: larger commits
        for chunk in _chunks(pending, size * self.executor.width_for(plan.backend)):
            results = self.executor.loglikelihood(
                plan.backend, [LoglikelihoodRequest(ctx, c) for _, (ctx, c, _) in chunk], size)
            self.store.put_loglikelihoods([
                {"key": key, "model_fingerprint": fp, "context": ctx, "continuation": c, "logprob": r.logprob,
                 "is_greedy": r.is_greedy, "n_tokens": r.n_tokens, "compute_s": r.compute_s}
                for (key, (ctx, c, _)), r in zip(chunk, results)
            ])
            self.loglikelihoods.new += len(chunk)
            have.update({key: True for key, _ in chunk})
            now_done = sum(1 for ks in keys if all(k in have for k in ks))
            advance(now_done - done_examples)
            done_examples = now_done
        rows = self.store.cached_loglikelihoods(flat)
        outcomes = []
        for ks, it in zip(keys, plan.items):
            logprobs = [rows[k]["logprob"] for k in ks]
            best = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))  # first max, as np.argmax
            outcomes.append(Outcome(it.example, json.dumps({"logprobs": logprobs}), it.example.choices[best], logprobs,
                                    retrieved=it.retrieved))
        return outcomes, keys, [rows[k] for k in dict.fromkeys(flat)]

    # -- scoring and bookkeeping ---------------------------------------------------------------------------

    def _score(self, plan: RunPlan, outcomes: list[Outcome], keys: list[list[str]]):
        from labscale.metrics.groups import group_breakdown
        from labscale.metrics.registry import get_metric
        from labscale.metrics.stats import bootstrap_ci

        per_example: list[dict] = [{} for _ in outcomes]
        scores: list[dict] = []
        group_scores: list[dict] = []
        labels = {f: [_group_label(o.example.meta.get(f)) for o in outcomes] for f in plan.task.group_fields}
        every_request_failed = all(o.failed is not None for o in outcomes)
        for name in [] if every_request_failed else plan.task.metrics:  # no score from no answer at all
            metric = get_metric(name)
            stats = metric.stats(outcomes)
            value = metric.aggregate(stats)
            low, high = bootstrap_ci(stats, metric.aggregate, n_boot=self.bootstrap_samples, seed=plan.seed)
            scores.append({"metric": name, "value": _finite(value), "ci_low": _finite(low), "ci_high": _finite(high),
                           "n": len(outcomes), "higher_is_better": metric.higher_is_better})
            for row, s in zip(per_example, stats.tolist()):
                row[name] = s
            for field, field_labels in labels.items():
                group_scores += [
                    {**g, "field": field, "metric": name, "value": _finite(g["value"]), "ci_low": _finite(g["ci_low"]),
                     "ci_high": _finite(g["ci_high"])}
                    for g in group_breakdown(stats, metric.aggregate, field_labels, metric.higher_is_better,
                                             n_boot=self.bootstrap_samples, seed=plan.seed)
                ]
        predictions = [
            {"example_id": o.example.id, "prompt": it.prompt, "output": o.output, "prediction": o.prediction,
             "target": o.example.target, "cache_keys": ks, "stats": stats, "error": o.failed,
             "input": o.example.input,
             "retrieved": None if it.retrieved is None else [[h.passage_id, h.score] for h in it.retrieved]}
            for o, it, ks, stats in zip(outcomes, plan.items, keys, per_example)
        ]
        return predictions, scores, group_scores

    def _efficiency(self, plan: RunPlan, outcomes: list[Outcome], records, wall_s: float, peak_rss: int) -> dict:
        compute_s = sum(r["compute_s"] for r in records)
        n = len(plan.items)
        eff = {"examples": n, "compute_s": compute_s, "wall_s": wall_s, "peak_rss_bytes": peak_rss,
               "peak_accelerator_bytes": plan.backend.peak_memory_bytes(),
               "examples_per_s": n / compute_s if compute_s > 0 else None}
        if self.executor.width_for(plan.backend) > 1:  # compute_s sums every process's time
            eff["processes"] = self.executor.width_for(plan.backend)
        if plan.protocol == "generate":
            new_tokens = sum(r["new_tokens"] for r in records)
            eff.update(
                new_tokens=new_tokens, prompt_tokens=sum(r["prompt_tokens"] for r in records),
                new_tokens_per_s=new_tokens / compute_s if compute_s > 0 else None,
                mean_latency_s=sum(r["latency_s"] for r in records) / len(records) if records else None,
                truncated=sum(1 for r in records if r["finish_reason"] == "length"),
                failed=sum(o.failed is not None for o in outcomes), retries=self._retries,
            )
            info = plan.backend.info
            if info.price is not None or info.is_remote:
                from dataclasses import asdict

                from labscale.efficiency.cost import cost_usd

                eff.update(cost_usd=cost_usd(info.price, eff["prompt_tokens"], new_tokens),
                           price_per_million=asdict(info.price) if info.price else None,
                           usage_estimated=sum(r["usage_estimated"] for r in records))
        return eff


def _group_label(value) -> str | None:
    """A group field's value as a label; None (e.g. a counterfactual task's original inputs) stays out of groups."""
    return None if value is None else str(value)


def _finite(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
