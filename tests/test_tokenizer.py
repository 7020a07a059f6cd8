"""The tokenizer data setting: byte-level BPE round trip and cache, the vocabulary in the
results, bits per character, teachers of another tokenizer, and `ufw.train --tokenizer`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ufw.data
import ufw.tokenizer
from ufw.config import ConfigError, preset
from ufw.data import make_corpus, python_docs_text
from ufw.space import parse_space
from ufw.teacher import load_teacher
from ufw.tokenizer import BpeTokenizer, parse_tokenizer
from ufw.train import Population

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"dim": 16, "num_heads": 2, "batch_size": 4, "seq_len": 16, "max_epochs": 1}
# Unicode beyond one byte, tabs, runs of spaces and newlines: what a byte-level BPE must keep.
AWKWARD = "naïve café — 日本語\tx  \n\n   y\r\n€ and 🙂 end "


@pytest.fixture(scope="module")
def texts() -> tuple[str, str]:
    text = python_docs_text()  # printable ASCII
    return text[:20000], text[-3000:]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test trains into its own, empty tokenizer cache."""
    monkeypatch.setattr("ufw.data.CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache" / "tokenizers"


def test_bpe_round_trip_on_text_it_never_saw(texts, cache):
    tokenizer = BpeTokenizer(texts[0], 300, cache)
    assert 256 < len(tokenizer.vocab) <= 300
    for text in (texts[1], AWKWARD, ""):
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    # It learnt merges: the training text takes fewer symbols than bytes.
    assert len(tokenizer.encode(texts[0]).ids) < 0.9 * len(texts[0])


def test_characters_covered_count_each_character_once(texts, cache):
    tokenizer = BpeTokenizer(texts[0], 300, cache)
    encoded = tokenizer.encode(AWKWARD)
    n = len(encoded.ids)
    assert n > len(AWKWARD)  # some characters take more than one byte symbol
    assert encoded.chars_between(1, n - 1) + encoded.ends[0] == len(AWKWARD)
    # Any split of the symbols splits the characters: nothing counted twice or lost.
    for cut in range(1, n - 1):
        assert (encoded.chars_between(1, cut) + encoded.chars_between(cut + 1, n - 1)
                == encoded.chars_between(1, n - 1))


def test_the_tokenizer_is_cached_and_not_trained_again(texts, cache, monkeypatch):
    first = BpeTokenizer(texts[0], 300, cache)
    assert first.path.parent == cache and first.path.suffix == ".json"
    json.loads(first.path.read_text())  # the library's JSON, nothing executable
    written = first.path.stat().st_mtime_ns

    def no_training(*args):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(ufw.tokenizer, "_train_bpe", no_training)
    second = BpeTokenizer(texts[0], 300, cache)
    assert second.vocab == first.vocab and first.path.stat().st_mtime_ns == written
    assert second.encode(texts[1]).ids == first.encode(texts[1]).ids
    # Another size or another training text is another tokenizer: trained, not loaded.
    for text, size in ((texts[0], 280), (texts[0][:-1], 300)):
        with pytest.raises(AssertionError, match="trained again"):
            BpeTokenizer(text, size, cache)


def test_a_damaged_cache_file_is_trained_again(texts, cache):
    first = BpeTokenizer(texts[0], 300, cache)
    first.path.write_text("{not json")
    again = BpeTokenizer(texts[0], 300, cache)
    assert again.vocab == first.vocab
    assert json.loads(first.path.read_text())


def test_bpe_learns_from_the_training_text_only(texts):
    a = make_corpus("a", texts[0], texts[1], batch_size=4, seq_len=16, tokenizer="bpe:300")
    b = make_corpus("b", texts[0], AWKWARD * 40, batch_size=4, seq_len=16,
                    tokenizer="bpe:0300")
    assert a.vocab == b.vocab and b.tokenizer == "bpe:300"
    char = make_corpus("c", texts[0], texts[1], batch_size=4, seq_len=16)
    assert char.tokenizer == "char" and char.vocab == sorted(set(texts[0] + texts[1]))


@pytest.mark.parametrize("spec", ["bpe:0", "bpe:abc", "bpe:256", "bpe:-300", "bpe", "word",
                                  "BPE:300", ""])
def test_bad_tokenizer_settings(spec):
    with pytest.raises(ConfigError, match="tokenizer"):
        parse_tokenizer(spec)


def test_a_space_data_section_sets_the_tokenizer():
    raw = {"fixed": TINY, "parameters": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2}}}
    space = parse_space({**raw, "data": {"tokenizer": "bpe:0400"}})
    assert space.data["tokenizer"] == "bpe:400"
    with pytest.raises(ConfigError, match=r"data\.tokenizer bpe:9"):
        parse_space({**raw, "data": {"tokenizer": "bpe:9"}})


