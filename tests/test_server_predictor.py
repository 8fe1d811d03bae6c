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


def test_the_daily_profile_predicts_a_weekday_not_seen_yet():
    st = P.new_state()
    for day in range(3):                    # Monday to Wednesday: night parking, morning lane
        t0 = MONDAY + day * 86400
        P.observe(st, "parking", t0 + 2 * H)
        P.observe(st, "lane", t0 + 8 * H)
    thursday = MONDAY + 3 * 86400
    assert P.profile_probs(st, thursday + 8 * H) == {}      # the weekly one knows nothing yet
    hint = P.blend(st, P.new_state(), None, thursday + 8 * H + 600)
    assert hint[0][0] == "lane"
    hint = P.blend(st, P.new_state(), None, thursday + 2 * H)
    assert hint[0][0] == "parking"


def test_counts_decay_in_constant_time_and_a_rescale_keeps_the_ranking():
    st, ref = P.new_state(), P.new_state()
    for i in range(3000):                   # the unit passes RESCALE (1/0.995^3000 > 1e6)
        task = ("a", "b", "c")[i % 3] if i < 2900 else ("c", "a")[i % 2]
        P.observe(st, task, MONDAY + i * 60)
    assert st["unit"] < P.RESCALE and st["n"] == 3000
    last = {k: v for k, v in st["trans"]["a"].items()}
    assert max(last, key=last.get) == "b"   # the long habit still outweighs the last 100
    assert P.blend(st, ref, "c", MONDAY + 3000 * 60, exclude="c")[0][0] in ("a", "b")


def test_a_state_stored_before_the_daily_profile_is_upgraded():
    old = {"n": 3, "last": "a", "profile": {"b": {"8": 1.0}}, "trans": {"a": {"b": 2.0}},
           "score": {"profile": 0.5, "trans": 0.5}}
    old = msgpack.unpackb(msgpack.packb(old))
    P.observe(old, "b", MONDAY + 8 * H)
    assert old["day"] == {"b": {"8": old["unit"]}} and set(old["score"]) == set(P.SIGNALS)
    assert P.blend(old, P.new_state(), "a", MONDAY + 8 * H, exclude="a")[0][0] == "b"
