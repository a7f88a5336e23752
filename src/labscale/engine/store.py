"""The SQLite store: experiments, runs, the generation cache, predictions and scores, with provenance.

Durability: WAL journal and one transaction per unit of work (a batch of generations, a finished run), so a
process killed at any point leaves either the whole unit or none of it. Runs are keyed by a hash of everything
that determines their result, so a re-run finds finished runs and cached generations and repeats nothing.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from labscale.errors import LabscaleError
from labscale.secrets import redact

# SQLite's application_id header field marks a file as labscale's ('LbSc'); files of older labscale versions
# without it are recognised by their meta table.
APPLICATION_ID = 0x4C625363
SCHEMA_VERSION = "4"  # 2: predictions.error, generations.usage_estimated, notices; 3: group_scores;
# 4: predictions.input and .retrieved_json (rag: the [passage id, score] pairs put in the prompt, best first);
#    rating_sessions and ratings (human evaluation, labscale rate)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    config_json TEXT NOT NULL,
    environment_json TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    model TEXT NOT NULL,
    model_fingerprint TEXT NOT NULL,
    setting TEXT NOT NULL,
    protocol TEXT NOT NULL,
    n_examples INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    decoding_json TEXT NOT NULL,
    task_json TEXT NOT NULL,
    model_json TEXT NOT NULL,
    environment_json TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'complete')),
    started_at REAL,
    finished_at REAL,
    efficiency_json TEXT
);
CREATE TABLE IF NOT EXISTS experiment_runs (
    experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    run_id TEXT NOT NULL REFERENCES runs(id),
    position INTEGER NOT NULL,
    PRIMARY KEY (experiment_id, run_id)
);
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY,
    model_fingerprint TEXT NOT NULL,
    prompt TEXT NOT NULL,
    params_json TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    new_tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    compute_s REAL NOT NULL,
    finish_reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    usage_estimated INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS loglikelihoods (
    key TEXT PRIMARY KEY,
    model_fingerprint TEXT NOT NULL,
    context TEXT NOT NULL,
    continuation TEXT NOT NULL,
    logprob REAL NOT NULL,
    is_greedy INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL,
    compute_s REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS predictions (
    run_id TEXT NOT NULL REFERENCES runs(id),
    position INTEGER NOT NULL,
    example_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    output TEXT NOT NULL,
    prediction TEXT NOT NULL,
    target TEXT NOT NULL,
    cache_keys_json TEXT NOT NULL,
    stats_json TEXT NOT NULL,
    error TEXT,
    input TEXT,
    retrieved_json TEXT,
    PRIMARY KEY (run_id, example_id)
);
CREATE TABLE IF NOT EXISTS notices (
    experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS group_scores (
    run_id TEXT NOT NULL REFERENCES runs(id),
    field TEXT NOT NULL,
    metric TEXT NOT NULL,
    kind TEXT NOT NULL,
    group_name TEXT NOT NULL,
    value REAL,
    ci_low REAL,
    ci_high REAL,
    n INTEGER NOT NULL,
    PRIMARY KEY (run_id, field, metric, kind, group_name)
);
CREATE TABLE IF NOT EXISTS rating_sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    rater TEXT NOT NULL,
    mode TEXT NOT NULL CHECK (mode IN ('absolute', 'pairwise')),
    task TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('human', 'judge')),
    seed INTEGER NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (experiment_id, rater, mode, task)
);
CREATE TABLE IF NOT EXISTS ratings (
    session_id INTEGER NOT NULL REFERENCES rating_sessions(id),
    position INTEGER NOT NULL,
    item TEXT NOT NULL,
    example_id TEXT NOT NULL,
    run_id TEXT NOT NULL REFERENCES runs(id),
    other_run_id TEXT REFERENCES runs(id),
    repeat INTEGER NOT NULL DEFAULT 0,
    rating TEXT,
    seconds REAL,
    raw TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, position)
);
CREATE TABLE IF NOT EXISTS scores (
    run_id TEXT NOT NULL REFERENCES runs(id),
    metric TEXT NOT NULL,
    value REAL,
    ci_low REAL,
    ci_high REAL,
    n INTEGER NOT NULL,
    higher_is_better INTEGER NOT NULL,
    PRIMARY KEY (run_id, metric)
);
"""


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


class NotLabscale(sqlite3.DatabaseError):
    """The file is an SQLite database of something else."""


def require_db(path: Path) -> None:
    """What reads results (reports, exports, rating) needs a database written by `labscale run` at `path`."""
    if not path.is_file():
        raise LabscaleError(f"database '{path}' does not exist",
                            "pass --db PATH of a database written by `labscale run`")


