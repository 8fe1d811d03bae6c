"""Predictor: which task a device will switch to next, learnt from reported switches.

Three signals, in the spirit of WarmServe (periodic workloads are predictable):

- a *daily profile*: how often each task was switched to in each hour of the day (24
  bins), read at the hour of the prediction and its neighbours: what earlier days did at
  this time;
- a *weekly profile*: the same over the 168 hours of the week (a weekday unlike the
  others); it says nothing until that hour of the week has been seen, and until then the
  daily profile speaks alone;
- *transitions*: how often task A was followed by task B.

Counts decay (``DECAY`` per reported switch) so that old habits fade. Each signal's weight
follows its recent error: after every switch the probability each signal gave the task
that came (the active task left out, as in a hint) is folded into an exponential average,
and the next prediction mixes the signals in proportion to those averages (the correction
from recent errors). A device's own predictor is blended with the fleet's (every device
running the same model) by how much the device has seen: ``n / (n + PRIOR_SWITCHES)``.

State is plain data (msgpack-able dicts) so the server keeps it in its store and a
restarted server carries on; a state written before the daily profile existed is upgraded
when read (``upgrade``).
"""
from __future__ import annotations

import time

WEEK, DAY = 7 * 24, 24   # bins of the weekly and the daily profile (hours)
NEIGHBOUR = 0.5          # weight of the hours either side of the predicted one
DECAY = 0.995            # per reported switch: about the last ~200 switches count fully
SCORE_EMA = 0.1          # averaging of each signal's recent score (the error correction)
PRIOR_SWITCHES = 20      # a device's own predictor outweighs the fleet's after ~20 switches
TOP = 8                  # tasks in one hint list
RESCALE = 1e6            # NOTE: counts grow by 1/DECAY per switch instead of all decaying
                         # (O(1) per switch); rescaled to 1 when the unit passes this
FLOOR = 1e-3             # a count below this (in units of the newest switch) is dropped
SIGNALS = ("day", "profile", "trans")    # "profile": the weekly one (its name in old states)


def hour_of_week(t: float) -> int:
    tm = time.gmtime(t)
    return tm.tm_wday * 24 + tm.tm_hour


def new_state() -> dict:
    return {"n": 0, "last": None, "unit": 1.0, "day": {}, "profile": {}, "trans": {},
            "score": dict.fromkeys(SIGNALS, 0.5)}


def upgrade(st: dict) -> dict:
    """A state as stored, with every field the current predictor reads."""
    st.setdefault("unit", 1.0)
    st.setdefault("day", {})
    for s in SIGNALS:
        st["score"].setdefault(s, 0.5)
    return st


def _norm(d: dict) -> dict:
    s = sum(d.values())
    return {k: v / s for k, v in d.items()} if s > 0 else {}


def _around(table: dict, h: int, bins: int, skip: str | None = None) -> dict:
    out: dict[str, float] = {}
    here, lo, hi = str(h), str((h - 1) % bins), str((h + 1) % bins)
    for task, counts in table.items():
        if task == skip:
            continue
        get = counts.get
        v = get(here, 0.0) + NEIGHBOUR * (get(lo, 0.0) + get(hi, 0.0))
        if v > 0:
            out[task] = v
    return out


def profile_probs(st: dict, t: float) -> dict:
    """The weekly profile's probabilities at ``t`` (empty: this hour of the week unseen)."""
    return _norm(_around(st["profile"], hour_of_week(t), WEEK))


def _signals(st: dict, current: str | None, h: int) -> dict[str, dict]:
    """Each signal's probabilities at hour of the week ``h``, the active task left out (a
    hint never names it). Unnormalised counts: ``_mix`` normalises each once."""
    row = st["trans"].get(current, {}) if current is not None else {}
    return {"day": _around(st["day"], h % DAY, DAY, current),
            "profile": _around(st["profile"], h, WEEK, current),
            "trans": {k: v for k, v in row.items() if k != current}}


def _mix(st: dict, sig: dict[str, dict]) -> dict:
    score, out, wsum = st["score"], {}, 0.0
    for name, counts in sig.items():
        total = sum(counts.values())
        if total <= 0:
            continue
        w = score[name]
        wsum += w
        for task, v in counts.items():
            out[task] = out.get(task, 0.0) + w * v / total
    return {k: v / wsum for k, v in out.items()} if wsum > 0 else {}


def predict(st: dict, current: str | None, t: float) -> dict:
    """Probability of each task being the next switch, from one state."""
    if "unit" not in st:
        upgrade(st)
    return _mix(st, _signals(st, current, hour_of_week(t)))


def _add(counts: dict, key: str, unit: float) -> None:
    counts[key] = counts.get(key, 0.0) + unit


def _rescale(st: dict) -> None:
    u = st["unit"]
    for table in (st["day"], st["profile"], st["trans"]):
        for task in list(table):
            row = table[task]
            for k in list(row):
                row[k] /= u
                if row[k] < FLOOR:
                    del row[k]
            if not row:
                del table[task]
    st["unit"] = 1.0


_LAST = object()


def observe(st: dict, task: str, t: float, prev=_LAST) -> None:
    """Fold in a switch from ``prev`` (default: the state's last task) to ``task`` at time
    ``t``: score the signals first, then learn. The fleet's state is told each device's own
    ``prev``: its "last" is whatever any device did last, no task a device switched from."""
    if "unit" not in st:
        upgrade(st)
    if prev is _LAST:
        prev = st["last"]
    h, s = hour_of_week(t), st["score"]
    for name, counts in _signals(st, prev, h).items():
        total = sum(counts.values())
        if total > 0:
            s[name] = (1 - SCORE_EMA) * s[name] + SCORE_EMA * counts.get(task, 0.0) / total
    st["unit"] /= DECAY
    u = st["unit"]
    _add(st["profile"].setdefault(task, {}), str(h), u)
    _add(st["day"].setdefault(task, {}), str(h % DAY), u)
    if prev is not None:
        _add(st["trans"].setdefault(prev, {}), task, u)
    if u > RESCALE:
        _rescale(st)
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