def test_bits_per_character_of_a_hand_made_case(texts):
    corpus = make_corpus("a", texts[0], texts[1], batch_size=4, seq_len=16)
    # 8 targets covering 20 characters at PPL 4: 8 x 2 bits over 20 characters.
    corpus.val_y, corpus.val_chars = torch.zeros(1, 2, 4), 20
    assert corpus.bits_per_char(4.0) == pytest.approx(0.8, rel=1e-12)


@pytest.mark.parametrize("tokenizer", ["char", "bpe:300"])
def test_uniform_predictions_cost_log2_vocab_bits_per_token(texts, tokenizer):
    """A model whose head is zero predicts every symbol with probability 1/V: PPL is V and
    the validation NLL is log2(V) bits per target; per character, over the characters the
    targets cover, counted here by decoding them (ASCII text: no character is split)."""
    corpus = make_corpus("a", texts[0], texts[1], batch_size=4, seq_len=16,
                         tokenizer=tokenizer)
    population = Population([preset("standard_llm").with_overrides(TINY)], corpus)
    with torch.no_grad():
        population.model.p("head").zero_()
    stats = population.objective.evaluate(population.model, corpus.val_batches)
    ppl = stats["ppl"][0].item()
    assert ppl == pytest.approx(corpus.vocab_size, rel=1e-5)
    symbols = make_tokenizer_for(corpus, texts)
    chars = len(symbols.decode(corpus.val_y.flatten().tolist()))
    assert corpus.val_chars == chars
    expected = math.log2(corpus.vocab_size) * corpus.val_y.numel() / chars
    assert corpus.bits_per_char(ppl) == pytest.approx(expected, rel=1e-5)
    if tokenizer == "char":
        assert corpus.bits_per_char(ppl) == pytest.approx(math.log2(ppl), rel=1e-12)
    else:
        assert corpus.chars_per_token > 1.2  # tokens cover several characters


def make_tokenizer_for(corpus, texts):
    return ufw.tokenizer.make_tokenizer(corpus.tokenizer, texts[0], texts[1],
                                        ufw.data.CACHE_DIR / "tokenizers")


def test_rows_record_tokenizer_vocabulary_and_bits_per_character(texts):
    corpus = make_corpus("a", texts[0], texts[1], batch_size=4, seq_len=16,
                         tokenizer="bpe:300")
    population = Population([preset("standard_llm").with_overrides(TINY)], corpus)
    epoch_row = population.run_epoch()[0]
    row = population.results()[0]
    assert (row["tokenizer"], row["vocab_size"]) == ("bpe:300", len(corpus.vocab))
    chars = len(make_tokenizer_for(corpus, texts).decode(corpus.val_y.flatten().tolist()))
    nll_bits = math.log2(row["best_ppl"]) * corpus.val_y.numel()
    assert row["best_bpc"] == pytest.approx(nll_bits / chars, rel=1e-9)
    assert epoch_row["val_bpc"] == row["best_bpc"]


def test_a_teacher_of_another_tokenizer_is_refused(texts, tmp_path):
    char = make_corpus("a", texts[0], texts[1], batch_size=4, seq_len=16)
    bpe = make_corpus("a", texts[0], texts[1], batch_size=4, seq_len=16, tokenizer="bpe:300")
    path = str(tmp_path / "teacher.safetensors")
    Population([preset("standard_llm").with_overrides(TINY)], bpe).save_member(0, path)
    assert load_teacher(path, torch.device("cpu"), bpe.vocab_size, bpe.vocab, "bpe:300")
    with pytest.raises(ConfigError, match="tokenizer bpe:300; this corpus uses char"):
        load_teacher(path, torch.device("cpu"), char.vocab_size, char.vocab, "char")


