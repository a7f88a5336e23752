"""labscale: can a small open model compete with a large closed one on your task, and at what cost?

Library use (the same runner as `labscale run`):

    import labscale
    results = labscale.run_experiment("examples/quickstart.yaml", db="runs/quickstart.db", limit=5)
    results.to_pandas()                      # scores with 95% CIs, one row per run × metric
    labscale.load_results("runs/quickstart.db").score("fact-check", "embedded:smollm2-135m-instruct")

Imports are lazy, so `import labscale` (and `labscale --help`) stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_results", "run_experiment"]


def run_experiment(experiment, db=None, limit=None, **kwargs):
    """Run (or resume) an experiment file or `labscale.config.Experiment`; see labscale.experiment."""
    from labscale.experiment import run_experiment as run

    return run(experiment, db=db, limit=limit, **kwargs)


def load_results(db, experiment=None):
    """Stored results of an experiment; see labscale.results."""
    from labscale.results import load_results as load

    return load(db, experiment)