def check_db_path(path: str | Path) -> None:
    """Before any work: refuse a --db that is a folder, not SQLite, or another program's database (read-only)."""
    from labscale.errors import LabscaleError

    path = Path(path)
    if path.is_dir():
        raise LabscaleError(f"--db '{path}' is a folder", "pass the path of a database file, e.g. runs/x.db")
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            owner_problem(conn)
        finally:
            conn.close()
    except NotLabscale as e:
        raise LabscaleError(f"'{path}' is {e}", "pass another --db path (labscale does not write into "
                            "other programs' databases)") from None
    except sqlite3.DatabaseError as e:
        raise LabscaleError(f"'{path}' is not a usable labscale database ({e})", "pass another --db path") from None


def owner_problem(conn: sqlite3.Connection) -> bool:
    """True when the database is new (empty); False when it is labscale's; raises NotLabscale otherwise."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id == APPLICATION_ID:
        return False
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    ours = "meta" in tables and conn.execute("SELECT 1 FROM meta WHERE key='schema_version'").fetchone() is not None
    if app_id != 0 or (tables and not ours):
        shown = ", ".join(sorted(tables)[:5]) or "none"
        raise NotLabscale(f"an SQLite database of another program (application id {app_id:#x}, tables: {shown})")
    return not tables


def open_store(path: str | Path) -> "Store":
    """The store for writing, or a one-line error when the file is not a usable labscale database (another
    program's SQLite database is refused, never written to)."""
    from labscale.errors import LabscaleError

    check_db_path(path)
    try:
        return Store(path)
    except NotLabscale as e:
        raise LabscaleError(f"'{path}' is {e}", "pass another --db path (labscale does not write into "
                            "other programs' databases)") from None
    except sqlite3.DatabaseError as e:
        raise LabscaleError(f"'{path}' is not a usable labscale database ({e})", "pass another --db path") from None


class Store:
    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self._check_owner()
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA)  # idempotent (IF NOT EXISTS); executescript manages its own transaction
            self._migrate()
            self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        self.conn.row_factory = sqlite3.Row

    def _check_owner(self) -> None:
        """Refuse an SQLite file that belongs to another program; mark new (and older labscale) files as ours."""
        try:
            owner_problem(self.conn)
        except NotLabscale:
            self.conn.close()
            raise
        if self.conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            self.conn.execute(f"PRAGMA application_id={APPLICATION_ID}")

    def _migrate(self) -> None:
        """Bring a database written by an older labscale up to this schema (additive changes only)."""
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(predictions)")}
        if "error" not in columns:
            self.conn.execute("ALTER TABLE predictions ADD COLUMN error TEXT")
        if "retrieved_json" not in columns:
            self.conn.execute("ALTER TABLE predictions ADD COLUMN retrieved_json TEXT")
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(generations)")}
        if "usage_estimated" not in columns:
            self.conn.execute("ALTER TABLE generations ADD COLUMN usage_estimated INTEGER NOT NULL DEFAULT 0")
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(predictions)")}
        if "input" not in columns:
            self.conn.execute("ALTER TABLE predictions ADD COLUMN input TEXT")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- experiments and runs -------------------------------------------------------------------------------

    def begin_experiment(self, name: str, config_hash: str, config: dict, environment: dict, runs: list[dict],
                         notices: tuple[str, ...] | list[str] = ()) -> int:
        """Record an experiment invocation, its notices (e.g. skipped models) and its runs (pending unless already
        stored)."""
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO experiments(name, config_hash, config_json, environment_json, started_at) VALUES (?,?,?,?,?)",
                (name, config_hash, _dumps(config), _dumps(environment), time.time()),
            )
            exp_id = cur.lastrowid
            c.executemany("INSERT INTO notices(experiment_id, message) VALUES (?,?)", [(exp_id, m) for m in notices])
            for position, run in enumerate(runs):
                c.execute(
                    """INSERT OR IGNORE INTO runs(id, task, model, model_fingerprint, setting, protocol, n_examples,
                       seed, decoding_json, task_json, model_json, environment_json, config_hash, status)
                       VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,'pending')""",
                    (
                        run["id"], run["task"], run["model"], run["model_fingerprint"], run["setting"],
                        run["protocol"], run["n_examples"], run["seed"], _dumps(run["decoding"]),
                        _dumps(run["task_info"]), _dumps(run["model_info"]), _dumps(environment), config_hash,
                    ),
                )
                c.execute(
                    "INSERT INTO experiment_runs(experiment_id, run_id, position) VALUES (?,?,?)",
                    (exp_id, run["id"], position),
                )
        return int(exp_id)  # type: ignore[arg-type]  # lastrowid of an INSERT

    def finish_experiment(self, exp_id: int) -> None:
        with self.transaction() as c:
            c.execute("UPDATE experiments SET finished_at=? WHERE id=?", (time.time(), exp_id))

    def run_status(self, run_id: str) -> str | None:
        row = self.conn.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()
        return row["status"] if row else None

    def run_failures(self, run_id: str) -> int:
        """Examples of a stored run whose model request failed (re-running the experiment retries them)."""
        return self.conn.execute("SELECT COUNT(*) FROM predictions WHERE run_id=? AND error IS NOT NULL",
                                 (run_id,)).fetchone()[0]

    def complete_run(self, run_id: str, predictions: list[dict], scores: list[dict], efficiency: dict,
                     started_at: float, group_scores: list[dict] | tuple = ()) -> None:
        """Write a run's predictions, scores and per-group scores and mark it complete, all in one transaction."""
        with self.transaction() as c:
            for table in ("predictions", "scores", "group_scores"):
                c.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
            c.executemany(
                """INSERT INTO predictions(run_id, position, example_id, prompt, output, prediction, target,
                   cache_keys_json, stats_json, error, input, retrieved_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)""",
                [
                    (run_id, i, p["example_id"], p["prompt"], p["output"], p["prediction"], p["target"],
                     _dumps(p["cache_keys"]), _dumps(p["stats"]), redact(p.get("error")), p.get("input"),
                     None if p.get("retrieved") is None else _dumps(p["retrieved"]))
                    for i, p in enumerate(predictions)
                ],
            )
            c.executemany(
                "INSERT INTO scores(run_id, metric, value, ci_low, ci_high, n, higher_is_better) VALUES (?,?,?,?,?,?,?)",
                [(run_id, s["metric"], s["value"], s["ci_low"], s["ci_high"], s["n"], int(s["higher_is_better"]))
                 for s in scores],
            )
            c.executemany(
                """INSERT INTO group_scores(run_id, field, metric, kind, group_name, value, ci_low, ci_high, n)
                   VALUES (?,?,?,?,?,?,?,?,?)""",
                [(run_id, g["field"], g["metric"], g["kind"], g["group"], g["value"], g["ci_low"], g["ci_high"], g["n"])
                 for g in group_scores],
            )
            c.execute(
                "UPDATE runs SET status='complete', started_at=?, finished_at=?, efficiency_json=? WHERE id=?",
                (started_at, time.time(), _dumps(efficiency), run_id),
            )

    # -- the generation cache ---------------------------------------------------------------------------------

    def cached_generations(self, keys: list[str]) -> dict[str, sqlite3.Row]:
        return self._fetch("generations", keys)

    def cached_loglikelihoods(self, keys: list[str]) -> dict[str, sqlite3.Row]:
        return self._fetch("loglikelihoods", keys)

    def _fetch(self, table: str, keys: list[str]) -> dict[str, sqlite3.Row]:
        out: dict[str, sqlite3.Row] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 500):
            chunk = unique[i : i + 500]
            q = f"SELECT * FROM {table} WHERE key IN ({','.join('?' * len(chunk))})"
            out.update({row["key"]: row for row in self.conn.execute(q, chunk)})
        return out

    def put_generations(self, rows: list[dict]) -> None:
        now = time.time()
        with self.transaction() as c:
            c.executemany(
                """INSERT OR IGNORE INTO generations(key, model_fingerprint, prompt, params_json, text, prompt_tokens,
                   new_tokens, latency_s, compute_s, finish_reason, created_at, usage_estimated)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?)""",
                [
                    (r["key"], r["model_fingerprint"], r["prompt"], _dumps(r["params"]), r["text"], r["prompt_tokens"],
                     r["new_tokens"], r["latency_s"], r["compute_s"], r["finish_reason"], now,
                     int(r.get("usage_estimated", False)))
                    for r in rows
                ],
            )

    def put_loglikelihoods(self, rows: list[dict]) -> None:
        now = time.time()
        with self.transaction() as c:
            c.executemany(
                """INSERT OR IGNORE INTO loglikelihoods(key, model_fingerprint, context, continuation, logprob,
                   is_greedy, n_tokens, compute_s, created_at) VALUES (?,?,?,?,?,?,?,?,?)""",
                [
                    (r["key"], r["model_fingerprint"], r["context"], r["continuation"], r["logprob"],
                     int(r["is_greedy"]), r["n_tokens"], r["compute_s"], now)
                    for r in rows
                ],
            )

    # -- queries for the report -----------------------------------------------------------------------------

    def latest_experiment(self, name: str | None = None) -> sqlite3.Row | None:
        q = "SELECT * FROM experiments" + (" WHERE name=?" if name else "") + " ORDER BY id DESC LIMIT 1"
        return self.conn.execute(q, (name,) if name else ()).fetchone()

    def require_experiment(self, name: str | None = None) -> sqlite3.Row:
        """`latest_experiment(name)`, or a one-line error when the database holds none (by that name)."""
        exp = self.latest_experiment(name)
        if exp is None:
            what = f"experiment '{name}'" if name else "any experiment"
            raise LabscaleError(f"database '{self.path}' holds no results for {what}", "run `labscale run FILE` first")
        return exp

    def experiment_runs(self, exp_id: int) -> list[sqlite3.Row]:
        return self.conn.execute(
            """SELECT r.* FROM runs r JOIN experiment_runs er ON er.run_id = r.id
               WHERE er.experiment_id=? ORDER BY er.position""",
            (exp_id,),
        ).fetchall()

    def notices(self, exp_id: int) -> list[str]:
        try:
            rows = self.conn.execute("SELECT message FROM notices WHERE experiment_id=? ORDER BY rowid", (exp_id,))
            return [r[0] for r in rows]
        except sqlite3.OperationalError:  # a database from before notices, opened read-only
            return []

    def scores(self, run_id: str) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM scores WHERE run_id=? ORDER BY rowid", (run_id,)).fetchall()

    def group_scores(self, run_id: str) -> list[sqlite3.Row]:
        try:
            return self.conn.execute("SELECT * FROM group_scores WHERE run_id=? ORDER BY rowid", (run_id,)).fetchall()
        except sqlite3.OperationalError:  # a database from before group scores, opened read-only
            return []

    def predictions(self, run_id: str) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM predictions WHERE run_id=? ORDER BY position", (run_id,)).fetchall()

    # -- human evaluation (labscale rate): rater sessions and their ratings -----------------------------------

    def rating_session(self, exp_id: int, rater: str, mode: str, task: str) -> sqlite3.Row | None:
        try:
            return self.conn.execute("SELECT * FROM rating_sessions WHERE experiment_id=? AND rater=? AND mode=? "
                                     "AND task=?", (exp_id, rater, mode, task)).fetchone()
        except sqlite3.OperationalError:  # a database from before ratings, opened read-only
            return None

    def start_rating_session(self, exp_id: int, rater: str, mode: str, task: str, source: str, seed: int) -> sqlite3.Row:
        """The rater's session (created with `seed` the first time; an existing one keeps its seed)."""
        with self.transaction() as c:
            c.execute("""INSERT OR IGNORE INTO rating_sessions(experiment_id, rater, mode, task, source, seed,
                         created_at) VALUES (?,?,?,?,?,?,?)""", (exp_id, rater, mode, task, source, seed, time.time()))
        row = self.rating_session(exp_id, rater, mode, task)
        assert row is not None
        return row

    def put_ratings(self, session_id: int, rows: list[dict]) -> int:
        """Store ratings (one transaction); a position already rated is kept as it was. Returns rows written."""
        with self.transaction() as c:
            before = c.total_changes
            c.executemany(
                """INSERT OR IGNORE INTO ratings(session_id, position, item, example_id, run_id, other_run_id, repeat,
                   rating, seconds, raw, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)""",
                [(session_id, r["position"], r["item"], r["example_id"], r["run_id"], r.get("other_run_id"),
                  int(r.get("repeat", False)), r.get("rating"), r.get("seconds"), r.get("raw"), time.time())
                 for r in rows])
            return c.total_changes - before

    def session_ratings(self, session_id: int) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM ratings WHERE session_id=? ORDER BY position", (session_id,)).fetchall()

    def ratings(self, run_ids: list[str]) -> list[sqlite3.Row]:
        """Every rating of the given runs (pairwise: both runs among them), with its session's rater, mode and
        source; in session and position order."""
        try:
            rows = self.conn.execute(
                """SELECT r.*, s.rater, s.mode, s.source, s.task AS session_task, s.experiment_id FROM ratings r
                   JOIN rating_sessions s ON s.id = r.session_id ORDER BY r.session_id, r.position""").fetchall()
        except sqlite3.OperationalError:  # a database from before ratings, opened read-only
            return []
        ids = set(run_ids)
        return [r for r in rows if r["run_id"] in ids and (r["other_run_id"] is None or r["other_run_id"] in ids)]

    def counts(self) -> dict[str, int]:
        tables = ("experiments", "runs", "generations", "loglikelihoods", "predictions", "scores", "group_scores",
                  "notices")
        return {t: self.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
