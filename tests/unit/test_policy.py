from __future__ import annotations

from controller.lifecycle.policy import Evict, Limits, Loaded, Refuse, Target, Wait, choose_victims


def test_policy_room_left_evicts_nothing() -> None:
    assert choose_victims(Target("b"), [Loaded("a")], Limits(max_loaded_models=2)) == Evict(())


def test_policy_evicts_least_recently_used_idle_first() -> None:
    loaded = [Loaded("old", last_used=1), Loaded("new", last_used=5)]
    assert choose_victims(Target("x"), loaded, Limits(2)) == Evict(("old",))


def test_policy_prefers_idle_over_busy_even_if_busy_is_older() -> None:
    loaded = [Loaded("busy", in_flight=2, last_used=1), Loaded("idle", last_used=9)]
    assert choose_victims(Target("x"), loaded, Limits(2)) == Evict(("idle",))


def test_policy_busy_model_is_chosen_last_and_drains_first() -> None:
    loaded = [Loaded("busy", in_flight=1)]
    assert choose_victims(Target("x"), loaded, Limits(1)) == Evict(("busy",))


def test_policy_never_evicts_pinned() -> None:
    loaded = [Loaded("pinned", pinned=True), Loaded("free", last_used=9)]
    assert choose_victims(Target("x"), loaded, Limits(2)) == Evict(("free",))
    decision = choose_victims(Target("x"), [Loaded("pinned", pinned=True)], Limits(1))
    assert isinstance(decision, Refuse) and "pinned" in decision.reason


def test_policy_target_already_loaded_needs_nothing() -> None:
    assert choose_victims(Target("a"), [Loaded("a")], Limits(1)) == Evict(())


def test_policy_exclusive_evicts_every_unpinned_other() -> None:
    loaded = [Loaded("a", last_used=2), Loaded("p", pinned=True), Loaded("b", last_used=1), Loaded("t")]
    assert choose_victims(Target("t", exclusive=True), loaded, Limits(5)) == Evict(("b", "a"))


def test_policy_gpu_memory_budget_evicts_models_on_that_gpu() -> None:
    loaded = [
        Loaded("on0", memory=6, gpus=("0",), last_used=1),
        Loaded("on1", memory=6, gpus=("1",), last_used=0),
    ]
    limits = Limits(max_loaded_models=5, gpu_memory={"0": 10, "1": 10})
    assert choose_victims(Target("x", memory=5, gpus=("0",)), loaded, limits) == Evict(("on0",))
    assert choose_victims(Target("x", memory=4, gpus=("0",)), loaded, limits) == Evict(())


def test_policy_too_big_for_the_budget_is_refused() -> None:
    decision = choose_victims(Target("huge", memory=50, gpus=("0",)), [], Limits(5, {"0": 10}))
    assert isinstance(decision, Refuse) and "budget" in decision.reason


def test_policy_memory_blocked_by_pinned_is_refused() -> None:
    loaded = [Loaded("p", pinned=True, memory=8, gpus=("0",))]
    decision = choose_victims(Target("x", memory=5, gpus=("0",)), loaded, Limits(5, {"0": 10}))
    assert isinstance(decision, Refuse)


def test_policy_count_and_memory_victims_are_combined_without_duplicates() -> None:
    loaded = [
        Loaded("a", memory=5, gpus=("0",), last_used=1),
        Loaded("b", memory=5, gpus=("0",), last_used=2),
    ]
    decision = choose_victims(Target("x", memory=8, gpus=("0",)), loaded, Limits(2, {"0": 10}))
    assert decision == Evict(("a", "b"))


def test_policy_settling_model_is_waited_for_not_evicted() -> None:
    """A model admitted for requests it has not served yet: the newcomer waits (the switch-storm livelock)."""
    settling = Loaded("a", in_flight=1, settling=True)
    assert choose_victims(Target("b"), [settling], Limits(1)) == Wait(("a",))
    assert choose_victims(Target("b", exclusive=True), [settling], Limits(1)) == Wait(("a",))
    idle = Loaded("c", last_used=1)
    assert choose_victims(Target("b"), [settling, idle], Limits(2)) == Evict(("c",)), "others go first"
    pinned = Loaded("p", pinned=True)
    assert isinstance(choose_victims(Target("b"), [pinned], Limits(1)), Refuse), "pinned: no wait helps"
