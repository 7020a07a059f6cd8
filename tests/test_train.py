"""The trainer's arithmetic and the population invariant (docs/design.md)."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from ufw.config import AlphaSchedule, preset
from ufw.data import make_corpus, python_docs_text
from ufw.model import attention_kernel
from ufw.routing import assign_exits, confidence, routed_metrics
from ufw.train import (
    MemberRecord,
    Population,
    PopulationAdamW,
    UniversalTrainer,
    active_layers,
    train,
)

TINY = {"dim": 16, "num_heads": 2, "batch_size": 8, "seq_len": 32, "max_epochs": 4}


@pytest.fixture(scope="module")
def corpus():
    text = python_docs_text()
    return make_corpus("python-docs-slice", text[:12000], text[-4000:], batch_size=8, seq_len=32)


def tiny(name="standard_llm", **changes):
    return preset(name).with_overrides({**TINY, **changes})


def test_create_optimizer_lr_groups():
    config = preset("layer_lr_decreasing")
    trainer = UniversalTrainer(config, vocab_size=93)
    model = trainer.create_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"other": 1e-3, "layer_1": 1e-3, "layer_2": 5e-4,
                                 "layer_3": 1e-4})
    assert [g["name"] for g in optimizer.param_groups] == ["layer_1", "layer_2", "layer_3",
                                                           "other"]  # the framework's order
    block2 = {id(p) for g in optimizer.param_groups if g["name"] == "layer_2"
              for p in g["params"]}
    assert block2 == {id(p) for n, p in model.named_member_params() if n.startswith("2.")}


def test_loss_is_the_hand_computed_weighted_sum(corpus):
    config = tiny("asymmetric_with_l2")  # weights 0.7 / 1.0 / 0.3
    trainer = UniversalTrainer(config, corpus.vocab_size)
    model = trainer.create_model()
    x, y = corpus.train_x[0], corpus.train_y[0]
    hidden, _ = model(x)
    by_hand = sum(w * F.cross_entropy(model.logits(h)[0], y.flatten())
                  for w, h in zip((0.7, 1.0, 0.3), hidden))
    assert trainer.compute_loss(model, x, y).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_alpha_schedule_changes_the_loss_weights_per_epoch(corpus):
    config = tiny("asymmetric_best", alpha_schedule=AlphaSchedule("linear", 0.9, 0.1),
                  max_epochs=3)
    trainer = UniversalTrainer(config, corpus.vocab_size)
    model = trainer.create_model()
    x, y = corpus.train_x[0], corpus.train_y[0]
    hidden, _ = model(x)
    ce = [F.cross_entropy(model.logits(h)[0], y.flatten()).item() for h in hidden]
    for epoch, alpha in ((0, 0.9), (1, 0.5), (2, 0.1)):
        expected = alpha * ce[0] + (1 - alpha) * ce[2]
        trainer.set_training_state(epoch, 3)
        assert trainer.get_current_weights() == pytest.approx({1: alpha, 2: 0, 3: 1 - alpha})
        assert trainer.compute_loss(model, x, y).item() == pytest.approx(expected, 1e-5)
    # weights given explicitly override the training state
    assert trainer.compute_loss(model, x, y, weights={1: 0.25, 3: 0.75}).item() == \
        pytest.approx(0.25 * ce[0] + 0.75 * ce[2], 1e-5)


def test_routing_metrics_on_a_constructed_case():
    # 8 tokens of one member; exit at layer 1 of 3; threshold 0.9
    conf = torch.tensor([[[0.95, 0.5, 0.91, 0.2, 0.9, 0.1, 0.99, 0.3]]])  # [E=1, K=1, N=8]
    exit_index = assign_exits(conf, torch.tensor([[0.9]]))
    assert exit_index.tolist() == [[0, 1, 0, 1, 0, 1, 0, 1]]
    ce = torch.stack([torch.full((1, 8), 1.0), torch.full((1, 8), 3.0)])
    right = torch.stack([torch.ones(1, 8, dtype=torch.bool), torch.zeros(1, 8, dtype=torch.bool)])
    m = routed_metrics(exit_index, ce, right, [1], 3)
    assert m["shallow_ratio"].item() == pytest.approx(0.5)
    assert m["compute_cost"].item() == pytest.approx((4 * 1 + 4 * 3) / (8 * 3))
    assert m["ppl"].item() == pytest.approx(math.exp(2.0))
    assert m["acc"].item() == pytest.approx(0.5)
    # 0 disables routing; 1.0 routes only certain tokens
    assert assign_exits(conf, torch.tensor([[0.0]])).tolist() == [[1] * 8]
    certain = torch.tensor([[[1.0, 0.999]]])
    assert assign_exits(certain, torch.tensor([[1.0]])).tolist() == [[0, 1]]


def test_max_softmax_confidence():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    assert confidence(logits, "max_softmax").item() == pytest.approx(0.7)


def test_early_stopping_at_first_worse_epoch_with_patience_0():
    member = MemberRecord()
    for epoch, ppl in enumerate([10.0, 9.0, 9.5, 8.0], start=1):  # epochs count from 1
        member.observe(epoch, ppl, patience=0)
        if member.status != "running":
            break
    assert (member.status, member.best_epoch, member.best_ppl, epoch) == ("completed", 2, 9.0, 3)
    patient = MemberRecord()
    for epoch, ppl in enumerate([10.0, 9.0, 9.5, 9.2, 8.0, 8.5, 8.6, 8.7], start=1):
        patient.observe(epoch, ppl, patience=2)
        if epoch == 7:
            assert patient.status == "running"  # 2 bad epochs: not more than patience yet
    assert (patient.best_epoch, patient.status) == (5, "completed")


def test_epochs_are_numbered_from_1_in_rows_and_results(corpus):
    """As the framework reports them; the alpha schedule still sees 0, 1, ... (its start
    value in the first epoch)."""
    config = tiny("asymmetric_best", max_epochs=2, patience=5,
                  alpha_schedule=AlphaSchedule("linear", 0.9, 0.5))
    population = Population([config], corpus)
    rows = population.run_epoch() + population.run_epoch()
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["alpha"] for r in rows] == pytest.approx([0.9, 0.5])
    best = population.results()[0]
    assert best["best_epoch"] == 1 + min(range(2), key=lambda e: rows[e]["val_ppl"])
    assert best["best_ppl"] == min(r["val_ppl"] for r in rows)


def test_non_finite_ppl_fails_the_member():
    member = MemberRecord()
    member.observe(1, 5.0, 0)
    member.observe(2, math.nan, 0)
    assert member.status == "failed" and "diverged" in member.error and member.best_ppl == 5.0


POPULATION = [
    {"name": "standard_llm", "seed": 1},
    {"name": "asymmetric_best", "seed": 2, "alpha_schedule": AlphaSchedule("cosine", 0.9, 0.5)},
    {"name": "layer_lr_decreasing", "seed": 3, "lr": 2e-3},
    {"name": "lpt_routing", "seed": 4, "patience": 1,
         "alpha_schedule": AlphaSchedule("step", 0.8, 0.4, [1, 2])},
]


def test_population_members_match_single_runs(corpus):
    configs = [tiny(**c) for c in POPULATION]
    together = train(configs, corpus)
    for config, row in zip(configs, together):
        alone = train([config], corpus)[0]
        assert row["best_epoch"] == alone["best_epoch"]
        assert row["best_ppl"] == pytest.approx(alone["best_ppl"], rel=1e-4)
        assert row["compute_cost"] == pytest.approx(alone["compute_cost"], rel=1e-4)
        assert row["epochs_run"] == alone["epochs_run"]
    assert len({round(r["best_ppl"], 3) for r in together}) == 4  # members really differ


def test_compiled_loss_trains_like_eager(corpus):
    """--compile (torch.compile of the loss and of the optimizer's update, the GPU benchmarks'
    setting) changes only float rounding: a population with an alpha schedule, 2 epochs,
    compiled vs eager."""
    configs = [tiny("lpt_routing", seed=s, lr=1e-3 * (1 + s), max_epochs=2) for s in range(2)]
    eager, compiled = (Population(configs, corpus, compile=c) for c in (False, True))
    for _ in range(2):
        for a, b in zip(eager.run_epoch(), compiled.run_epoch()):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
            assert b["val_ppl"] == pytest.approx(a["val_ppl"], rel=1e-4)
    assert compiled.finished and eager.finished


def test_compiled_loss_stays_exact_when_a_process_trains_another_shape(corpus):
    """A Ray worker trains one population after another in one process. The second shape
    must not get a graph retraced with symbolic sizes (torch.compile's automatic dynamic
    shapes dropped a layer's term here: half the loss): its compiled loss equals the eager
    one."""
    first = Population([tiny()], corpus, compile=True)  # 3 layers, the last one weighted
    first.run_epoch()
    second = Population([tiny(num_layers=2, layer_weights={1: 0.5, 2: 0.5})], corpus,
                        compile=True)
    x, y = corpus.train_batches[0]
    args = (second.model, x, y, second._weights, [1, second.objective.num_layers])
    torch.testing.assert_close(second._loss(*args), second.objective.loss(*args),
                               rtol=1e-5, atol=1e-6)


def test_a_compiled_step_reads_the_rotary_tables_instead_of_recomputing_them(corpus):
    """Tables built inside the compiled loss were fused into the rotary kernels, which then
    computed pow, cos and sin again for every element of q and k (~20% of a K = 256 bf16
    epoch on an H200). Population keeps them as buffers; the loss stays the eager one."""
    population = Population([tiny(seed=s) for s in range(2)], corpus, compile=True)
    x, y = corpus.train_batches[0]
    args = (population.model, x, y, population._weights, [1, population.objective.num_layers])
    loss, code = run_and_get_code(population._loss, *args)
    assert not any("cos" in kernel for kernel in code)
    torch.testing.assert_close(loss, population.objective.loss(*args), rtol=1e-5, atol=1e-6)


def test_written_out_softmax_attention_trains_like_sdpa(corpus):
    """The attention a compiled GPU population runs at small head sizes is the function SDPA
    computes: two epochs of an eager and a compiled population with it match SDPA's."""
    configs = [tiny("lpt_routing", seed=s, max_epochs=2) for s in range(2)]
    sdpa = Population(configs, corpus, attention="sdpa")
    written = [Population(configs, corpus, attention="softmax", compile=c) for c in (False, True)]
    for _ in range(2):
        expected = sdpa.run_epoch()
        for population in written:
            for a, b in zip(expected, population.run_epoch()):
                assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
                assert b["val_ppl"] == pytest.approx(a["val_ppl"], rel=1e-5)


def test_softmax_attention_only_where_it_measured_faster():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention_kernel(16, cuda, compiled=True) == "softmax"
    assert attention_kernel(8, cuda, compiled=True) == "softmax"
    assert attention_kernel(32, cuda, compiled=True) == "sdpa"  # the fused kernels win there
    assert attention_kernel(16, cuda, compiled=False) == "sdpa"  # eager it is 2.5x slower
    assert attention_kernel(16, cpu, compiled=True) == "sdpa"  # not measured on a CPU


def test_same_seed_same_result(corpus):
    a, b = (train([tiny("lpt_routing", seed=5)], corpus)[0] for _ in range(2))
    assert (a["best_ppl"], a["best_epoch"], a["acc"]) == (b["best_ppl"], b["best_epoch"],
                                                          b["acc"])
    c = train([tiny("lpt_routing", seed=6)], corpus)[0]
    assert c["best_ppl"] != a["best_ppl"]


def test_population_adamw_matches_torch_adamw(corpus):
    """K=1 population optimiser == torch.optim.AdamW + clip_grad_norm_ (the seed's loop)."""
    config = tiny("layer_lr_decreasing", grad_clip=0.05)
    trainer = UniversalTrainer(config, corpus.vocab_size)
    reference, ours = trainer.create_model(), trainer.create_model()
    optimizer = trainer.create_optimizer(reference)
    trainer.train_epoch(reference, corpus.train_batches[:3], optimizer, config.grad_clip)
    adamw = PopulationAdamW(ours, [config])
    for x, y in corpus.train_batches[:3]:
        trainer.compute_loss(ours, x, y).backward()
        adamw.clip_()
        adamw.step(torch.ones(1))
    for (name, p), (_, q) in zip(reference.named_member_params(), ours.named_member_params()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_optimizer_update_equals_the_eager_one(corpus):
    """Clipping (per member: one clips, one does not) and AdamW's update, compiled as one
    function, over 5 steps with the same gradients: the parameters agree to float rounding."""
    configs = [tiny("layer_lr_decreasing", seed=s, grad_clip=[0.05, 0.0][s]) for s in range(2)]
    eager, compiled = (Population(configs, corpus, compile=c) for c in (False, True))
    layers = tuple(active_layers(eager.objective.layer_weights(0)))
    for x, y in corpus.train_batches[:5]:
        for population in (eager, compiled):
            population.objective.loss(population.model, x, y, population._weights,
                                      list(layers)).sum().backward()
            population.optimizer.step(population._active, clip=True)
            assert all(p.grad is None for p in population.optimizer.params)
    for (name, p), (_, q) in zip(eager.model.named_member_params(),
                                 compiled.model.named_member_params()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.equal(eager.model.p("head"), Population(configs, corpus).model.p("head"))


def test_seed_api_evaluate_reports_routing(corpus):
    trainer = UniversalTrainer(tiny("lpt_routing", routing_threshold=0.3), corpus.vocab_size)
    model = trainer.create_model()
    optimizer = trainer.create_optimizer(model, base_lr=3e-3)
    loss, _ = trainer.train_epoch(model, corpus.train_batches, optimizer)
    stats = trainer.evaluate(model, corpus.val_batches)
    assert set(stats) == {"ppl", "acc", "shallow_ratio", "compute_cost"}
    assert math.isfinite(loss) and 1 < stats["ppl"] < corpus.vocab_size
    assert 0 < stats["shallow_ratio"] < 1
    assert stats["compute_cost"] == pytest.approx(1 - stats["shallow_ratio"] * 2 / 3, rel=1e-5)


def test_stopped_member_is_frozen(corpus):
    configs = [tiny(seed=1, max_epochs=6), tiny(seed=2, max_epochs=6, patience=5)]
    population = Population(configs, corpus)
    population.members[0].status = "completed"  # as if it had stopped early
    before = {n: p[0].clone() for n, p in population.model.named_member_params()}
    population.run_epoch()
    for n, p in population.model.named_member_params():
        assert torch.equal(p[0], before[n]), n
        assert not torch.equal(p[1], before[n]), n


def test_checkpoint_resume_gives_the_same_result(corpus):
    config = tiny("asymmetric_best", max_epochs=3, patience=3)
    straight = train([config], corpus)[0]
    population = Population([config], corpus)
    population.run_epoch()
    state = population.state_dict()
    resumed = train([config], corpus, state=state)[0]
    assert resumed["best_ppl"] == pytest.approx(straight["best_ppl"], rel=1e-6)
    assert resumed["epochs_run"] == straight["epochs_run"] == 3


def _reject_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def test_train_cli_prints_one_json_row_and_progress_on_stderr():
    proc = subprocess.run(
        [sys.executable, "-m", "ufw.train", "--preset", "asymmetric_best", "--seed", "3",
         "--train-chars", "6000", "--val-chars", "2000", "--precision", "fp32",
         "--set", "lr=2e-3",  # YAML 1.1 would read 2e-3 as text
         *[arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]],
        capture_output=True, text=True, check=True)
    row = json.loads(proc.stdout, strict=True, parse_constant=_reject_constant)  # no NaN
    assert row["preset"] == "asymmetric_best" and row["seed"] == 3 and row["dim"] == 16
    assert row["lr"] == 2e-3
    assert row["status"] == "completed" and row["best_ppl"] > 1
    assert row["dataset"] == "python-docs"
    # Lists and objects are JSON values, not JSON text inside a string.
    assert row["exit_layers"] == [1] and row["exit_thresholds"] == [0.95]
    assert row["alpha_steps"] == []
    assert len(row["exit_shares"]) == 2 and sum(row["exit_shares"]) == pytest.approx(1, abs=1e-4)
    assert isinstance(row["threshold_curve"], list) and len(row["threshold_curve"]) > 2
    assert {"threshold", "ppl", "compute_cost"} <= row["threshold_curve"][0].keys()
    # One progress line per epoch run, counted from 1, on stderr.
    progress = [line for line in proc.stderr.splitlines() if line.startswith("epoch ")]
    assert len(progress) == row["epochs_run"] >= 2
    for number, line in enumerate(progress, start=1):
        assert line.startswith(f"epoch {number}/{TINY['max_epochs']}: train loss ")
        assert "val PPL" in line and "s/epoch" in line and "ETA" in line


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "preset: unknown 'nope'"),
    (["--preset", "lpt", "--set", "routing_threshold=1.5"], "routing_threshold"),
    (["--preset", "lpt", "--set", "dimm=3"], "dimm: unknown config key"),
    (["--preset", "lpt", "--data", "imagenet"], "--data: unknown corpus"),
    (["--config", "/no/such.yaml"], "config file /no/such.yaml"),
    (["--preset", "lpt", "--device", "gpu0"], "--device: unknown device 'gpu0'"),
    (["--preset", "lpt", "--precision", "fp8"], "argument --precision: invalid choice"),
])
def test_train_cli_bad_input_exits_2_without_traceback(args, message):
    proc = subprocess.run([sys.executable, "-m", "ufw.train", *args], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_readme_usage_runs():
    """The seed's documented usage, as README.md shows it."""
    from ufw import PRESETS, AlphaSchedule, UniversalConfig, UniversalTrainer
    from ufw.data import load_corpus

    corpus = load_corpus(train_chars=6000, val_chars=2000, batch_size=8, seq_len=32)
    config = UniversalConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3}, routing_threshold=0.95,
                             alpha_schedule=AlphaSchedule("cosine", start=0.9, end=0.5),
                             layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1}, dim=16, num_heads=2,
                             batch_size=8, seq_len=32)
    trainer = UniversalTrainer(config, vocab_size=corpus.vocab_size, device="cpu")
    model = trainer.create_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx(
        [1e-4, 5e-4, 1e-3, 1e-3])
    for epoch in range(2):
        loss, weights = trainer.train_epoch(model, corpus.train_batches, optimizer,
                                            grad_clip=1.0, epoch=epoch, max_epochs=2)
        stats = trainer.evaluate(model, corpus.val_batches)
        assert math.isfinite(loss) and weights[1] == pytest.approx((0.9, 0.5)[epoch])
    assert set(stats) == {"ppl", "acc", "shallow_ratio", "compute_cost"}
    assert config.describe().startswith("Weights: [L1:0.70, L2:0.00, L3:0.30]")
    assert "asymmetric_best" in PRESETS


