"""The four extensions beyond the framework (issue 6): confidence measures, several exits,
knowledge distillation and Mixture of Experts; and that none of them changes the default.

Hand-computed cases pin the arithmetic; an independent single-model implementation
(bench/naive.py) pins the default training itself.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ufw.config import ConfigError, UniversalConfig, preset
from ufw.data import make_corpus, python_docs_text
from ufw.model import EarlyExitLM, ModelShape
from ufw.routing import assign_exits, confidence, routed_metrics
from ufw.train import Objective, Population, UniversalTrainer, distillation_kl, train

ROOT = Path(__file__).resolve().parents[1]
# lr 3e-3: enough for the exits of a tiny model to reach confidences that routing uses
TINY = {"dim": 16, "num_heads": 2, "batch_size": 8, "seq_len": 32, "max_epochs": 2, "lr": 3e-3}


def _load_naive():
    spec = importlib.util.spec_from_file_location("naive", ROOT / "bench" / "naive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus():
    text = python_docs_text()
    return make_corpus("python-docs-slice", text[:6000], text[-2000:], batch_size=8, seq_len=32)


def tiny(name="asymmetric_best", **changes):
    return preset(name).with_overrides({**TINY, **changes})


def same_result(a, b, rel=1e-5):
    assert a["best_epoch"] == b["best_epoch"] and a["epochs_run"] == b["epochs_run"]
    for key in ("best_ppl", "acc", "compute_cost"):
        assert a[key] == pytest.approx(b[key], rel=rel), key


# ============================================================== (1) confidence measures
def test_entropy_confidence_known_values():
    V = 5
    uniform = torch.zeros(2, 3, V)  # [K, N, V]
    assert torch.allclose(confidence(uniform, "entropy"), torch.zeros(2, 3), atol=1e-6)
    one_hot_ish = torch.tensor([[40.0, 0, 0, 0, 0]])
    assert confidence(one_hot_ish, "entropy").item() == pytest.approx(1.0, abs=1e-6)
    p = [0.7, 0.2, 0.1]
    by_hand = 1 - (-sum(q * math.log(q) for q in p)) / math.log(3)  # = 0.270153...
    assert confidence(torch.log(torch.tensor([p])), "entropy").item() == pytest.approx(
        by_hand, rel=1e-5)
    assert by_hand == pytest.approx(0.270153, abs=1e-6)


def test_margin_confidence_known_values():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    assert confidence(torch.log(p), "margin").tolist() == pytest.approx([0.3, 0.2, 0.0],
                                                                        abs=1e-6)
    # the confidences of one distribution: margin <= max_softmax, entropy in [0, 1]
    logits = torch.randn(4, 50, 7, generator=torch.Generator().manual_seed(0))
    margin, top = confidence(logits, "margin"), confidence(logits, "max_softmax")
    entropy = confidence(logits, "entropy")
    assert (margin <= top).all() and (entropy >= 0).all() and (entropy <= 1 + 1e-6).all()
    with pytest.raises(ValueError):
        confidence(logits, "learned")  # a head, not a function of the logits


# ============================================================== (2) several exits
def test_multi_exit_assignment_shares_and_cost_on_a_constructed_case():
    # exits at layers 1 and 2 of a 4-layer model, plus the final layer; 8 tokens, 2 members
    c1 = [0.95, 0.5, 0.5, 0.9, 0.89, 0.1, 0.2, 0.99]
    c2 = [0.99, 0.7, 0.5, 0.1, 0.6, 0.2, 0.65, 0.0]
    confs = torch.tensor([[c1, c1], [c2, c2]])  # [E=2, K=2, N=8]
    thresholds = torch.tensor([[0.9, 0.6],   # member 0: exit 1 at 0.9, exit 2 at 0.6
                               [0.0, 0.6]])  # member 1: exit 1 disabled
    exit_index = assign_exits(confs, thresholds)
    assert exit_index.tolist() == [[0, 1, 2, 0, 1, 2, 1, 0],   # the first threshold met wins
                                   [1, 1, 2, 2, 1, 2, 1, 2]]
    ce = torch.stack([torch.full((2, 8), v) for v in (1.0, 2.0, 3.0)])  # per exit
    right = torch.stack([torch.full((2, 8), v) for v in (True, False, True)])
    m = routed_metrics(exit_index, ce, right, [1, 2], num_layers=4, experts_top_k=2)
    assert m["exit_shares"].tolist() == [[3 / 8, 3 / 8, 2 / 8], [0, 4 / 8, 4 / 8]]
    assert m["compute_cost"].tolist() == pytest.approx([(3 * 1 + 3 * 2 + 2 * 4) / (8 * 4),
                                                        (4 * 2 + 4 * 4) / (8 * 4)])
    assert m["shallow_ratio"].tolist() == pytest.approx([6 / 8, 4 / 8])
    assert m["ppl"].tolist() == pytest.approx([math.exp((3 * 1 + 3 * 2 + 2 * 3) / 8),
                                               math.exp((4 * 2 + 4 * 3) / 8)], rel=1e-6)
    assert m["acc"].tolist() == pytest.approx([5 / 8, 4 / 8])
    # a token passes through top_k = 2 experts in every layer it runs
    assert m["expert_ffns_per_token"].tolist() == pytest.approx([2 * 17 / 8, 2 * 24 / 8])


def test_multi_exit_config_and_one_exit_case():
    c = UniversalConfig(exit_layers=[2, 1], exit_thresholds={1: 0.99, 2: 0.95})
    assert (c.exits, c.thresholds) == ([1, 2], [0.99, 0.95])
    one = UniversalConfig(exit_layer=2, routing_threshold=0.8)
    assert (one.exits, one.thresholds) == ([2], [0.8])
    assert one.flat()["exit_layers"] == "[2]" and one.flat()["exit_thresholds"] == "[0.8]"


def test_multi_exit_training_reports_shares_per_exit(corpus):
    row = train([tiny(exit_layers=[1, 2], exit_thresholds={1: 0.3, 2: 0.2})], corpus)[0]
    shares = json.loads(row["exit_shares"])
    assert len(shares) == 3 and sum(shares) == pytest.approx(1, abs=1e-5)
    assert row["shallow_ratio"] == pytest.approx(shares[0] + shares[1], abs=1e-5)
    assert row["compute_cost"] == pytest.approx((shares[0] + 2 * shares[1] + 3 * shares[2]) / 3,
                                                abs=1e-5)
    assert shares[0] > 0 and shares[2] > 0


# ============================================================== (3) distillation
def _kl_by_hand(p, q, T):
    def soften(r):
        w = [x ** (1 / T) for x in r]
        return [x / sum(w) for x in w]
    p, q = soften(p), soften(q)
    return T * T * sum(a * math.log(a / b) for a, b in zip(p, q))


def test_distillation_kl_on_known_logits():
    p, q = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]
    teacher = torch.log(torch.tensor([[p]]))  # [K=1, N=1, V=3]
    student = torch.log(torch.tensor([[q]]))
    # KL(teacher || student) = 0.7 ln(7/4) + 0.2 ln(1/2) + 0.1 ln(1/2); the reverse is 0.19204
    by_hand = 0.7 * math.log(7 / 4) + 0.3 * math.log(1 / 2)
    assert by_hand == pytest.approx(0.183787, abs=1e-6)
    assert distillation_kl(teacher, student, 1.0).item() == pytest.approx(by_hand, rel=1e-5)
    assert distillation_kl(teacher, student, 2.0).item() == pytest.approx(
        _kl_by_hand(p, q, 2.0), rel=1e-5)
    assert distillation_kl(teacher, teacher, 3.0).item() == pytest.approx(0, abs=1e-7)
    # per-member temperatures; one teacher ([K=1]) serves both members; mean over tokens
    students = torch.log(torch.tensor([[q, p], [q, q]]))  # [K=2, N=2, V]
    teachers = torch.log(torch.tensor([[p, p]]))
    kl = distillation_kl(teachers, students, torch.tensor([1.0, 2.0]))
    assert kl.tolist() == pytest.approx([_kl_by_hand(p, q, 1.0) / 2, _kl_by_hand(p, q, 2.0)],
                                        rel=1e-5)


def test_self_distillation_loss_by_hand(corpus):
    config = tiny(distillation_alpha=0.4, distillation_temperature=2.0)  # weights 0.7/0/0.3
    trainer = UniversalTrainer(config, corpus.vocab_size)
    model = trainer.create_model()
    x, y = corpus.train_x[0], corpus.train_y[0]
    hidden, _ = model(x)
    logits = [model.logits(h) for h in hidden]
    ce = [F.cross_entropy(z[0], y.flatten()) for z in logits]
    p_t = F.softmax(logits[2][0] / 2, -1)
    kl1 = 4 * (p_t * (F.log_softmax(logits[2][0] / 2, -1)
                      - F.log_softmax(logits[0][0] / 2, -1))).sum(-1).mean()
    # the final exit is the teacher: it keeps its task loss alone
    by_hand = 0.7 * (0.4 * ce[0] + 0.6 * kl1) + 0.3 * ce[2]
    assert trainer.compute_loss(model, x, y).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_self_distillation_teacher_gets_no_gradient(corpus):
    # all weight on exit 1, pure KL: the final layer's blocks only serve as the (detached) teacher
    config = tiny(layer_weights={1: 1.0, 2: 0, 3: 0}, distillation_alpha=0.0)
    trainer = UniversalTrainer(config, corpus.vocab_size)
    model = trainer.create_model()
    trainer.compute_loss(model, corpus.train_x[0], corpus.train_y[0]).backward()
    grads = {n: p.grad for n, p in model.named_member_params()}
    assert all(grads[n] is None or not grads[n].any() for n in grads if n[0] in "23")
    assert grads["1.wqkv"].abs().sum() > 0


def test_saved_model_as_teacher(corpus, tmp_path):
    population = Population([tiny("standard_llm", seed=7, max_epochs=1)], corpus)
    population.run_epoch()
    path = str(tmp_path / "teacher.safetensors")
    population.save_member(0, path)
    config = tiny(teacher=path, distillation_alpha=0.5)
    trainer = UniversalTrainer(config, corpus.vocab_size)
    teacher = trainer.objective.teacher
    assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
    model = trainer.create_model()
    x, y = corpus.train_x[0], corpus.train_y[0]
    with torch.no_grad():
        t_logits = teacher.logits(teacher(x)[0][-1])
        hidden, _ = model(x)
        logits = [model.logits(h) for h in hidden]
        # every trained exit, the final one included, learns from the saved teacher
        by_hand = sum(w * (0.5 * F.cross_entropy(logits[i][0], y.flatten())
                           + 0.5 * distillation_kl(t_logits, logits[i], 1.0)[0])
                      for i, w in ((0, 0.7), (2, 0.3)))
    assert trainer.compute_loss(model, x, y).item() == pytest.approx(by_hand.item(), rel=1e-5)
    row = train([config], corpus)[0]
    assert row["status"] == "completed" and row["teacher"] == path
    other = make_corpus("other", "abc " * 2000, "abc " * 500, batch_size=8, seq_len=32)
    with pytest.raises(ConfigError, match=r"teacher: .* another vocabulary"):
        Population([config], other)


# ============================================================== (4) Mixture of Experts
def _moe_model(E=4, k=2, members=2):
    return EarlyExitLM(ModelShape(11, dim=8, num_heads=2, num_experts=E, experts_top_k=k),
                       list(range(members)))


def test_moe_routes_each_token_to_exactly_top_k_experts():
    model = _moe_model(E=4, k=2)
    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(1))  # [K, N, D]
    gates, _ = model.expert_gates(x, 1)
    assert gates.shape == (2, 64, 4)
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.allclose(gates.sum(-1), torch.ones(2, 64))
    probs = torch.softmax(torch.bmm(x, model.p("1.router")), -1)
    chosen = (gates > 0).float()
    assert torch.equal(chosen, torch.zeros_like(probs).scatter(-1, probs.topk(2).indices, 1.0))
    # gates are the router's top-k probabilities renormalised
    assert torch.allclose(gates, probs * chosen / (probs * chosen).sum(-1, keepdim=True))


def test_moe_balance_loss_uniform_router_and_hand_case():
    model = _moe_model(E=4, k=1)
    x = torch.ones(2, 10, 8)
    with torch.no_grad():
        model.p("1.router").zero_()  # uniform router
    _, balance = model.expert_gates(x, 1)
    assert balance.tolist() == pytest.approx([1.0, 1.0])
    for k in (1, 2):
        model = _moe_model(E=4, k=k)
        with torch.no_grad():  # every token: logit 8 * 0.25 = 2 for expert 0, 0 for the rest
            model.p("1.router").zero_()
            model.p("1.router")[:, :, 0] = 0.25
        _, balance = model.expert_gates(x, 1)
        p0 = math.exp(2) / (math.exp(2) + 3)
        q = 1 / (math.exp(2) + 3)
        # top-1: f = (1, 0, 0, 0); top-2: expert 0 and one tied expert take half each
        expected = 4 * p0 if k == 1 else 4 * (0.5 * p0 + 0.5 * q)
        assert balance.tolist() == pytest.approx([expected] * 2, rel=1e-5)


def test_moe_ffn_is_the_gated_sum_of_its_experts():
    model = _moe_model(E=3, k=2)
    h = torch.randn(2, 4, 5, 8, generator=torch.Generator().manual_seed(2))  # [K, B, T, D]
    out, balance = model._ffn(h, 1)
    x = h.reshape(2, 20, 8)
    gates, expected_balance = model.expert_gates(x, 1)
    by_hand = torch.zeros_like(x)
    for k in range(2):
        for e in range(3):
            a = (F.silu(x[k] @ model.p("1.w_gate")[k, e]) * (x[k] @ model.p("1.w_up")[k, e]))
            by_hand[k] += gates[k, :, e, None] * (a @ model.p("1.w_down")[k, e])
    torch.testing.assert_close(out.reshape(2, 20, 8), by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(balance, expected_balance)


def test_moe_training_and_expert_ffns_per_token(corpus):
    config = tiny(num_experts=4, experts_top_k=2, routing_threshold=0.0)
    row = train([config], corpus)[0]
    assert row["status"] == "completed" and math.isfinite(row["best_ppl"])
    assert row["compute_cost"] == pytest.approx(1.0)  # layer units: everything deep
    assert row["expert_ffns_per_token"] == pytest.approx(3 * 2)
    dense = train([tiny(routing_threshold=0.3)], corpus)[0]
    assert dense["expert_ffns_per_token"] == pytest.approx(3 * dense["compute_cost"], rel=1e-5)


def test_moe_aux_loss_is_added_to_the_objective(corpus):
    config = tiny(num_experts=4, experts_top_k=2, moe_aux_weight=0.5)
    trainer = UniversalTrainer(config, corpus.vocab_size)
    model = trainer.create_model()
    x, y = corpus.train_x[0], corpus.train_y[0]
    hidden, balance = model(x)
    ce = [F.cross_entropy(model.logits(h)[0], y.flatten()) for h in hidden]
    by_hand = 0.7 * ce[0] + 0.3 * ce[2] + 0.5 * balance[0]
    assert balance.shape == (1,) and balance[0] > 0  # summed over the 3 blocks
    assert trainer.compute_loss(model, x, y).item() == pytest.approx(by_hand.item(), rel=1e-5)


# ============================================================== learned confidence
def test_learned_confidence_head_gets_gradients_backbone_does_not(corpus):
    config = tiny(confidence_method="learned", exit_layers=[1, 2],
                  exit_thresholds={1: 0.9, 2: 0.8})
    trainer = UniversalTrainer(config, corpus.vocab_size)
    without = Objective([config.with_overrides({"confidence_loss_weight": 0.0})])
    x, y = corpus.train_x[0], corpus.train_y[0]
    grads = []
    for objective in (trainer.objective, without):
        model = trainer.create_model()
        weights = objective.layer_weights(0)
        objective.loss(model, x, y, weights, [1, 3]).sum().backward()
        grads.append({n: p.grad for n, p in model.named_member_params()})
    with_conf, no_conf = grads
    for exit_layer in (1, 2):
        assert with_conf[f"conf{exit_layer}.w"].abs().sum() > 0
        assert with_conf[f"conf{exit_layer}.b"].abs().sum() > 0
        assert not no_conf[f"conf{exit_layer}.w"].any()
    for name, g in with_conf.items():
        if not name.startswith("conf"):
            assert torch.equal(g, no_conf[name]), name


def test_learned_confidence_leaves_the_language_model_as_it_was(corpus):
    """Same seed, threshold 0 (all deep): the learned head changes nothing else, clipping
    included."""
    base = tiny(routing_threshold=0.0, grad_clip=0.1, max_epochs=2)
    plain = train([base], corpus)[0]
    learned = train([base.with_overrides({"confidence_method": "learned",
                                          "confidence_loss_weight": 5.0})], corpus)[0]
    assert learned["best_ppl"] == pytest.approx(plain["best_ppl"], rel=1e-6)


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U): P(score of a right token > a wrong one)."""
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auc_helper():
    assert _auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert _auc(torch.tensor([0.1, 0.9, 0.2, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.5


@pytest.mark.slow
def test_learned_confidence_predicts_correctness(corpus):
    # A linear probe learns slowly: ~140 steps at lr 1e-2 give AUC 0.64-0.68 over seeds 1-6
    # (an untrained head: ~0.5; max-softmax of the same exit: ~0.7).
    config = tiny(confidence_method="learned", max_epochs=6, patience=6, lr=1e-2)
    population = Population([config], corpus)
    while not population.finished:
        population.run_epoch()
    model = population.model.eval()
    scores, right = [], []
    with torch.no_grad():
        for x, y in population.corpus.val_batches:
            hidden, _ = model(x)
            scores.append(torch.sigmoid(model.confidence_logit(hidden[0], 1))[0])
            right.append(model.logits(hidden[0])[0].argmax(-1) == y.flatten())
    scores, right = torch.cat(scores), torch.cat(right)
    assert 0.05 < right.float().mean() < 0.95
    assert _auc(scores, right) > 0.6


# ============================================================== defaults are unchanged
NEUTRAL = {"confidence_method": "max_softmax", "confidence_loss_weight": 0.7,
           "exit_layers": [1], "exit_thresholds": {1: 0.3}, "distillation_alpha": 1.0,
           "distillation_temperature": 3.0, "teacher": "self", "num_experts": 1,
           "experts_top_k": 1, "moe_aux_weight": 0.5}


def test_default_equals_every_extension_at_its_neutral_value(corpus):
    default = tiny(routing_threshold=0.3)
    explicit = default.with_overrides(NEUTRAL)
    assert explicit != default
    a, b = train([default], corpus)[0], train([explicit], corpus)[0]
    assert (a["best_ppl"], a["best_epoch"], a["acc"], a["compute_cost"]) == (
        b["best_ppl"], b["best_epoch"], b["acc"], b["compute_cost"])
    assert a["shallow_ratio"] > 0  # routing is in play


@pytest.mark.parametrize("name, changes", [
    ("asymmetric_best", {"routing_threshold": 0.3}),
    ("layer_lr_decreasing", {"alpha_schedule": {"type": "linear", "start": 0.9, "end": 0.5},
                             "routing_threshold": 0.25, "patience": 1}),
    ("lpt", {"lr": 1e-3}),
])
def test_ufw_single_run_matches_the_naive_reference(corpus, name, changes):
    naive = _load_naive()
    config = preset(name).with_overrides({**TINY, "max_epochs": 3, **changes})
    ours = train([config], corpus)[0]
    reference = naive.train_naive(config, corpus, "cpu")
    if changes.get("routing_threshold"):
        assert ours["shallow_ratio"] > 0  # routing is in play
    assert ours["best_epoch"] == reference["best_epoch"]
    assert ours["epochs_run"] == reference["epochs_run"]
    assert ours["best_ppl"] == pytest.approx(reference["best_ppl"], rel=1e-4)
    for key in ("acc", "shallow_ratio", "compute_cost"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key


def test_naive_reference_refuses_extensions(corpus):
    naive = _load_naive()
    with pytest.raises(ValueError, match="seed's framework only"):
        naive.NaiveTrainer(tiny(num_experts=2), corpus)


# ============================================================== populations
MIXED = [
    {"seed": 1, "routing_threshold": 0.3},
    {"seed": 2, "confidence_method": "entropy", "routing_threshold": 0.1,
     "distillation_alpha": 0.5},
    {"seed": 3, "confidence_method": "margin", "routing_threshold": 0.2,
     "distillation_alpha": 0.7, "distillation_temperature": 2.0, "lr": 2e-3},
    {"seed": 1, "routing_threshold": 0.3, "distillation_alpha": 0.2,
     "distillation_temperature": 1.5},
]
SHAPED = [  # populations whose shape an extension sets: learned heads, exits, experts
    [{"confidence_method": "learned", "routing_threshold": 0.5, "seed": 1},
     {"confidence_method": "learned", "routing_threshold": 0.3, "seed": 2,
      "confidence_loss_weight": 1.0}],
    [{"exit_layers": [1, 2], "exit_thresholds": {1: 0.4, 2: 0.3}, "seed": 1},
     {"exit_layers": [1, 2], "exit_thresholds": {1: 0.0, 2: 0.2}, "seed": 2,
      "layer_weights": {1: 0.5, 2: 0.3, 3: 0.2}}],
    [{"num_experts": 3, "experts_top_k": 2, "seed": 1, "routing_threshold": 0.3},
     {"num_experts": 3, "experts_top_k": 2, "seed": 2, "moe_aux_weight": 0.1, "lr": 2e-3}],
]


@pytest.mark.slow
@pytest.mark.parametrize("members", [MIXED, *SHAPED],
                         ids=["confidence+distillation", "learned", "multi_exit", "moe"])
def test_population_with_extensions_matches_single_runs(corpus, members):
    configs = [tiny(**m) for m in members]
    together = train(configs, corpus)
    for config, row in zip(configs, together):
        same_result(row, train([config], corpus)[0], rel=1e-4)
        assert row["exit_shares"] != "[]"
    assert len({round(r["best_ppl"], 4) for r in together}) == len(configs)


def test_learned_confidence_does_not_share_a_population_with_other_methods(corpus):
    with pytest.raises(ConfigError, match="population"):
        Population([tiny(), tiny(confidence_method="learned")], corpus)


# ============================================================== config and command line
@pytest.mark.parametrize("changes, key", [
    ({"exit_layers": 2}, "exit_layers"),
    ({"exit_layers": []}, "exit_layers"),
    ({"exit_layers": [1, 1]}, "exit_layers"),
    ({"exit_layers": [1.5]}, "exit_layers"),
    ({"exit_thresholds": 0.9}, "exit_thresholds"),
    ({"exit_layers": [1, 2], "exit_thresholds": {1: 0.9, 2: 1.2}}, "exit_thresholds.2"),
    ({"confidence_loss_weight": -1}, "confidence_loss_weight"),
    ({"distillation_temperature": 0}, "distillation_temperature"),
    ({"distillation_alpha": -0.1}, "distillation_alpha"),
    ({"teacher": 3}, "teacher"),
    ({"num_experts": 0}, "num_experts"),
    ({"experts_top_k": 0}, "experts_top_k"),
    ({"moe_aux_weight": -0.01}, "moe_aux_weight"),
])
def test_extension_validation_names_the_field(changes, key):
    with pytest.raises(ConfigError) as err:
        UniversalConfig.from_dict({**UniversalConfig().to_dict(), **changes})
    assert str(err.value).startswith(key)


CLI = ["--train-chars", "3000", "--val-chars", "1000",
       *[arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]]


def run_cli(*sets):
    return subprocess.run([sys.executable, "-m", "ufw.train", "--preset", "asymmetric_best",
                           *CLI, *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, check=False, cwd=ROOT)


@pytest.mark.parametrize("sets, check", [
    (["confidence_method=learned"], lambda r: r["confidence_method"] == "learned"),
    (["exit_layers=[1,2]", "exit_thresholds={1: 0.9, 2: 0.8}"],
     lambda r: r["exit_layers"] == [1, 2] and r["exit_thresholds"] == [0.9, 0.8]
     and len(r["exit_shares"]) == 3),  # the JSON row holds real lists (results.json_row)
    (["distillation_alpha=0.5", "distillation_temperature=2"],
     lambda r: r["distillation_alpha"] == 0.5 and r["distillation_temperature"] == 2),
    (["num_experts=4", "experts_top_k=2"],
     lambda r: r["num_experts"] == 4 and r["expert_ffns_per_token"] > 2),
], ids=["confidence", "multi_exit", "distillation", "moe"])
def test_each_extension_from_the_command_line(sets, check):
    proc = run_cli(*sets)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["status"] == "completed" and row["best_ppl"] > 1 and check(row)


@pytest.mark.parametrize("sets, message", [
    (["confidence_method=vibes"], "confidence_method: must be one of"),
    (["exit_layers=2"], "exit_layers: must be a list"),
    (["exit_layers=[1,2]", "exit_thresholds={1: 0.9}"], "exit_thresholds: must give one"),
    (["distillation_temperature=0"], "distillation_temperature"),
    (["teacher=/no/such/model.pt"], "teacher: must be 'self' or the path"),
    (["num_experts=2", "experts_top_k=3"], "experts_top_k: must be <= num_experts=2"),
])
def test_extension_cli_errors_exit_2_without_traceback(sets, message):
    proc = run_cli(*sets)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_teacher_of_another_vocabulary_is_a_user_error(corpus, tmp_path):
    other = make_corpus("other", "abc " * 2000, "abc " * 500, batch_size=8, seq_len=32)
    population = Population([tiny("standard_llm", max_epochs=1)], other)
    population.save_member(0, str(tmp_path / "t.pt"))
    proc = run_cli(f"teacher={tmp_path / 't.pt'}", "distillation_alpha=0.5")
    assert proc.returncode == 2 and "another vocabulary" in proc.stderr
    assert "Traceback" not in proc.stderr


# ============================================================== search spaces
@pytest.mark.parametrize("name, swept", [
    ("confidence", {"confidence_method", "routing_threshold"}),
    ("multi_exit", {"exit_thresholds.1", "exit_thresholds.2", "layer_weight_2"}),
    ("distillation", {"distillation_alpha", "distillation_temperature"}),
    ("moe", {"num_experts", "experts_top_k", "moe_aux_weight"}),
])
def test_extension_search_spaces_load_and_sample(name, swept):
    import optuna

    from ufw.space import load_space

    space = load_space(ROOT / "search_spaces" / f"{name}.yaml")
    assert swept <= {p.name for p in space.parameters}
    space.validate_configs()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        for config, _preset in space.configs(space.sample(trial), seeds=2):
            config.validate()
        study.tell(trial, 1.0)
