import subprocess
import sys

import pytest


@pytest.mark.subprocess
def test_cli_module_imports_nothing_heavy():
    """`labscale --help` must stay fast (< 0.5 s): the CLI module may not import torch, transformers or numpy."""
    code = ("import sys, labscale.cli; heavy = [m for m in ('torch', 'transformers', 'numpy', 'sklearn', 'datasets') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


@pytest.mark.subprocess
def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "labscale", "--help"], capture_output=True, text=True, check=True)
    for command in ("run", "report", "tasks", "models"):
        assert command in out.stdout


@pytest.mark.subprocess
def test_report_without_db_and_no_runs_folder(tmp_path):
    res = subprocess.run([sys.executable, "-m", "labscale", "report"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == "error: no database in runs/ — pass --db PATH"