def test_threshold_curve_comes_from_the_same_evaluation(corpus):
    """The per-member curve agrees with the routed metrics at the member's own threshold,
    routes nothing at 0, and spends more compute as the threshold rises."""
    row = train([tiny("lpt_routing", routing_threshold=0.7, max_epochs=2)], corpus)[0]
    curve = {p["threshold"]: p for p in json.loads(row["threshold_curve"])}
    assert curve[0.7]["ppl"] == pytest.approx(row["best_ppl"], rel=1e-6)
    assert curve[0.7]["compute_cost"] == pytest.approx(row["compute_cost"], rel=1e-6)
    assert curve[0.7]["shallow_ratio"] == pytest.approx(row["shallow_ratio"], abs=1e-7)
    assert (curve[0.0]["compute_cost"], curve[0.0]["shallow_ratio"]) == (1.0, 0.0)
    costs = [curve[t]["compute_cost"] for t in sorted(curve) if t > 0]
    assert costs == sorted(costs) and costs[0] < 1.0


def test_blocks_above_every_weighted_exit_stay_untouched(corpus):
    """Weights 1/0/0 train layer 1 alone: blocks 2 and 3 get no gradient and, as with
    torch's AdamW, no update (no weight decay either); the seed API agrees."""
    config = tiny(layer_weights={1: 1.0, 2: 0.0, 3: 0.0}, max_epochs=1)
    population = Population([config], corpus)
    before = {n: p.clone() for n, p in population.model.named_member_params()}
    population.run_epoch()
    after = dict(population.model.named_member_params())
    assert all(torch.equal(before[n], after[n]) for n in before if n[0] in "23")
    assert not torch.equal(before["1.wqkv"], after["1.wqkv"])
    trainer = UniversalTrainer(config, corpus.vocab_size)
    reference = trainer.create_model()
    trainer.train_epoch(reference, corpus.train_batches, trainer.create_optimizer(reference))
    for (name, p), (_, q) in zip(reference.named_member_params(),
                                 population.model.named_member_params()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_threshold_curve_equals_routing_at_each_threshold():
    """The batched curve gives, threshold by threshold, what routing at that threshold gives."""
    from ufw.routing import THRESHOLD_GRID, threshold_curve

    gen = torch.Generator().manual_seed(0)
    E, K, N = 2, 3, 50
    confs = torch.rand(E, K, N, generator=gen)
    confs[0, 0, :5] = 1.0  # certain tokens, for threshold 1.0
    ce = torch.rand(E + 1, K, N, generator=gen) * 3
    right = torch.rand(E + 1, K, N, generator=gen) > 0.5
    curve = threshold_curve(confs, ce, right, [1, 2], 3)
    for g, t in enumerate(THRESHOLD_GRID):
        one = routed_metrics(assign_exits(confs, torch.full((K, E), t)), ce, right, [1, 2], 3)
        for key in ("ppl", "compute_cost", "shallow_ratio"):
            torch.testing.assert_close(curve[key][:, g], one[key], msg=f"{key} at {t}")


def test_single_run_equals_its_population_member_at_a_larger_size():
    """dim 128, 4 layers, fp32: member k of a population trains exactly as K = 1 of config k
    (batched products over members must not change any member's arithmetic beyond rounding)."""
    text = python_docs_text()
    corpus = make_corpus("docs", text[:20000], text[-4000:], batch_size=4, seq_len=32)
    big = {"dim": 128, "num_layers": 4, "num_heads": 4, "batch_size": 4, "seq_len": 32,
           "layer_weights": {1: 0.5, 2: 0.2, 4: 0.3}, "exit_layer": 2}
    configs = [preset("asymmetric_best").with_overrides({**big, "seed": s, "lr": lr})
               for s, lr in ((1, 1e-3), (2, 3e-3), (3, 5e-4))]
    together = Population(configs, corpus)
    alone = [Population([c], corpus) for c in configs]
    layers = (1, 2, 4)
    for x, y in list(zip(corpus.train_x, corpus.train_y))[:4]:
        losses = together.train_step(x, y, layers)
        for k, single in enumerate(alone):
            assert single.train_step(x, y, layers)[0].item() == \
                pytest.approx(losses[k].item(), rel=1e-5)
    for k, single in enumerate(alone):
        mine, theirs = together.model.member_state(k), single.model.member_state(0)
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-5)
    assert not torch.equal(together.model.member_state(0)["head"],
                           together.model.member_state(1)["head"])  # members really differ
