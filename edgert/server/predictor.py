"""Predictor: which task a device will switch to next, learnt from reported switches.

Two signals, in the spirit of WarmServe (periodic workloads are predictable):

- a *profile*: how often each task was switched to in each hour of the week (168 bins,
  decayed so that old weeks fade), read at the hour of the prediction and its neighbours;
- *transitions*: how often task A was followed by task B (decayed counts).

Each signal's weight follows its recent error: after every switch the probability each
signal gave the task that came is folded into an exponential average, and the next
prediction mixes the signals in proportion to those averages (the correction from recent
errors). A device's own predictor is blended with the fleet's (every device running the
same model) by how much the device has seen: ``n / (n + PRIOR_SWITCHES)``.

State is plain data (msgpack-able dicts) so the server keeps it in its store and a
restarted server carries on.
"""
from __future__ import annotations

import time

BINS = 7 * 24            # hours of the week
NEIGHBOUR = 0.5          # weight of the hours either side of the predicted one
DECAY = 0.995            # per reported switch: about the last ~200 switches count fully
SCORE_EMA = 0.1          # averaging of each signal's recent score (the error correction)
PRIOR_SWITCHES = 20      # a device's own predictor outweighs the fleet's after ~20 switches
TOP = 8                  # tasks in one hint list


def hour_of_week(t: float) -> int:
    tm = time.gmtime(t)
    return tm.tm_wday * 24 + tm.tm_hour


def new_state() -> dict:
    return {"n": 0, "last": None, "profile": {}, "trans": {},
            "score": {"profile": 0.5, "trans": 0.5}}


def _decay(d: dict) -> None:
    for k in list(d):
        d[k] *= DECAY
        if d[k] < 1e-3:
            del d[k]


def _norm(d: dict) -> dict:
    s = sum(d.values())
    return {k: v / s for k, v in d.items()} if s > 0 else {}


def profile_probs(st: dict, t: float) -> dict:
    h = hour_of_week(t)
    out: dict[str, float] = {}
    for task, bins in st["profile"].items():
        v = bins.get(str(h), 0.0) + NEIGHBOUR * (bins.get(str((h - 1) % BINS), 0.0)
                                                   + bins.get(str((h + 1) % BINS), 0.0))
        if v > 0:
            out[task] = v
    return _norm(out)


def trans_probs(st: dict, current: str | None) -> dict:
    return _norm(dict(st["trans"].get(current, {}))) if current is not None else {}


def predict(st: dict, current: str | None, t: float) -> dict:
    """Probability of each task being the next switch, from one state."""
    p, q = profile_probs(st, t), trans_probs(st, current)
    wp, wq = st["score"]["profile"], st["score"]["trans"]
    if not q:
        wq = 0.0
    if not p:
        wp = 0.0
    if wp + wq == 0:
        return {}
    return _norm({k: wp * p.get(k, 0.0) + wq * q.get(k, 0.0) for k in p.keys() | q.keys()})


def observe(st: dict, task: str, t: float) -> None:
    """Fold in a switch to ``task`` at time ``t``: score the signals first, then learn."""
    prev = st["last"]
    for name, probs in (("profile", profile_probs(st, t)), ("trans", trans_probs(st, prev))):
        if probs:
            s = st["score"]
            s[name] = (1 - SCORE_EMA) * s[name] + SCORE_EMA * probs.get(task, 0.0)
    for bins in st["profile"].values():
        _decay(bins)
    bins = st["profile"].setdefault(task, {})
    h = str(hour_of_week(t))
    bins[h] = bins.get(h, 0.0) + 1.0
    if prev is not None:
        for row in st["trans"].values():
            _decay(row)
        row = st["trans"].setdefault(prev, {})
        row[task] = row.get(task, 0.0) + 1.0
    st["last"] = task
    st["n"] += 1


def blend(device: dict, fleet: dict, current: str | None, t: float,
          exclude: str | None = None) -> list[list]:
    """Ranked ``[task, probability]`` pairs for one device: its own predictor blended with
    the fleet's; ``exclude`` (the active task) left out and the rest renormalised."""
    w = device["n"] / (device["n"] + PRIOR_SWITCHES)
    a, b = predict(device, current, t), predict(fleet, current, t)
    mix = {k: w * a.get(k, 0.0) + (1 - w) * b.get(k, 0.0) for k in a.keys() | b.keys()}
    mix.pop(exclude, None)
    mix = _norm({k: v for k, v in mix.items() if v > 0})
    ranked = sorted(mix.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]
    return [[k, round(v, 6)] for k, v in ranked]
