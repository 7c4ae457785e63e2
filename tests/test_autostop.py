"""--finetune-steps auto: the stopping rule on constructed K_t trajectories, and its callback on tiny
ViTs whose copy changes between checks."""

import numpy as np
import pytest
from planted import planted_copy, probe_batches, tiny_vit

from cka_split.probes.autostop import StabilityStop, stability_callback


def run(trajectory, every=10, patience=3):
    stop = StabilityStop(every=every, patience=patience)
    for i, k in enumerate(trajectory, start=1):
        if stop.observe(i * every, k):
            break
    return stop


def test_stops_after_patience_unchanged_checks():
    stop = run([11, 9, 8, 8, 8, 8, 8, 7])
    assert stop.stopped_at == 60 and [k for _, k in stop.trajectory] == [11, 9, 8, 8, 8, 8]
    assert stop.to_json(300, 60) == {
        "max_steps": 300,
        "check_every": 10,
        "patience": 3,
        "steps_used": 60,
        "stopped_early": True,
        "k_t_trajectory": [[10, 11], [20, 9], [30, 8], [40, 8], [50, 8], [60, 8]],
        "accepted_k_t": [[11], [9], [8], [8], [8], [8]],
    }


def test_a_change_restarts_the_count_and_an_unsettled_run_never_stops():
    assert run([5, 5, 5, 6, 6, 6, 6]).stopped_at == 70  # 5 x3 is not enough; 6 x4 is
    never = run([3, 4, 3, 4, 3, 4, 3, 4])
    assert never.stopped_at is None and len(never.trajectory) == 8
    assert run([2, 2], patience=1).stopped_at == 20
    assert [s for s in range(1, 31) if StabilityStop(every=10, patience=1).due(s)] == [10, 20, 30]
    with pytest.raises(ValueError):
        StabilityStop(every=0, patience=1)


def test_callback_measures_k_t_of_the_copy_as_it_is_at_each_check():
    L = 6
    pre = tiny_vit(L)
    stop = StabilityStop(every=5, patience=2)
    on_step = stability_callback(pre, "seg", probe_batches(8), stop, num_layers=L)
    # the "fine-tuning" moves the copy from block 4 on, then from block 2 on, then leaves it
    states = {5: planted_copy(pre, 4, 0.05), 10: planted_copy(pre, 2, 0.05, seed=3)}
    copy = planted_copy(pre, 4, 0.05).train()  # a copy being trained is in train mode
    stopped = []
    for step in range(1, 41):
        if step in states:
            copy.load_state_dict(states[step].state_dict())
        if on_step(step, copy):
            stopped.append(step)
            break
    assert [k for _, k in stop.trajectory] == [2, 4, 4, 4]
    assert stopped == [20] and stop.stopped_at == 20
    assert copy.training and all(m.training for m in copy.modules())  # the checks left it in train mode


def test_a_tie_between_two_accepted_k_t_settles_when_the_set_does():
    # the demo's seg copy: the chosen K_t alternates 10/11 while both starts pass the step test
    stop = StabilityStop(every=10, patience=2)
    checks = [
        (11, [7, 11]),
        (11, [10, 11]),
        (10, [10]),
        (10, [10]),
        (11, [10, 11]),
        (10, [10, 11]),
        (11, [10, 11]),
        (10, [10, 11]),
    ]
    for i, (k, acc) in enumerate(checks, start=1):
        if stop.observe(i * 10, k, acc):
            break
    assert stop.stopped_at == 70 and [k for _, k in stop.trajectory] == [11, 11, 10, 10, 11, 10, 11]
    assert stop.to_json(150, 70)["accepted_k_t"] == [[7, 11], [10, 11], [10], [10], [10, 11], [10, 11], [10, 11]]
    # the chosen K_t alone never repeated three times: the old rule would have run on
    assert run([11, 11, 10, 10, 11, 10, 11, 10], patience=2).stopped_at is None
    # a chosen K_t outside the accepted list still counts (a clipped or gradual K_t)
    fresh = StabilityStop(every=1, patience=1)
    assert not fresh.observe(1, 5, [4]) and fresh.accepted == [[4, 5]]


def test_accepted_k_t_reads_every_start_the_step_test_passes():
    from cka_split.decision.divergence import accepted_starts, divergence_start
    from cka_split.decision.recommend import accepted_k_t

    # two clean steps: block 1 and block 3 each start a segment >= 2x every block before (no noise)
    d = [1e-3, 5e-3, 6e-3, 0.05, 0.06, 0.07]
    assert accepted_starts(d) == [1, 3]
    assert divergence_start(d).start == 3  # ratio 0.05 / 6e-3 = 8.3 beats 5e-3 / 1e-3 = 5
    assert accepted_k_t(np.array(d), np.full(6, np.nan), list(range(6)), 6) == [3, 5]
    # noise can remove a start: wide bands on blocks 3-5 pull their lower ends under 2 x 6e-3
    se = [0.0, 0.0, 0.0, 0.03, 0.03, 0.03]
    assert accepted_starts(d, se) == [1] and divergence_start(d, se).start == 1
    # a gradual curve accepts only the rule's start (the first block that moved); a flat one none
    assert accepted_starts([1e-3, 1.5e-3, 2e-3, 2.5e-3]) == [0]
    assert accepted_starts([0.0, 0.0, 0.0]) == [] and accepted_k_t(np.zeros(3), np.zeros(3), [0, 1, 2], 3) == []
