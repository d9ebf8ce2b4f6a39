"""Extensible LR schedules: cosine and WSD values, extension without a jump, exact resume through a JSON state dict."""

import json
import math
import pickle

import pytest
import torch

from genesis_hf.pretrain.schedules import GenesisLRScheduler, build_lr_scheduler


def make_scheduler(num_groups: int = 1, **kwargs) -> GenesisLRScheduler:
    parameters = [torch.nn.Parameter(torch.zeros(1)) for _ in range(num_groups)]
    # The optimizer's own lr is deliberately different: the schedule's learning_rate is authoritative.
    optimizer = torch.optim.SGD([{"params": [parameter]} for parameter in parameters], lr=0.5)
    defaults = dict(schedule="cosine", learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10, max_steps=100)
    return build_lr_scheduler(optimizer, **{**defaults, **kwargs})


def run(scheduler: GenesisLRScheduler, until_step: int) -> list[float]:
    """Step like a training loop until `last_epoch == until_step`; returns the LR used by each optimizer step."""
    used = []
    while scheduler.last_epoch < until_step:
        used.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return used


def test_cosine_warmup_peak_and_end():
    scheduler = make_scheduler()
    assert scheduler.get_last_lr() == [0.0]  # step 0 of a linear warmup from 0, as in transformers
    used = run(scheduler, 120)
    assert used[5] == pytest.approx(5e-4)
    assert used[10] == pytest.approx(1e-3)
    assert used[55] == pytest.approx((1e-3 + 1e-4) / 2)
    assert used[100] == pytest.approx(1e-4) and used[119] == pytest.approx(1e-4)
    decay = used[10:101]
    assert all(later <= earlier for earlier, later in zip(decay, decay[1:]))


def test_seed_schedule_values():
    scheduler = make_scheduler(learning_rate=1e-4, min_learning_rate=1e-5, warmup_steps=1000, max_steps=20_000)
    assert scheduler.lr_at_step(500) == pytest.approx(5e-5)
    assert scheduler.lr_at_step(1000) == pytest.approx(1e-4)
    assert scheduler.lr_at_step(10_500) == pytest.approx(5.5e-5)
    assert scheduler.lr_at_step(20_000) == pytest.approx(1e-5)


def test_every_param_group_gets_the_schedule():
    scheduler = make_scheduler(num_groups=2)
    run(scheduler, 10)
    assert scheduler.get_last_lr() == [pytest.approx(1e-3)] * 2
    assert [group["lr"] for group in scheduler.optimizer.param_groups] == scheduler.get_last_lr()


def test_seed_extension_continues_cosine_without_jump():
    # The seed's run: 20k steps planned, extended to 40k; here interrupted at 15k, while the cosine is still decaying.
    scheduler = make_scheduler(learning_rate=1e-4, min_learning_rate=1e-5, warmup_steps=1000, max_steps=20_000)
    extension_step = 15_000
    ordinary = [scheduler.lr_at_step(step) for step in range(1000, extension_step + 1)]
    largest_ordinary_change = max(abs(b - a) for a, b in zip(ordinary, ordinary[1:]))
    run(scheduler, extension_step)
    lr_before = scheduler.get_last_lr()[0]

    scheduler.set_max_steps(40_000)
    assert scheduler.get_last_lr()[0] == lr_before
    assert scheduler.optimizer.param_groups[0]["lr"] == lr_before
    after = [scheduler.lr_at_step(step) for step in range(extension_step, 40_001)]
    assert after[0] == lr_before
    assert abs(after[1] - after[0]) <= largest_ordinary_change
    assert max(abs(b - a) for a, b in zip(after, after[1:])) <= largest_ordinary_change
    assert all(later <= earlier for earlier, later in zip(after, after[1:]))
    assert after[-1] == pytest.approx(1e-5)
    # The new segment is a half cosine from lr_s over the new horizon.
    midpoint = extension_step + (40_000 - extension_step) // 2
    assert scheduler.lr_at_step(midpoint) == pytest.approx((lr_before + 1e-5) / 2)


def test_extension_after_the_end_keeps_min_lr():
    scheduler = make_scheduler()
    run(scheduler, 100)
    scheduler.set_max_steps(200)
    assert [scheduler.lr_at_step(step) for step in (100, 150, 200, 250)] == [pytest.approx(1e-4)] * 4


def test_extension_during_warmup_equals_a_fresh_schedule():
    scheduler = make_scheduler()
    run(scheduler, 4)
    scheduler.set_max_steps(300)
    fresh = make_scheduler(max_steps=300)
    assert [scheduler.lr_at_step(step) for step in range(320)] == [fresh.lr_at_step(step) for step in range(320)]