def test_train_cli_with_bpe_prints_tokenizer_and_bits_per_character(tmp_path):
    text = python_docs_text()
    (tmp_path / "train.txt").write_text(text[:12000])
    (tmp_path / "val.txt").write_text(text[-2000:])
    proc = subprocess.run(
        [sys.executable, "-m", "ufw.train", "--preset", "standard_llm", "--tokenizer", "bpe:300",
         "--train-file", str(tmp_path / "train.txt"), "--val-file", str(tmp_path / "val.txt"),
         *[arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "UFW_CACHE": str(tmp_path / "cache"),
             "OMP_NUM_THREADS": "1"})  # a busy 2-core machine: threads only contend
    row = json.loads(proc.stdout)
    assert row["tokenizer"] == "bpe:300" and 256 < row["vocab_size"] <= 300
    assert row["status"] == "completed" and row["best_ppl"] > 1
    assert 0 < row["best_bpc"] < math.log2(row["best_ppl"])  # a token covers > 1 character
    assert list((tmp_path / "cache" / "tokenizers").glob("bpe-300-*.json"))


@pytest.mark.slow  # a real Ray sweep: about 30 s on 2 cores
def test_a_sweep_trains_on_the_tokens_of_its_space_and_re_trains_on_them(ray_local, tmp_path,
                                                                         capsys):
    """The data section's tokenizer reaches the trials (which load the tokenizer from the
    cache or train it themselves: Ray's workers use their own UFW_CACHE), their rows,
    sweep.json, and `ufw.train --from`."""
    from ufw import sweep, train
    from ufw.results import SWEEP_RECORD, read_epochs, read_trials

    fixed = ", ".join(f"{k}: {v}" for k, v in {**TINY, "max_epochs": 2}.items())
    space = tmp_path / "space.yaml"
    space.write_text(f"fixed: {{{fixed}}}\n"
                     "data: {train_chars: 12000, val_chars: 3000, tokenizer: bpe:300}\n"
                     "parameters:\n  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n")
    results = tmp_path / "results"
    assert sweep.main([str(space), "--results", str(results), "--name", "t",
                       "--num-samples", "1"]) == 0
    rows = read_trials(str(results / "t"))
    row = rows.iloc[0]
    assert (row["tokenizer"], row["status"]) == ("bpe:300", "completed")
    assert 256 < row["vocab_size"] <= 300 and 0 < row["best_bpc"] < math.log2(row["best_ppl"])
    epochs = read_epochs(str(results / "t"))
    best = epochs[epochs["epoch"] == row["best_epoch"]].iloc[0]
    assert best["val_bpc"] == pytest.approx(row["best_bpc"], rel=1e-9)
    record = json.loads((results / "t" / SWEEP_RECORD).read_text())
    assert record["data"]["tokenizer"] == "bpe:300"
    capsys.readouterr()
    assert train.main(["--from", str(results / "t"), "--config-id", row["config_id"]]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["tokenizer"], again["vocab_size"]) == ("bpe:300", row["vocab_size"])
    assert again["best_ppl"] == pytest.approx(row["best_ppl"], rel=1e-4)


def test_analysis_takes_the_new_columns_for_metrics_and_provenance_not_parameters():
    import pandas as pd

    from ufw.analysis import config_means, swept_columns

    trials = pd.DataFrame({
        "config_id": ["a", "a", "b"], "seed": [0, 1, 0], "status": ["completed"] * 3,
        "lr": [1e-3, 1e-3, 2e-3], "best_ppl": [4.0, 5.0, 6.0], "best_bpc": [2.0, 2.5, 3.0],
        "tokenizer": ["bpe:300"] * 3, "vocab_size": [299, 299, 300]})
    assert swept_columns(trials) == ["lr"]
    means = config_means(trials).set_index("config_id")
    assert means.loc["a", "best_bpc"] == 2.25
