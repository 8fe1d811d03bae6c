"""The fleet server's next-task predictor: profile, transitions, error correction, blending."""
from __future__ import annotations

import msgpack

from edgert.server import predictor as P

MONDAY = 1704067200          # 2024-01-01 00:00 UTC, a Monday
H = 3600


def test_transitions_rank_what_follows_the_current_task():
    st = P.new_state()
    for i in range(10):
        P.observe(st, "a", MONDAY + i * 60)
        P.observe(st, "b", MONDAY + i * 60 + 30)
    hint = P.blend(st, P.new_state(), "a", MONDAY + 20 * 60, exclude="a")
    assert hint[0][0] == "b" and abs(sum(p for _, p in hint) - 1) < 1e-6


def test_the_profile_predicts_by_hour_of_the_week():
    st = P.new_state()
    for week in range(3):                   # night: parking, morning: lane, every day
        for day in range(7):
            t0 = MONDAY + (week * 7 + day) * 86400
            P.observe(st, "parking", t0 + 2 * H)
            P.observe(st, "lane", t0 + 8 * H)
    probs = P.profile_probs(st, MONDAY + 28 * 86400 + 8 * H + 600)
    assert max(probs, key=probs.get) == "lane"
    probs = P.profile_probs(st, MONDAY + 28 * 86400 + 2 * H)
    assert max(probs, key=probs.get) == "parking"


def test_recent_errors_shift_weight_to_the_signal_that_is_right():
    st = P.new_state()
    tasks = ["a", "b", "c"]
    for i in range(90):                     # a strict cycle over 5 hours that do not follow
        P.observe(st, tasks[i % 3], MONDAY + (i % 5) * 24 * H)   # it: transitions tell it
    assert st["score"]["trans"] > 0.9 and st["score"]["profile"] < 0.5


def test_a_new_device_starts_from_the_fleet_and_state_round_trips():
    fleet = P.new_state()
    for i in range(30):
        P.observe(fleet, "x" if i % 2 else "y", MONDAY + i * 60)
    fleet = msgpack.unpackb(msgpack.packb(fleet))     # as the store keeps it
    hint = P.blend(P.new_state(), fleet, "y", MONDAY + 3600, exclude="y")
    assert hint[0][0] == "x"


def test_no_history_no_hint():
    assert P.blend(P.new_state(), P.new_state(), None, MONDAY) == []
