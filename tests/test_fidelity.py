"""Fidelity to the framework ufw re-implements (rato-tokyo/hrm, experiments/universal_trainer.py
and experiments/models.py): its initial weight distributions, torch's AdamW arithmetic, its
defaults, and its public call signatures (docs/fidelity.md)."""

import dataclasses
import inspect
import math

import pytest
import torch

from ufw import AlphaSchedule, UniversalConfig, UniversalTrainer
from ufw.config import preset
from ufw.data import make_corpus, python_docs_text
from ufw.model import EarlyExitLM, ModelShape, init_member
from ufw.train import PopulationAdamW, train

TINY = {"dim": 16, "num_heads": 2, "batch_size": 8, "seq_len": 32}


@pytest.fixture(scope="module")
def corpus():
    text = python_docs_text()
    return make_corpus("python-docs-slice", text[:4000], text[-2000:], batch_size=8, seq_len=32)


def test_initial_weights_have_the_frameworks_std():
    """trunc_normal_(std=s) with torch's absolute bounds +-2: the std of each matrix is s
    (1/sqrt(dim) for linear maps, 0.02 for the embedding), not the 0.88 s of +-2 s bounds.
    Large enough matrices that the sample std is within 0.3% of the true one."""
    shape = ModelShape(vocab_size=1000, dim=256, num_layers=2, num_heads=4)
    params = init_member(shape, seed=0)
    for name, w in params.items():
        if name.endswith(("norm1", "norm2")):
            assert torch.equal(w, torch.ones_like(w)), name
            continue
        target = 0.02 if name == "embed" else 1 / math.sqrt(shape.dim)
        assert w.std().item() == pytest.approx(target, rel=0.02), name
        assert abs(w.mean().item()) < 0.01 * target * 10, name


def test_member_k_starts_where_its_single_run_starts():
    shape = ModelShape(vocab_size=50, dim=16, num_layers=3, num_heads=2)
    population, alone = EarlyExitLM(shape, [5, 7, 9]), EarlyExitLM(shape, [7])
    for (name, p), (_, q) in zip(population.named_member_params(), alone.named_member_params()):
        assert torch.equal(p[1], q[0]), name


def test_population_adamw_equals_torch_adamw_over_100_steps():
    """Two members with their own layer-wise LRs and weight decay, each against
    torch.optim.AdamW from create_optimizer, fed the same gradients for 100 steps."""
    configs = [preset("layer_lr_decreasing").with_overrides({**TINY, "seed": 1}),
               preset("layer_lr_increasing").with_overrides(
                   {**TINY, "seed": 2, "lr": 3e-3, "weight_decay": 0.1})]
    trainers = [UniversalTrainer(c, vocab_size=40) for c in configs]
    references = [t.create_model() for t in trainers]
    optimizers = [t.create_optimizer(m) for t, m in zip(trainers, references)]
    population = EarlyExitLM(ModelShape.of(configs[0], 40), [c.seed for c in configs])
    adamw = PopulationAdamW(population, configs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        for name, p in population.named_member_params():
            p.grad = torch.randn(p.shape, generator=gen) * 0.1
            for k, model in enumerate(references):
                model.p(name).grad = p.grad[k:k + 1].clone()
        for optimizer in optimizers:
            optimizer.step()
        adamw.step(torch.ones(2))
    for k, model in enumerate(references):
        for name, q in model.named_member_params():
            torch.testing.assert_close(population.p(name)[k], q[0], rtol=1e-7, atol=0,
                                       msg=f"member {k}, {name}")


def test_the_frameworks_defaults():
    config = UniversalConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3})
    assert (config.exit_layer, config.routing_threshold, config.normalize_weights) == (1, 0.95,
                                                                                       False)
    assert config.alpha_schedule is None and config.layer_lr_scales is None
    schedule = AlphaSchedule()
    assert (schedule.schedule_type, schedule.start, schedule.end, schedule.steps) == (
        "constant", 0.7, 0.5, [])
    assert config.has_routing and not config.has_dynamic_alpha and not config.has_layer_lr
    assert not preset("standard_llm").has_routing
    assert not UniversalConfig(alpha_schedule=AlphaSchedule()).has_dynamic_alpha
    assert preset("layer_lr_decreasing").has_layer_lr


def test_describe_in_the_frameworks_words():
    config = preset("layer_lr_decreasing").with_overrides(
        {"alpha_schedule": {"type": "cosine", "start": 0.9, "end": 0.5}})
    a, arrow = "\N{GREEK SMALL LETTER ALPHA}", "\N{RIGHTWARDS ARROW}"
    assert config.describe() == (f"Weights: [L1:0.70, L2:0.00, L3:0.30], Routing: threshold=0.95, "
                                 f"{a}: 0.9{arrow}0.5 (cosine), "
                                 "LR scales: [L1:1.00x, L2:0.50x, L3:0.10x]")
    assert preset("standard_llm").describe() == (
        "Weights: [L1:0.00, L2:0.00, L3:1.00], Routing: disabled")
    assert AlphaSchedule("constant", 0.8).describe() == f"{a}=0.8 (constant)"
    assert AlphaSchedule("step", 0.9, 0.5, [3, 6]).describe() == (
        f"{a}: 0.9{arrow}0.5 (step at [3, 6])")


