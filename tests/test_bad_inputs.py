"""Every bad input of `ufw.train`, `ufw.sweep` and `ufw.analysis` ends with exit status 2 and
one line on stderr naming the problem, no traceback, and nothing started (no output).

The cases run in a scratch directory holding the files they need (named relatively, so that
the table reads the same on every machine). Starting Python and importing torch costs seconds
per process on 2 cores, so each module's cases run one after another in one subprocess (this
file run as a script: `main(argv)` per case, SystemExit and stderr caught), the three modules
in parallel; one case per module also runs as its own `python -m` process, which must behave
the same. The test writes the table of every case, its exit status and its message to
docs/bad_inputs.md (a diff there after a test run means the messages changed).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickle
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ufw.sweep.plan import _save_plan, build_parser, make_plan

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "bad_inputs.md"
MARKER = "payload-ran"  # what the planted teacher's payload would create


class Payload:
    def __reduce__(self):
        return open, (MARKER, "w")


TINY = ("fixed: {dim: 16, num_heads: 2, max_epochs: 1, batch_size: 8, seq_len: 32}\n"
        "data: {train_chars: 8000, val_chars: 4000}\n")
OK_SPACE = TINY + "parameters:\n  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n"
TEXT = "the cat sat on the mat. " * 200

FILES: dict[str, str | bytes] = {
    "latin1.yaml": "dim: 16\n# caf\xe9\n".encode("latin-1"),
    "list.yaml": "- dim: 16\n- dim: 32\n",
    "broken.yaml": "dim: [16,\n",
    "colour.yaml": "colour: red\n",
    "train.txt": TEXT,
    "val.txt": TEXT,
    "empty.txt": "",
    "binary.txt": bytes(range(256)) * 8,
    "notes.pt": "not a model\n",
    "space_empty.yaml": "",
    "space_latin1.yaml": (OK_SPACE + "# caf\xe9\n").encode("latin-1"),
    "space_list.yaml": "- lr\n- dim\n",
    "space_broken.yaml": "parameters: {lr: [\n",
    "space_colour.yaml": OK_SPACE + "colour: red\n",
    "space_low_high.yaml": TINY + "parameters:\n  lr: {type: float, low: 0.1, high: 0.01}\n",
    "space_type.yaml": TINY + "parameters:\n  lr: {type: gaussian, low: 0, high: 1}\n",
    "space_key.yaml": TINY + "parameters:\n  learning_rate: {type: float, low: 0, high: 1}\n",
    "space_choices.yaml": TINY + "parameters:\n  lr: {type: categorical, choices: []}\n",
    "space_log.yaml": TINY + "parameters:\n  lr: {type: float, low: 0, high: 1, log: true}\n",
    "space_value.yaml": TINY + "parameters:\n  routing_threshold: {type: float, low: 0.5, "
                               "high: 1.5}\n",
    "space_metric.yaml": OK_SPACE + "objectives: [{metric: happiness}]\n",
    "space_two_objectives.yaml": OK_SPACE + ("objectives: [{metric: best_ppl}, "
                                             "{metric: compute_cost}]\n"),
    "space_sampler.yaml": OK_SPACE + "sampler: annealing\n",
    "space_grid.yaml": OK_SPACE + "sampler: grid\n",
    "space_condition.yaml": TINY + "parameters:\n  lr: {type: float, low: 0.001, high: 0.01, "
                                   "condition: {schedule: step}}\n",
    "space_seed.yaml": "fixed: {seed: 3}\n" + OK_SPACE.replace("fixed", "defaults: {}\n#"),
    "space_fixed_only.yaml": TINY,
    "space_defaults.yaml": OK_SPACE + "defaults: {num_samples: -4}\n",
    "space_teacher.yaml": OK_SPACE.replace("seq_len: 32}", "seq_len: 32, teacher: notes.pt}"),
    "space_epochs.yaml": OK_SPACE.replace("max_epochs: 1", "max_epochs: 1000000000"),
    "space_data.yaml": OK_SPACE + "data: {data: nope}\n",
    "space_tokenizer.yaml": OK_SPACE + "data: {tokenizer: bpe:100}\n",
    "ok.yaml": OK_SPACE,
    "results_file": "a file, not a directory\n",
}


@dataclass
class Case:
    name: str
    module: str  # train, sweep, analysis
    args: list[str]
    expect: str  # a part of the message


T, S, A = "train", "sweep", "analysis"
TRAIN = ["--preset", "standard_llm", "--train-file", "train.txt", "--val-file", "val.txt"]
CASES = [
    # ------------------------------------------------------------------ ufw.train
    Case("no configuration", T, [], "is required"),
    Case("unknown preset", T, ["--preset", "best"], "preset: unknown 'best'"),
    Case("--config missing", T, ["--config", "nope.yaml"], "No such file"),
    Case("--config not UTF-8", T, ["--config", "latin1.yaml"], "not UTF-8"),
    Case("--config a YAML list", T, ["--config", "list.yaml"], "must be a mapping"),
    Case("--config invalid YAML", T, ["--config", "broken.yaml"], "invalid YAML"),
    Case("--config unknown key", T, ["--config", "colour.yaml"], "colour: unknown config key"),
    Case("--set without =", T, [*TRAIN, "--set", "dim"], "expected KEY=VALUE"),
    Case("--set invalid YAML", T, [*TRAIN, "--set", "lr=[1"], "not valid YAML"),
    Case("--set unknown key", T, [*TRAIN, "--set", "learning_rate=1"], "unknown config key"),
    Case("--set dim=100000 (memory)", T, [*TRAIN, "--set", "dim=100000"], "memory:"),
    Case("--set max_epochs=1000000000", T, [*TRAIN, "--set", "max_epochs=1000000000"],
         "max_epochs: must be at most"),
    Case("--set patience too large", T, [*TRAIN, "--set", "patience=10000000"], "patience"),
    Case("--set lr negative", T, [*TRAIN, "--set", "lr=-1"], "lr: must be a number > 0"),
    Case("--set lr text", T, [*TRAIN, "--set", "lr=fast"], "lr: must be a number > 0"),
    Case("--set routing_threshold=1.5", T, [*TRAIN, "--set", "routing_threshold=1.5"],
         "routing_threshold"),
    Case("--set num_heads=3", T, [*TRAIN, "--set", "num_heads=3"], "num_heads"),
    Case("--set layer_weights.9", T, [*TRAIN, "--set", "layer_weights.9=1"], "layer_weights"),
    Case("--set layer_weights.x", T, [*TRAIN, "--set", "layer_weights.x=1"], "layer_weights.x"),
    Case("--set exit_layer=3", T, [*TRAIN, "--set", "exit_layer=3"], "exit_layer"),
    Case("--set batch_size=0", T, [*TRAIN, "--set", "batch_size=0"], "batch_size"),
    Case("--set experts_top_k > num_experts", T, [*TRAIN, "--set", "experts_top_k=2"],
         "experts_top_k"),
    Case("--set confidence_method unknown", T, [*TRAIN, "--set", "confidence_method=psychic"],
         "confidence_method"),
    Case("--set alpha_schedule.type unknown", T,
         [*TRAIN, "--set", "alpha_schedule.type=wavy"], "schedule_type"),
    Case("teacher: a pickle payload", T, [*TRAIN, "--set", "teacher=evil.pt"], "teacher"),
    Case("teacher: a text file", T, [*TRAIN, "--set", "teacher=notes.pt"], "teacher"),
    Case("teacher: missing file", T, [*TRAIN, "--set", "teacher=nope.pt"], "teacher"),
    Case("--seed negative", T, [*TRAIN, "--seed", "-1"], "seed"),
    Case("--seed text", T, [*TRAIN, "--seed", "abc"], "invalid int value"),
    Case("--device unknown", T, [*TRAIN, "--device", "tpu"], "--device"),
    Case("empty training file", T, ["--preset", "lpt", "--train-file", "empty.txt",
                                    "--val-file", "val.txt"], "no full batch"),
    Case("--train-file without --val-file", T, ["--preset", "lpt", "--train-file", "train.txt"],
         "give both"),
    Case("--train-file missing", T, ["--preset", "lpt", "--train-file", "nope.txt",
                                     "--val-file", "val.txt"], "cannot read"),
    Case("--train-file binary", T, ["--preset", "lpt", "--train-file", "binary.txt",
                                    "--val-file", "val.txt"], "UTF-8"),
    Case("--train-chars too few", T, [*TRAIN, "--train-chars", "10"], "no full batch"),
    Case("--train-chars 0", T, [*TRAIN, "--train-chars", "0"], "positive integer"),
    Case("--data unknown", T, ["--preset", "lpt", "--data", "nope"], "unknown corpus"),
    Case("--data wikitext2:missing", T, ["--preset", "lpt", "--data", "wikitext2:nope"],
         "no such directory"),
    Case("--tokenizer bpe:0", T, [*TRAIN, "--tokenizer", "bpe:0"], "N must be an integer"),
    Case("--tokenizer bpe:abc", T, [*TRAIN, "--tokenizer", "bpe:abc"], "N must be an integer"),
    Case("--tokenizer bpe:256 (bytes, no merge)", T, [*TRAIN, "--tokenizer", "bpe:256"],
         ">= 257"),
    Case("--tokenizer unknown kind", T, [*TRAIN, "--tokenizer", "word"], "unknown 'word'"),
    # ------------------------------------------------------------------ ufw.sweep
    Case("space missing", S, ["nope.yaml"], "No such file"),
    Case("space empty", S, ["space_empty.yaml"], "the file is empty"),
    Case("space not UTF-8", S, ["space_latin1.yaml"], "not UTF-8"),
    Case("space a YAML list", S, ["space_list.yaml"], "must be a mapping"),
    Case("space invalid YAML", S, ["space_broken.yaml"], "invalid YAML"),
    Case("space unknown top-level key", S, ["space_colour.yaml"], "colour"),
    Case("parameter low > high", S, ["space_low_high.yaml"], "greater than high"),
    Case("parameter unknown type", S, ["space_type.yaml"], "type: unknown"),
    Case("parameter unknown config key", S, ["space_key.yaml"], "learning_rate"),
    Case("categorical without choices", S, ["space_choices.yaml"], "choices"),
    Case("log with low 0", S, ["space_log.yaml"], "log"),
    Case("parameter bound invalid", S, ["space_value.yaml"], "routing_threshold"),
    Case("objective unknown metric", S, ["space_metric.yaml"], "happiness"),
    Case("sampler unknown", S, ["space_sampler.yaml"], "annealing"),
    Case("grid of a float parameter", S, ["space_grid.yaml"], "categorical"),
    Case("condition on a missing parameter", S, ["space_condition.yaml"], "schedule"),
    Case("fixed seed", S, ["space_seed.yaml"], "fixed.seed"),
    Case("no parameters, several samples", S, ["space_fixed_only.yaml"], "same configuration"),
    Case("defaults num_samples negative", S, ["space_defaults.yaml"], "num_samples"),
    Case("fixed teacher not a ufw model", S, ["space_teacher.yaml"], "teacher"),
    Case("fixed max_epochs=1000000000", S, ["space_epochs.yaml"], "max_epochs"),
    Case("space data unknown", S, ["space_data.yaml"], "unknown corpus"),
    Case("space data tokenizer too small", S, ["space_tokenizer.yaml"], "data.tokenizer"),
    Case("--tokenizer unknown kind", S, ["ok.yaml", "--tokenizer", "bpe"], "--tokenizer"),
    Case("--pruner unknown", S, ["ok.yaml", "--pruner", "sometimes"], "--pruner"),
    Case("--pruner with two objectives", S, ["space_two_objectives.yaml", "--pruner", "asha"],
         "--pruner"),
    Case("--min-resource 0", S, ["ok.yaml", "--pruner", "asha", "--min-resource", "0"],
         "--min-resource"),
    Case("--reduction-factor 1", S, ["ok.yaml", "--pruner", "asha", "--reduction-factor", "1"],
         "--reduction-factor"),
    Case("--max-resource below --min-resource", S,
         ["ok.yaml", "--pruner", "hyperband", "--min-resource", "4", "--max-resource", "2"],
         "--max-resource"),
    Case("--num-samples 0", S, ["ok.yaml", "--num-samples", "0"], "--num-samples"),
    Case("--cohort 0", S, ["ok.yaml", "--cohort", "0"], "--cohort"),
    Case("--cohort text", S, ["ok.yaml", "--cohort", "many"], "--cohort"),
    Case("--seeds 0", S, ["ok.yaml", "--seeds", "0"], "--seeds"),
    Case("--max-concurrent 0", S, ["ok.yaml", "--max-concurrent", "0"], "--max-concurrent"),
    Case("--cpus-per-trial 0", S, ["ok.yaml", "--cpus-per-trial", "0"], "--cpus-per-trial"),
    Case("--gpus-per-trial negative", S, ["ok.yaml", "--gpus-per-trial", "-1"],
         "--gpus-per-trial"),
    Case("--resources-per-trial not JSON", S, ["ok.yaml", "--resources-per-trial", "a100"],
         "not JSON"),
    Case("--resources-per-trial CPU", S, ["ok.yaml", "--resources-per-trial", '{"CPU": 1}'],
         "not a custom resource"),
    Case("--checkpoint-seconds negative", S, ["ok.yaml", "--checkpoint-seconds", "-1"],
         "--checkpoint-seconds"),
    Case("--precision unknown", S, ["ok.yaml", "--precision", "fp8"], "invalid choice"),
    Case("--name with a path", S, ["ok.yaml", "--name", "../x"], "--name"),
    # ray.init would retry such an address for many minutes
    Case("--address where nothing answers", S, ["ok.yaml", "--address", "127.0.0.1:1"],
         "nothing answers"),
    Case("--set dim=100000 (memory)", S, ["ok.yaml", "--set", "dim=100000"], "memory:"),
    Case("--set unknown key", S, ["ok.yaml", "--set", "colour=red"], "colour"),
    Case("--set max_epochs=1000000000", S, ["ok.yaml", "--set", "max_epochs=1000000000"],
         "max_epochs"),
    Case("--train-file empty", S, ["ok.yaml", "--train-file", "empty.txt", "--val-file",
                                   "val.txt"], "no full batch"),
    Case("--resume with nothing to resume", S, ["ok.yaml", "--resume"], "--resume"),
    Case("--resume, Ray's state cut short", S, ["ok.yaml", "--resume", "--name", "cut",
                                                "--results", "cut_results"], "cut short"),
    Case("--results is a file", S, ["ok.yaml", "--results", "results_file", "--name", "x"],
         "--results"),
    Case("--results not writable", S, ["ok.yaml", "--results", "/sys/ufw-results", "--name",
                                       "x"], "--results"),
    # ------------------------------------------------------------------ ufw.analysis
    Case("results missing", A, ["nope"], "no such results directory"),
    Case("results empty", A, ["empty_results"], "no results"),
    Case("results a file", A, ["results_file"], "no such results directory"),
    Case("a part that is not Parquet", A, ["junk_results"], "junk_results"),
    Case("a part without the columns", A, ["columns_results"], "lack required column"),
    Case("--format unknown", A, ["columns_results", "--format", "xml"], "invalid choice"),
    Case("--confidence 2", A, ["good_results", "--confidence", "2"], "confidence"),
    Case("--baseline unknown", A, ["good_results", "--baseline", "best_model"], "best_model"),
    Case("--by unknown column", A, ["good_results", "--by", "colour"], "colour"),
]


def make_files(directory: Path) -> None:
    for name, content in FILES.items():
        path = directory / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    (directory / "evil.pt").write_bytes(pickle.dumps({"state": Payload()}))
    (directory / "empty_results").mkdir()
    (directory / "junk_results" / "trials").mkdir(parents=True)
    (directory / "junk_results" / "trials" / "part-x.parquet").write_text("not parquet")
    (directory / "columns_results" / "trials").mkdir(parents=True)
    pq.write_table(pa.table({"colour": ["red"]}),
                   directory / "columns_results" / "trials" / "part-x.parquet")
    good = {"sweep": ["s"] * 4, "trial_id": ["a", "a", "b", "b"], "member": [0, 1, 0, 1],
            "seed": [42, 43, 42, 43], "config_id": ["c1", "c1", "c2", "c2"],
            "preset": ["standard_llm"] * 2 + ["lpt"] * 2, "best_ppl": [9.0, 9.2, 8.8, 8.9],
            "best_epoch": [3, 4, 3, 5], "acc": [0.3] * 4, "shallow_ratio": [0.0] * 4,
            "compute_cost": [1.0] * 4, "status": ["completed"] * 4, "error": [""] * 4}
    # A sweep whose Ray experiment state a full disk cut short, with no copy of it left.
    plan = make_plan(build_parser().parse_args([str(directory / "ok.yaml"), "--name", "cut",
                                                "--results", str(directory / "cut_results")]))
    _save_plan(plan)
    experiment = directory / "cut_results" / "cut" / "ray"
    experiment.mkdir()
    (experiment / "tuner.pkl").write_bytes(b"never read: the resume stops before Ray")
    (experiment / "experiment_state-1999-12-31_23-59-59.json").write_text('{"trial_data": [')
    (directory / "good_results" / "trials").mkdir(parents=True)
    pq.write_table(pa.table(good), directory / "good_results" / "trials" / "part-a.parquet")


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run_alone(case: Case, directory: Path) -> dict[str, object]:
    """`python -m ufw.<module> ARGS` as its own process."""
    result = subprocess.run([sys.executable, "-m", f"ufw.{case.module}", *case.args],
                            cwd=directory, env=environment(), capture_output=True, text=True,
                            timeout=120)
    return {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}


def run_module_cases(module: str, directory: Path) -> list[dict[str, object]]:
    """Every case of `module`, one after another in one subprocess (see the docstring)."""
    result = subprocess.run([sys.executable, __file__, module, str(directory)], cwd=directory,
                            env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def run_in_this_process(module: str, directory: Path) -> list[dict[str, object]]:
    os.chdir(directory)
    main = importlib.import_module(f"ufw.{module}").main
    results = []
    for case in [c for c in CASES if c.module == module]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(case.args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
        results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    return results


def command(case: Case) -> str:
    quoted = [a if a and all(c.isalnum() or c in "-_.=/:," for c in a) else f"'{a}'"
              for a in case.args]
    return " ".join(["python -m", f"ufw.{case.module}", *quoted])


def write_table(rows: list[tuple[Case, object, str]]) -> None:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("`", "'")

    lines = ["# Bad inputs", "",
             "Every bad input tried by `tests/test_bad_inputs.py` (which writes this file): the",
             "command, run in a directory holding the files it names, its exit status and its",
             "one line on stderr. None prints a traceback, and none starts any work.", "",
             "| case | command | exit | message |", "|---|---|---|---|"]
    for case, status, message in rows:
        lines.append(f"| {cell(case.name)} | `{cell(command(case))}` | {status} | "
                     f"{cell(message)} |")
    TABLE.write_text("\n".join(lines) + "\n")


def test_every_bad_input_is_one_line_and_exit_2(tmp_path):
    assert len(CASES) >= 60 and len({c.name + c.module for c in CASES}) == len(CASES)
    make_files(tmp_path)
    modules = [T, S, A]
    alone = [next(c for c in CASES if c.module == m and c.args) for m in modules]
    with ThreadPoolExecutor(max_workers=3) as pool:
        batches = list(pool.map(lambda m: run_module_cases(m, tmp_path), modules))
        single = list(pool.map(lambda c: run_alone(c, tmp_path), alone))
    results = {}
    for module, batch in zip(modules, batches):
        results.update(zip([c.name + module for c in CASES if c.module == module], batch))
    rows, problems = [], []
    for case in CASES:
        result = results[case.name + case.module]
        stderr, stdout = str(result["stderr"]), str(result["stdout"])
        lines = stderr.strip().splitlines()
        message = " / ".join(lines).replace(str(tmp_path), ".")
        rows.append((case, result["returncode"], message))
        if (result["returncode"] != 2 or len(lines) != 1 or "Traceback" in stderr
                or stdout.strip() or case.expect not in message):
            problems.append(f"{case.module} {case.name}: exit {result['returncode']}, stdout "
                            f"{stdout.strip()[:200]!r}, stderr {stderr[-600:]!r}")
    write_table(rows)
    assert not problems, "\n".join(problems)
    # As a process of its own, a case exits and prints the same (nothing else on stderr).
    for case, result in zip(alone, single):
        assert result == results[case.name + case.module], (case.name, result)
    assert not (tmp_path / MARKER).exists()  # the planted teacher never ran


if __name__ == "__main__":  # run_module_cases: python tests/test_bad_inputs.py MODULE DIR
    print(json.dumps(run_in_this_process(sys.argv[1], Path(sys.argv[2]))), file=sys.__stdout__)
