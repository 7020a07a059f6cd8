"""Configuration arithmetic and validation: schedules, layer weights, presets, YAML, errors."""

import math

import pytest

from ufw.config import PRESETS, AlphaSchedule, ConfigError, UniversalConfig, preset


@pytest.mark.parametrize("kind, epoch, expected", [
    ("constant", 0, 0.9), ("constant", 9, 0.9),
    # max_epochs 11: progress = epoch / 10
    ("linear", 0, 0.9), ("linear", 5, 0.7), ("linear", 10, 0.5), ("linear", 20, 0.5),
    ("cosine", 0, 0.9), ("cosine", 5, 0.7), ("cosine", 10, 0.5),
    ("cosine", 2, 0.5 + 0.4 * (1 + math.cos(math.pi * 0.2)) / 2),
])
def test_schedule_values(kind, epoch, expected):
    assert AlphaSchedule(kind, start=0.9, end=0.5).get_alpha(epoch, 11) == pytest.approx(expected)


def test_step_schedule_drops_at_listed_epochs_never_below_end():
    s = AlphaSchedule("step", start=0.9, end=0.5, steps=[3, 6])
    assert [round(s.get_alpha(e, 10), 6) for e in range(8)] == [0.9, 0.9, 0.9, 0.7, 0.7, 0.7,
                                                                 0.5, 0.5]
    one = AlphaSchedule("step", start=0.9, end=0.6, steps=[2])
    assert one.get_alpha(1, 10) == pytest.approx(0.9)
    assert one.get_alpha(50, 10) == pytest.approx(0.6)


def test_single_epoch_training_does_not_divide_by_zero():
    assert AlphaSchedule("linear", 0.9, 0.5).get_alpha(0, 1) == pytest.approx(0.9)


def test_alpha_sets_first_exit_and_last_layer_middle_stays():
    c = UniversalConfig(layer_weights={1: 0.7, 2: 0.2, 3: 0.3},
                        alpha_schedule=AlphaSchedule("linear", 0.9, 0.5), max_epochs=5)
    assert c.get_layer_weights(0) == pytest.approx({1: 0.9, 2: 0.2, 3: 0.1})
    assert c.get_layer_weights(4) == pytest.approx({1: 0.5, 2: 0.2, 3: 0.5})


def test_all_zero_weights_fall_back_to_final_layer_and_normalisation():
    assert UniversalConfig(layer_weights={1: 0, 2: 0, 3: 0}).get_layer_weights() == {
        1: 0, 2: 0, 3: 1.0}
    c = UniversalConfig(layer_weights={1: 0.7, 2: 1.0, 3: 0.3}, normalize_weights=True)
    assert c.get_layer_weights() == pytest.approx({1: 0.35, 2: 0.5, 3: 0.15})


def test_normalisation_comes_before_alpha_as_in_the_framework():
    """normalize_weights scales the configured weights once; alpha then sets the first exit
    and the last layer, and the middle layer keeps its normalised weight (0.5, not
    renormalised with alpha's weights)."""
    c = UniversalConfig(layer_weights={1: 0.7, 2: 1.0, 3: 0.3}, normalize_weights=True,
                        alpha_schedule=AlphaSchedule("linear", 0.9, 0.5), max_epochs=3)
    assert c.get_layer_weights(0) == pytest.approx({1: 0.9, 2: 0.5, 3: 0.1})
    assert c.get_layer_weights(2) == pytest.approx({1: 0.5, 2: 0.5, 3: 0.5})
    assert c.layer_weights == {1: 0.7, 2: 1.0, 3: 0.3}  # the stored values stay as given