def test_state_dict_round_trip_reproduces_lrs_exactly_after_double_extension():
    original = make_scheduler()
    run(original, 60)
    original.set_max_steps(200)
    run(original, 150)
    original.set_max_steps(300)
    run(original, 170)
    state = json.loads(json.dumps(original.state_dict()))
    pickle.dumps(state)  # plain values only: no lambdas, no tensors

    # The resumed run is built from its (new) config; the saved schedule wins, then set_max_steps is a no-op.
    resumed = make_scheduler(max_steps=300)
    resumed.load_state_dict(state)
    resumed.set_max_steps(300)
    assert resumed.get_last_lr() == original.get_last_lr()
    assert resumed.optimizer.param_groups[0]["lr"] == original.get_last_lr()[0]
    assert run(resumed, 320) == run(original, 320)
    assert resumed.state_dict() == original.state_dict()


def test_double_extension_is_continuous_and_ends_at_min():
    scheduler = make_scheduler()
    used = run(scheduler, 60)
    scheduler.set_max_steps(200)
    used += run(scheduler, 150)
    scheduler.set_max_steps(300)
    used += run(scheduler, 301)
    largest_ordinary_change = max(abs(b - a) for a, b in zip(used[10:60], used[11:60]))
    for step in (59, 60, 149, 150):
        assert abs(used[step + 1] - used[step]) <= largest_ordinary_change
    assert used[300] == pytest.approx(1e-4)
    assert len(scheduler.state_dict()["segments"]) == 4  # warmup, cosine and one cosine per extension


def test_shrinking_below_current_step_is_an_error():
    scheduler = make_scheduler()
    run(scheduler, 50)
    with pytest.raises(ValueError, match=r"40.*50"):
        scheduler.set_max_steps(40)
    scheduler.set_max_steps(80)  # above the current step: allowed, the cosine just ends sooner
    assert scheduler.lr_at_step(80) == pytest.approx(1e-4)
    segments = scheduler.state_dict()["segments"]
    scheduler.set_max_steps(80)
    assert scheduler.state_dict()["segments"] == segments


def test_wsd_warmup_stable_decay_with_default_twenty_percent():
    scheduler = make_scheduler(schedule="wsd")
    assert scheduler.decay_steps == 20
    assert scheduler.lr_at_step(5) == pytest.approx(5e-4)
    assert scheduler.lr_at_step(10) == scheduler.lr_at_step(50) == scheduler.lr_at_step(80) == pytest.approx(1e-3)
    assert scheduler.lr_at_step(90) == pytest.approx((1e-3 + 1e-4) / 2)
    assert scheduler.lr_at_step(100) == pytest.approx(1e-4)
    explicit = make_scheduler(schedule="wsd", decay_steps=30)
    assert explicit.lr_at_step(70) == pytest.approx(1e-3) and explicit.lr_at_step(85) == pytest.approx(5.5e-4)


def test_wsd_extension_in_stable_phase_moves_the_decay():
    scheduler = make_scheduler(schedule="wsd")
    run(scheduler, 50)
    scheduler.set_max_steps(200)
    assert scheduler.decay_steps == 40  # the default stays 20% of the new max_steps
    assert scheduler.lr_at_step(90) == scheduler.lr_at_step(160) == pytest.approx(1e-3)
    assert scheduler.lr_at_step(180) == pytest.approx((1e-3 + 1e-4) / 2)
    assert scheduler.lr_at_step(200) == pytest.approx(1e-4)

    explicit = make_scheduler(schedule="wsd", decay_steps=30)
    run(explicit, 50)
    explicit.set_max_steps(200)
    assert explicit.lr_at_step(170) == pytest.approx(1e-3) and explicit.lr_at_step(185) == pytest.approx(5.5e-4)


def test_wsd_extension_during_decay_restarts_it_from_current_lr():
    scheduler = make_scheduler(schedule="wsd")
    used = run(scheduler, 90)
    lr_before = scheduler.get_last_lr()[0]
    assert lr_before == pytest.approx((1e-3 + 1e-4) / 2)
    scheduler.set_max_steps(200)
    used += run(scheduler, 201)
    assert used[90] == lr_before and used[160] == lr_before
    assert used[180] == pytest.approx((lr_before + 1e-4) / 2)
    assert used[200] == pytest.approx(1e-4)
    largest_ordinary_change = max(abs(b - a) for a, b in zip(used[80:90], used[81:90]))
    assert max(abs(b - a) for a, b in zip(used[89:], used[90:])) <= largest_ordinary_change + 1e-18


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"schedule": "linear"}, "Valid schedules are: cosine, wsd"),
        ({"decay_steps": 10}, "only applies to schedule='wsd'"),
        ({"min_learning_rate": 1e-2}, "min_learning_rate"),
        ({"learning_rate": 0.0}, "learning_rate must be positive"),
        ({"warmup_steps": 200}, "warmup_steps <= max_steps"),
        ({"schedule": "wsd", "decay_steps": 95}, "decay length"),
    ],
)
def test_invalid_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler(**overrides)


def test_load_state_dict_rejects_foreign_state():
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="missing"):
        scheduler.load_state_dict({"last_epoch": 3, "base_lrs": [1e-3]})


def test_cosine_shape_is_a_half_cosine():
    scheduler = make_scheduler(warmup_steps=0, max_steps=1000, min_learning_rate=0.0)
    for step in (0, 250, 500, 750, 1000):
        assert scheduler.lr_at_step(step) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * step / 1000)))
