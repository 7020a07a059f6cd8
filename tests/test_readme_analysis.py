"""The README's main job, then every notebook as shipped and every analysis command the README
shows, verbatim, on its output: what a new user does on a fresh clone.

Runs in a scratch directory laid out like a checkout (search_spaces/, analysis/ with the
notebooks copied unchanged), so that the notebooks' default (the newest sweep under results/)
finds the sweep just made and nothing is written into the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_notebooks import NOTEBOOKS, run_notebook

ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB = "python -m ufw.sweep search_spaces/quickstart.yaml"


def readme_commands(section: str, prefixes: tuple[str, ...]) -> list[str]:
    """Command lines of the README's ```bash blocks in ``section`` that start with a prefix
    (comments after '#' dropped)."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith(prefixes):
                commands.append(line)
    return commands


def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "MPLBACKEND": "Agg"}
    env.pop("UFW_RESULTS", None)
    command = command.replace("python ", f"{sys.executable} ", 1)
    return subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, check=False)


@pytest.mark.slow
def test_readme_main_job_then_notebooks_and_analysis_commands(tmp_path, monkeypatch):
    assert MAIN_JOB in (ROOT / "README.md").read_text()
    shutil.copytree(ROOT / "search_spaces", tmp_path / "search_spaces")
    shutil.copytree(ROOT / "analysis", tmp_path / "analysis",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    job = _shell(MAIN_JOB, tmp_path)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    (sweep,) = [d for d in (tmp_path / "results").iterdir() if (d / "trials").is_dir()]

    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("UFW_RESULTS", raising=False)
    for name, files in NOTEBOOKS.items():  # unchanged, from analysis/ as `jupyter lab` runs them
        run_notebook(name, cwd=tmp_path / "analysis")
        for file in files:
            assert (sweep / "analysis" / file).stat().st_size > 0, f"{name}: no {file}"
    def allowed(path: Path) -> bool:
        top = path.relative_to(tmp_path).parts[0]
        return (sweep in path.parents or top == "search_spaces"
                or (path.parent == tmp_path / "analysis" and path.suffix == ".ipynb"))

    written = [p for p in tmp_path.rglob("*") if p.is_file() and not allowed(p)]
    assert not written, f"notebooks wrote outside {sweep.name}/analysis: {written}"

    table = _shell("python -m ufw.analysis", tmp_path).stdout  # the newest sweep: the main job
    assert table.count(f"{sweep.name}") == 1
    assert len([line for line in table.splitlines() if line.startswith("| ")
                and line[2:].strip()[0].isdigit()]) == 8  # one row per configuration

    commands = readme_commands("Analysis", ("python -m ufw.analysis", "python -m ufw.confirm"))
    assert len(commands) >= 3
    for command in commands:
        result = _shell(command.replace("results/<sweep>", f"results/{sweep.name}"), tmp_path)
        assert result.returncode == 0, f"{command}: {result.stderr[-1500:]}"
        assert "config" in result.stdout.lower(), command
    assert any("ufw.confirm" in c for c in commands)
    confirmed = _shell(f"python -m ufw.analysis results/{sweep.name}-confirm --format csv",
                       tmp_path)
    assert confirmed.returncode == 0 and len(confirmed.stdout.splitlines()) == 1 + 3
