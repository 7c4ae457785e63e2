"""--finetune-steps auto: the stopping rule on constructed K_t trajectories, and its callback on tiny
ViTs whose copy changes between checks."""

import pytest

from cka_split.autostop import StabilityStop, stability_callback

from planted import planted_copy, probe_batches, tiny_vit


def run(trajectory, every=10, patience=3):
    stop = StabilityStop(every=every, patience=patience)
    for i, k in enumerate(trajectory, start=1):
        if stop.observe(i * every, k):
            break
    return stop


def test_stops_after_patience_unchanged_checks():
    stop = run([11, 9, 8, 8, 8, 8, 8, 7])
    assert stop.stopped_at == 60 and [k for _, k in stop.trajectory] == [11, 9, 8, 8, 8, 8]
    assert stop.to_json(300, 60) == {"max_steps": 300, "check_every": 10, "patience": 3, "steps_used": 60,
                                     "stopped_early": True, "k_t_trajectory": [[10, 11], [20, 9], [30, 8], [40, 8],
                                                                              [50, 8], [60, 8]]}


def test_a_change_restarts_the_count_and_an_unsettled_run_never_stops():
    assert run([5, 5, 5, 6, 6, 6, 6]).stopped_at == 70          # 5 x3 is not enough; 6 x4 is
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
    copy = planted_copy(pre, 4, 0.05).train()            # a copy being trained is in train mode
    stopped = []
    for step in range(1, 41):
        if step in states:
            copy.load_state_dict(states[step].state_dict())
        if on_step(step, copy):
            stopped.append(step)
            break
    assert [k for _, k in stop.trajectory] == [2, 4, 4, 4]
    assert stopped == [20] and stop.stopped_at == 20
    assert copy.training and all(m.training for m in copy.modules())     # the checks left it in train mode
