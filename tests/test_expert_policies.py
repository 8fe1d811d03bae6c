"""Each eviction policy's decisions on hand-made traces."""
import numpy as np
import pytest

from edgert.experts.policies import (BeladyPolicy, GateScorePolicy, LFUPolicy, LRUPolicy, PolicyName,
                                     make_policy)


def test_factory_names_every_policy():
    assert isinstance(make_policy("lru", 2, 4), LRUPolicy)
    assert isinstance(make_policy(PolicyName.LFU, 2, 4), LFUPolicy)
    assert isinstance(make_policy("gate", 2, 4, decay=0.5), GateScorePolicy)
    assert isinstance(make_policy("belady", 2, 4, future={0: [1]}), BeladyPolicy)
    with pytest.raises(ValueError, match="unknown expert policy 'fifo'"):
        make_policy("fifo", 2, 4)
    with pytest.raises(ValueError, match="future"):
        make_policy("belady", 2, 4)


def test_lru_evicts_least_recent_of_the_layer():
    p = LRUPolicy(2, 4)
    for e in (0, 1, 2, 0):
        p.on_access(0, e)
    p.on_access(1, 3)                 # another layer's access changes nothing in layer 0
    assert p.victim(0, [0, 1, 2]) == 1
    p.on_access(0, 1)
    assert p.victim(0, [0, 1, 2]) == 2
    assert p.victim(0, [0, 1]) == 0   # only candidates are eligible (pinned ones are not offered)


def test_lru_counts_an_insert_as_a_use():
    p = LRUPolicy(1, 4)
    p.on_access(0, 0)
    p.on_insert(0, 1)                 # a prefetched expert is not the very next victim
    assert p.victim(0, [0, 1]) == 0


def test_lfu_evicts_least_frequent_ties_to_least_recent():
    p = LFUPolicy(1, 4)
    for e in (0, 0, 0, 1, 1, 2, 3):
        p.on_access(0, e)
    assert p.victim(0, [0, 1, 2, 3]) == 2      # 2 and 3 used once; 2 less recently
    p.on_access(0, 2)
    assert p.victim(0, [0, 1, 2, 3]) == 3
    assert p.victim(0, [0, 1]) == 1


def test_gate_score_counts_unselected_experts_and_decays():
    p = GateScorePolicy(1, 4, decay=0.5)
    # expert 3 is never selected (top-2 is {0, 1}) but scores well above expert 2
    p.observe(0, np.array([[0.4, 0.3, 0.0, 0.3]]))
    assert p.victim(0, [2, 3]) == 2
    assert p.victim(0, [0, 1, 3]) in (1, 3)    # 0.3 each: tie goes to the least recent
    # the mean over a step's tokens: expert 1 averages 0.45
    p.observe(0, np.array([[0.1, 0.8, 0.1, 0.0], [0.1, 0.1, 0.8, 0.0]]))
    first = 0.5 * np.array([0.4, 0.3, 0.0, 0.3])          # scores start at 0
    np.testing.assert_allclose(p.score[0], 0.5 * first + 0.5 * np.array([0.1, 0.45, 0.45, 0.0]))
    assert p.victim(0, [0, 1, 2, 3]) == 3
    # decay: old importance fades when an expert stops scoring
    for _ in range(6):
        p.observe(0, np.array([[0.0, 0.0, 0.5, 0.5]]))
    assert p.victim(0, [0, 1, 2, 3]) in (0, 1)


def test_gate_score_ties_go_to_lru():
    p = GateScorePolicy(1, 3)
    p.on_access(0, 2)
    p.on_access(0, 0)
    p.on_access(0, 1)
    assert p.victim(0, [0, 1, 2]) == 2


def test_belady_evicts_farthest_next_use():
    # layer 0 will access: 0 1 2 0 1 3 0 ...
    future = {0: [0, 1, 2, 0, 1, 3, 0]}
    p = BeladyPolicy(1, 4, future=future)
    for e in (0, 1):
        p.on_access(0, e)
    # about to load 2 (cursor at 2); resident 0, 1: next uses 3 and 4 -> evict 1
    assert p.victim(0, [0, 1]) == 1
    p.on_access(0, 2)
    # cursor 3: next uses 0 -> 3, 1 -> 4, 2 -> never
    assert p.victim(0, [0, 1, 2]) == 2
    p.on_access(0, 0)
    p.on_access(0, 1)
    # cursor 5 (about to load 3): 0 -> 6, 1 -> never, 2 -> never; never-used ties go to LRU
    assert p.victim(0, [0, 1, 2]) == 2


def test_belady_beats_lru_on_a_cyclic_trace():
    """Cyclic access over 3 experts with 2 slots: LRU misses every time, MIN every other."""
    trace = [0, 1, 2] * 6

    def misses(policy):
        resident, n = [], 0
        for e in trace:
            if e not in resident:
                n += 1
                if len(resident) == 2:
                    resident.remove(policy.victim(0, resident))
                resident.append(e)
                policy.on_insert(0, e)
            policy.on_access(0, e)
        return n

    lru, opt = misses(LRUPolicy(1, 3)), misses(BeladyPolicy(1, 3, future={0: trace}))
    assert lru == len(trace)
    assert opt < lru and opt == 10


def test_lfu_ages_so_an_old_favourite_gives_way():
    """Counts halve every `age_every` accesses per expert of a layer: an expert used often
    long ago loses to one used often lately; without aging it would stay forever."""
    for age_every, old_survives in ((2, False), (0, True)):
        p = make_policy("lfu", 1, 4, age_every=age_every)
        for _ in range(12):
            p.on_access(0, 0)            # the morning's favourite
        for _ in range(7):
            p.on_access(0, 1)            # the afternoon's
        assert (p.victim(0, [0, 1]) == 1) is old_survives, (age_every, p.uses[0])


def test_lfu_aging_counts_per_layer():
    p = make_policy("lfu", 2, 2, age_every=1)        # halve after 2 accesses of a layer
    p.on_access(0, 0); p.on_access(0, 0)              # layer 0 ages: 2 -> 1
    p.on_access(1, 1)
    assert p.uses[0].tolist() == [1, 0] and p.uses[1].tolist() == [0, 1]
    with pytest.raises(ValueError, match="age_every"):
        make_policy("lfu", 1, 2, age_every=-1)
