"""Streams under reload, unload and SIGTERM (issue 17 items 3, 5 and 9): reload and unload
drain (streams finish on the old model, or end `reloaded` only past the drain timeout, never
`model_closed`), every stream's final reply says why it stopped, a tiny temperature is
greedy, and SIGTERM under load ends every stream cleanly."""
from __future__ import annotations

import signal
import time

import numpy as np

from faults.harness import WAIT, generate_args
from task_packs import assert_matches

STREAMS = 4


def start_streams(serve, n_tokens: int, model: str) -> tuple[list, list[int]]:
    """STREAMS callers, one stream each, every one past its first piece."""
    peers = [serve.peer() for _ in range(STREAMS)]
    rids = [p.send("generate", generate_args(n_tokens, model=model, seed=i))
            for i, p in enumerate(peers)]
    for p, r in zip(peers, rids):
        assert p.wait_piece(r), ("a stream never started", p.final.get(r))
    return peers, rids


def finals(peers, rids) -> list:
    for p, r in zip(peers, rids):
        assert p.wait([r]), "a stream never ended"
    return [(p.final[r], len(p.pieces[r]), p.final_at[r]) for p, r in zip(peers, rids)]


def assert_drained(ends, n_tokens: int, since: float, drain_s: float) -> None:
    """Each stream finished whole on the old model, or ended `reloaded` past the drain
    timeout; none failed otherwise."""
    for rep, got, at in ends:
        if rep.ok:
            assert rep.result == {"pieces": got, "stop": "length"} and got == n_tokens, \
                (rep.result, got)
        else:
            assert rep.code == "reloaded" and at - since >= drain_s, \
                (rep.code, rep.message, f"{at - since:.2f} s after the swap began")


def test_reload_under_four_streams_lets_them_finish_on_the_old_model(main):
    drain_s = main.limits().get("drain_timeout_s", 30.0)
    peers, rids = start_streams(main, 600, "lm")
    try:
        t0 = time.monotonic()
        new = main.admin.reload("lm")
        assert new["name"] == "lm"
        assert_drained(finals(peers, rids), 600, t0, drain_s)
        after = peers[0].call("generate", generate_args(8))        # the new version serves
        assert after.ok and after.result["pieces"] == 8
    finally:
        for p in peers:
            p.close()


def test_streams_past_the_drain_timeout_end_reloaded_and_the_new_model_serves(strict):
    """--drain-timeout 1 (the config says 30: the flag wins); 4 x 1200 tokens take longer."""
    peers, rids = start_streams(strict, 1200, "lm")
    try:
        t0 = time.monotonic()
        strict.admin.reload("lm")
        for rep, got, at in finals(peers, rids):
            assert not rep.ok and rep.code == "reloaded", (rep, got)
            assert rep.message and got < 1200
            assert at - t0 >= 1.0, f"ended {at - t0:.2f} s after the reload, before the drain"
        assert peers[0].call("generate", generate_args(8)).ok
    finally:
        for p in peers:
            p.close()


def test_every_stream_says_why_it_stopped(main):
    peer = main.peer()
    try:
        rid = peer.send("generate", generate_args(20))
        assert peer.wait([rid])
        rep = peer.final[rid]
        assert rep.ok and rep.result == {"pieces": 20, "stop": "length"}, rep
        assert len(peer.pieces[rid]) == 20
        rid = peer.send("generate", generate_args(1000))
        assert peer.wait_piece(rid)
        peer.send("cancel", {"id": rid})
        assert peer.wait([rid]) and peer.final[rid].code == "cancelled"
    finally:
        peer.close()


def test_a_temperature_below_the_float_range_is_greedy(main):
    with main.client() as c:
        ids = [5, 17, 42, 99]
        greedy = c.generate(ids, max_new_tokens=24, model="lm")
        assert c.generate(ids, max_new_tokens=24, model="lm", temperature=1e-300) == greedy
        assert c.generate(ids, max_new_tokens=24, model="lm", temperature=1e-39) == greedy


def test_unload_under_four_streams_lets_them_finish_then_refuses_new_work(main):
    drain_s = main.limits().get("drain_timeout_s", 30.0)
    peers, rids = start_streams(main, 600, "lm2")
    try:
        t0 = time.monotonic()
        assert main.admin.unload("lm2")["name"] == "lm2"
        assert_drained(finals(peers, rids), 600, t0, drain_s)
        rep = peers[0].call("generate", generate_args(8, model="lm2"))
        assert not rep.ok and rep.code == "unknown_model", rep
        assert "lm2" not in {m["name"] for m in main.admin.hello()["models"]}
    finally:
        for p in peers:
            p.close()


def test_sigterm_under_load_ends_every_stream_cleanly_and_exits_0(main, packs):
    """Streams running, infers queued behind a switch: SIGTERM. Streams end `cancelled` or
    whole; other work finishes or is refused; exit 0, no traceback. (Last in this file,
    after the unload: the service is started again for whatever runs next.)"""
    peers, rids = start_streams(main, 1000, "lm")
    worker = main.peer()
    x = packs.tasks.x
    work = [worker.send("switch", {"task": "sign", "model": "tasks"})] + \
        [worker.send("infer", {"inputs": {"image": x}, "task": "lane", "model": "tasks"})
         for _ in range(3)]
    try:
        main.proc.send_signal(signal.SIGTERM)
        for rep, got, _ in finals(peers, rids):
            if rep.ok:
                assert rep.result["pieces"] == got and rep.result["stop"] in ("length", "eos")
            else:
                assert rep.code == "cancelled", (rep.code, rep.message)
        assert worker.wait(work), "queued work never ended"
        for r in work[1:]:
            rep = worker.final[r]
            if rep.ok:
                assert_matches(np.asarray(rep.result["logits"]), packs.tasks.ref["lane"])
            else:
                assert rep.code in ("cancelled", "shutting_down"), (rep.code, rep.message)
        assert main.proc.wait(WAIT) == 0
        assert "edgert serve: stopped" in main.stdout()
        assert "Traceback" not in main.stderr(), main.stderr()
    finally:
        for p in peers + [worker]:
            p.close()