def test_presets_match_design():
    expected = {"standard_llm": ((0, 0, 1), 0), "lpt": ((1 / 3,) * 3, 0),
                "lpt_routing": ((1 / 3,) * 3, 0.7), "standard_routing": ((0.5, 0, 0.5), 0.95),
                "asymmetric_best": ((0.7, 0, 0.3), 0.95),
                "asymmetric_with_l2": ((0.7, 1.0, 0.3), 0.95),
                "deep_focus": ((0.3, 0, 0.7), 0.95),
                "layer_lr_decreasing": ((0.7, 0, 0.3), 0.95),
                "layer_lr_increasing": ((0.7, 0, 0.3), 0.95)}
    assert set(PRESETS) == set(expected)
    for name, (weights, threshold) in expected.items():
        c = preset(name)
        assert tuple(c.get_layer_weights()[i] for i in (1, 2, 3)) == pytest.approx(weights)
        assert c.routing_threshold == threshold
    assert preset("layer_lr_decreasing").layer_lr_scales == {1: 1.0, 2: 0.5, 3: 0.1}
    assert preset("layer_lr_increasing").layer_lr_scales == {1: 0.1, 2: 0.5, 3: 1.0}


def test_preset_returns_an_independent_copy():
    c = preset("lpt")
    c.layer_weights[1] = 5.0
    assert PRESETS["lpt"].layer_weights[1] == pytest.approx(1 / 3)


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: asymmetric_best\nalpha_schedule: {type: cosine, start: 0.9, "
                    "end: 0.5}\nlayer_lr_scales: {1: 1.0, 2: 0.5, 3: 0.1}\nmax_epochs: 7\n")
    c = UniversalConfig.from_yaml(path)
    assert c.routing_threshold == 0.95 and c.max_epochs == 7
    assert c.alpha_schedule == AlphaSchedule("cosine", 0.9, 0.5)
    assert c.lr_scale(3) == 0.1
    assert UniversalConfig.from_dict(c.to_dict()) == c


def test_overrides_reach_nested_values():
    c = preset("lpt").with_overrides({"max_epochs": 2, "layer_weights.1": 0.5,
                                      "layer_lr_scales.2": 0.25})
    assert c.max_epochs == 2 and c.layer_weights[1] == 0.5 and c.lr_scale(2) == 0.25


def test_config_id_ignores_seed_only():
    a = preset("lpt")
    assert a.config_id == a.with_overrides({"seed": 7}).config_id
    assert a.config_id != a.with_overrides({"lr": 2e-3}).config_id


@pytest.mark.parametrize("changes, key", [
    ({"layer_weights": {1: -0.1, 2: 0, 3: 1}}, "layer_weights.1"),
    ({"layer_weights": {4: 1.0}}, "layer_weights"),
    ({"routing_threshold": 1.5}, "routing_threshold"),
    ({"routing_threshold": -0.1}, "routing_threshold"),
    ({"alpha_schedule": {"type": "exponential"}}, "alpha_schedule.schedule_type"),
    ({"alpha_schedule": {"type": "step", "steps": [5, 3]}}, "alpha_schedule.steps"),
    ({"alpha_schedule": {"type": "linear", "start": 1.5}}, "alpha_schedule.start"),
    ({"layer_lr_scales": {1: 0.0}}, "layer_lr_scales.1"),
    ({"layer_lr_scales": {9: 1.0}}, "layer_lr_scales"),
    ({"exit_layer": 3}, "exit_layer"),
    ({"num_heads": 3}, "num_heads"),
    ({"lr": 0}, "lr"),
    ({"max_epochs": 0}, "max_epochs"),
    ({"patience": -1}, "patience"),
    ({"bogus": 1}, "bogus"),
    ({"confidence_method": "vibes"}, "confidence_method"),
    ({"exit_layers": [1, 3]}, "exit_layers"),
    ({"exit_layers": [1, 2], "exit_thresholds": {1: 0.9}}, "exit_thresholds"),
    ({"distillation_alpha": 1.5}, "distillation_alpha"),
    ({"teacher": "/no/such/model.pt"}, "teacher"),
    ({"num_experts": 2, "experts_top_k": 3}, "experts_top_k"),
])
def test_validation_names_the_field(changes, key):
    with pytest.raises(ConfigError) as err:
        UniversalConfig.from_dict({**UniversalConfig().to_dict(), **changes})
    assert str(err.value).startswith(key)