def test_public_signatures_are_the_frameworks():
    """Names, order and defaults of every public argument; ufw may only add trailing
    optional ones (create_optimizer's base_lr may be left out: config.lr)."""
    expected = {
        "__init__": ["self", "config", "vocab_size", "device='cpu'"],
        "set_training_state": ["self", "epoch", "max_epochs"],
        "get_current_weights": ["self"],
        "compute_loss": ["self", "model", "x", "y", "weights=None"],
        "create_optimizer": ["self", "model", "base_lr=None"],
        "evaluate": ["self", "model", "val_batches"],
        "train_epoch": ["self", "model", "train_batches", "optimizer", "grad_clip=1.0",
                        "epoch=0", "max_epochs=1"],
    }
    for method, params in expected.items():
        signature = inspect.signature(getattr(UniversalTrainer, method))
        shown = [p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                 for p in signature.parameters.values()]
        assert shown == params, method
    assert list(inspect.signature(AlphaSchedule.get_alpha).parameters) == [
        "self", "epoch", "max_epochs"]
    # positional construction as in the framework: its fields first, in its order
    assert [f.name for f in dataclasses.fields(UniversalConfig)][:6] == [
        "layer_weights", "exit_layer", "routing_threshold", "normalize_weights",
        "alpha_schedule", "layer_lr_scales"]
    assert [f.name for f in dataclasses.fields(AlphaSchedule)] == [
        "schedule_type", "start", "end", "steps"]


def test_a_script_in_the_frameworks_style_runs_and_agrees_with_ufw_train(corpus):
    """The framework's experiment loop, unchanged but for the imports (and create_model):
    epochs passed from 0, best epoch reported from 1. It trains the same trajectory as
    ufw's population trainer, which reports the same best epoch."""
    config = preset("layer_lr_decreasing").with_overrides(
        {**TINY, "max_epochs": 3, "patience": 0, "routing_threshold": 0.2,
         "alpha_schedule": {"type": "linear", "start": 0.9, "end": 0.5}})
    max_epochs, grad_clip = config.max_epochs, 1.0
    trainer = UniversalTrainer(config, vocab_size=corpus.vocab_size, device="cpu")
    model = trainer.create_model()
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    best_ppl, best_epoch, history = float("inf"), 0, []
    for epoch in range(max_epochs):
        train_loss, weights = trainer.train_epoch(model, corpus.train_batches, optimizer,
                                                  grad_clip, epoch=epoch, max_epochs=max_epochs)
        stats = trainer.evaluate(model, corpus.val_batches)
        history.append((train_loss, weights, stats))
        if stats["ppl"] < best_ppl:
            best_ppl, best_epoch = stats["ppl"], epoch + 1
        else:
            break
    for epoch, (train_loss, weights, stats) in enumerate(history):
        assert isinstance(train_loss, float) and math.isfinite(train_loss)
        alpha = 0.9 - 0.4 * epoch / 2  # the linear schedule at epochs 0, 1, 2 of 3
        assert weights == pytest.approx({1: alpha, 2: 0.0, 3: 1 - alpha})
        assert set(stats) == {"ppl", "acc", "shallow_ratio", "compute_cost"}
        assert all(isinstance(v, float) for v in stats.values())
    assert 0 < history[-1][2]["shallow_ratio"] < 1  # routing is in play
    row = train([config], corpus)[0]
    assert row["best_epoch"] == best_epoch >= 1
    assert row["epochs_run"] == len(history)
    assert row["best_ppl"] == pytest.approx(best_ppl, rel=1e-4)


def test_grad_clip_0_means_no_clipping(corpus):
    config = preset("asymmetric_best").with_overrides(TINY)
    trainer = UniversalTrainer(config, corpus.vocab_size)
    unclipped, tiny_clip = trainer.create_model(), trainer.create_model()
    for model, clip in ((unclipped, 0.0), (tiny_clip, 1e-3)):
        trainer.train_epoch(model, corpus.train_batches[:1],
                            torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=clip)
    start = trainer.create_model()
    moved = [(p - q).norm().item() for (_, p), (_, q) in
             zip(unclipped.named_member_params(), start.named_member_params())]
    clipped = [(p - q).norm().item() for (_, p), (_, q) in
               zip(tiny_clip.named_member_params(), start.named_member_params())]
    assert sum(moved) > 100 * sum(clipped) > 0
