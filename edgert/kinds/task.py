"""TaskModel: what ``Runtime.load()`` returns for an ``onnx-tasks`` pack.

    m = rt.load("tasks.edgepack")
    m.switch("lane")                 # moves only the blocks that differ
    out = m.run({"image": x})        # dict in, dict out; m.run(x, task="sign") switches first
    m.prewarm(["sign", "parking"])   # fill spare slots, most-shared blocks first
    m.stats()

Policy lives here, mechanism below: the TaskSwitcher moves blocks, the OnnxEngine runs
the bound session. Once a task keeps running (``PREPACK_AFTER_RUNS`` runs since its
switch) a pre-packed session of it is built in the background, its memory charged to
the arena's engine allowance, and swapped in; any switch drops it first.

ORT's working memory is charged to the same allowance for the duration of each run: its
size per batch item is measured at load (`_measure`: peak resident growth over probe runs
of 1 and k zero items), and a batch that does not fit is run in pieces that do (outputs
concatenated); one that cannot fit even one item is refused before any work.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict, deque

import numpy as np

from ..engines.onnx_engine import ActivationCost, OnnxEngine, PrepackedSession
from ..errors import BudgetExceeded, UnsupportedModel
from ..heap import give_back_heap
from ..stats import summary
from ..weights.switcher import SwitchResult, TaskSwitcher
from .base import Call, LoadedModel

log = logging.getLogger(__name__)
SKELETON = "onnx_skeleton"
PREPACK_AFTER_RUNS = 3   # runs of one task before it counts as "keeps running"
PREPACK_FACTOR = 1.75    # ORT memory of a pre-packed session / dense weight bytes; measured on
                         # the demo ViT: +79.5 MB RSS for 46.5 MB of weights (copy + packed B)
PREPACK_MODES = ("auto", "sync", "off")
HISTORY = 1024           # switch and run timings kept for stats()
ACTIVATION_MARGIN = 1.25  # measured working memory x this is charged: per item, the demo ViT
                          # grew 1.58 MB (probe of 27 items) to 1.65 MB (batch of 128) here
PROBE_INPUT_BYTES = 4 << 20   # the k-item probe holds about this much input: large enough to
PROBE_MAX_ITEMS = 64          # see past page granularity and malloc's small-block reuse
TRIM_AFTER = 8 << 20     # an unsplit run charged at least this much hands its freed heap back
SHAPES_KEPT = 16         # per-item figures kept for inputs whose non-batch dims are dynamic
PREWARM_STEP = 8         # blocks loaded per turn of a hinted prewarm: a request waits for at most
                         # this many block reads before the prewarm stops for it


class TaskModel(LoadedModel):
    """Task models of one ``onnx-tasks`` pack, one active at a time. Thread-safe: every
    public method takes the model's lock; ``run(inputs, task=t)`` switches and runs under
    it, so callers sharing one model each get their own task's outputs."""

    kind = "tasks"

    def __init__(self, rt, reader, name: str, *, task: str | None = None,
                 prepack: str = "auto", keep_displaced: bool = True):
        if prepack not in PREPACK_MODES:
            raise ValueError(f"prepack={prepack!r}; choose one of {', '.join(PREPACK_MODES)}")
        if SKELETON not in reader.sections:
            raise UnsupportedModel(f"{reader.path}: no {SKELETON!r} section; pack it with "
                                   "`edgert pack onnx`")
        if task is not None:
            reader.task(task)                   # UnknownTask before anything is taken
        super().__init__(rt, reader, name)
        self.prepack = prepack
        self._charge = f"{name}: pre-packed session"
        self._act_charge = f"{name}: activations"
        self._costs: OrderedDict[tuple, ActivationCost] = OrderedDict()
        self._split_runs = 0
        self._gen = 0                       # bumped by every switch that changes weights
        self._fast: PrepackedSession | None = None
        self._building: threading.Thread | None = None
        self._runs_since_switch = 0
        self._run_ms: deque[float] = deque(maxlen=HISTORY)
        self._prepack_builds: list[float] = []
        self._prepack_skipped = ""
        self._waiting = 0                   # callers queued for the lock (a hinted prewarm yields)
        self._count_lock = threading.Lock()
        try:
            self.switcher = self._own(TaskSwitcher(reader, rt.arena, name,
                                                   keep_displaced=keep_displaced,
                                                   lock=self._lock))
            self._own(Call(rt.arena.discharge, self._charge))
            self._own(Call(rt.arena.discharge, self._act_charge))
            cfg = rt.config
            self.engine = OnnxEngine(reader.sections[SKELETON], self.switcher.tensors(),
                                     providers=cfg.providers, threads=cfg.threads)
            self.dense_bytes = sum(a.nbytes for a in self.switcher.tensors().values())
            # NOTE: the load fills the run; it is not a switch (stats()["load"] has its figures)
            self.load_result = self._switch(task if task is not None else reader.tasks[0])
            self.switcher.history.pop()
            key = self.engine.declared_key()
            if key is not None:         # else measured at the first run of each shape
                self._costs[key] = self._measure(key)
        except BaseException:
            self.close()                        # a failed load gives back what it took
            raise

    @property
    def active(self) -> str | None:
        return self.switcher.active

    @property
    def tasks(self) -> list[str]:
        return self.reader.tasks

    @property
    def storage(self):
        """The pack's storage (read mode, counters)."""
        return self.reader.storage

    # --- switching -----------------------------------------------------------------------
    def switch(self, task: str) -> SwitchResult:
        """Make ``task`` active. UnknownTask, PackCorrupt or BudgetExceeded leave the
        previous task active and runnable."""
        with self._waiter():
            self._check_open()
            return self._switch(task)

    def _switch(self, task: str) -> SwitchResult:
        changed = self.switcher.changed_positions(task)
        if len(changed):
            self._drop_fast()           # NOTE: before any weight byte changes
        prev = self.active
        res = self.switcher.switch(task)
        fleet = getattr(self.rt, "fleet", None)
        if fleet is not None:           # NOTE: only queues a report; never waits on the server
            fleet.switched(self, prev, task, res, self.switcher.task_blocks(task)[changed])
        self._runs_since_switch = 0
        self._prepack_skipped = ""
        if self.prepack == "sync":
            self._start_prepack(wait=True)
        return res

    def prewarm(self, tasks: list[str]) -> dict:
        with self._lock:
            self._check_open()
            return self.switcher.prewarm(list(tasks))

    def prewarm_weighted(self, weighted: list[tuple[str, float]], stop=lambda: False) -> list[int]:
        """Fill spare slots from ``(task, weight)`` pairs (a server's hint), blocks ranked by
        the summed weight of the tasks needing them, within free and evictable memory.
        Runs in turns of PREWARM_STEP blocks and stops as soon as a request waits for this
        model or ``stop()`` says so. Returns the block indices loaded."""
        with self._lock:
            self._check_open()
            order, _ = self.switcher.plan([(t, w) for t, w in weighted if t in self.tasks])
            # NOTE: wanted blocks already resident are touched first (no read): else the
            # first loads evict them as least recently used and they are read back later
            cached = self.switcher.cache.contains
            blocks = self.reader.blocks
            here = [b for b in order if cached(blocks[b].hash)]
            self.switcher.prefetch(here[::-1])
            order = [b for b in order if not cached(blocks[b].hash)]
        got: list[int] = []
        for i in range(0, len(order), PREWARM_STEP):
            if self._waiting or stop():
                break
            with self._lock:
                if self.closed:
                    return got
                got += self.switcher.prefetch(order[i:i + PREWARM_STEP])
        with self._lock:            # the most wanted touched last: LRU gives it up last
            if not self.closed and not self._waiting:
                self.switcher.prefetch(got[::-1])
        return got

    @contextlib.contextmanager
    def _waiter(self):
        """The model's lock, counted as wanted meanwhile (a hinted prewarm gives way)."""
        with self._count_lock:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._count_lock:
                self._waiting -= 1
        try:
            yield
        finally:
            self._lock.release()

    # --- running -------------------------------------------------------------------------
    def run(self, inputs: dict, task: str | None = None) -> dict[str, np.ndarray]:
        """Outputs of the active task, or of ``task`` (switched to first, atomically)."""
        with self._waiter():
            self._check_open()
            if task is not None and task != self.active:
                self._switch(task)
            if self.active is None:
                raise RuntimeError("no task is active (a failed switch could not restore it); "
                                   "call switch()")
            t0 = time.perf_counter()
            feeds = self.engine.check_inputs(inputs)
            out = self._run_charged(feeds)
            self._run_ms.append(1e3 * (time.perf_counter() - t0))
            self._runs_since_switch += 1
            if self.prepack == "auto" and self._runs_since_switch >= PREPACK_AFTER_RUNS:
                self._start_prepack(wait=False)
            return out

    def _run_charged(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run in pieces whose working memory is charged to the engine allowance while
        they run. BudgetExceeded before any work when not one item fits."""
        eng, arena = self.engine, self.rt.arena
        cost = self._cost_of(feeds)
        n = eng.items(feeds)
        run = self._fast.run if self._fast is not None else eng.run_checked
        outs, done = [], 0
        while done < n:
            m = arena.charge_items(self._act_charge, cost.fixed, cost.per_item, n - done)
            try:
                piece = feeds if m == n else {k: v[done:done + m] for k, v in feeds.items()}
                outs.append(run(piece))
            finally:
                arena.discharge(self._act_charge)
                # NOTE: what a piece freed goes back to the OS before the next one runs:
                # malloc keeps it otherwise, and pieces of 8 MiB each grew RSS by 27 MiB
                if m < n or cost.bytes(m) >= TRIM_AFTER:
                    give_back_heap()
            done += m
        if len(outs) == 1:
            return outs[0]
        self._split_runs += 1
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def _cost_of(self, feeds: dict[str, np.ndarray]) -> ActivationCost:
        key = self.engine.shape_key(feeds)
        cost = self._costs.get(key)
        if cost is None:
            cost = self._costs[key] = self._measure(key)
            while len(self._costs) > SHAPES_KEPT:
                self._costs.popitem(last=False)
        self._costs.move_to_end(key)
        return cost

    def _measure(self, key: tuple) -> ActivationCost:
        """Working memory of a run of these shapes, measured: a probe of one zero item,
        then (charged, where the allowance holds it) one of k; a line through both.
        NOTE: the one-item probe runs uncharged: its size is what it finds out."""
        eng, arena = self.engine, self.rt.arena
        eng.run_checked(eng.zeros(key, 1))  # a first run sets up ORT's own state (threads,
        one = eng.measure_peak(key, 1)      # kernels): not working memory of every run
        if not eng.batch_axis:
            return ActivationCost(math.ceil(ACTIVATION_MARGIN * one), 0)
        k = min(PROBE_MAX_ITEMS, max(2, PROBE_INPUT_BYTES // max(1, eng.input_bytes(key))))
        try:
            k = arena.charge_items(self._act_charge, 0, max(one, 1), k)
        except BudgetExceeded:
            k = 0
        try:
            many = eng.measure_peak(key, k) if k >= 2 else 0
        finally:
            arena.discharge(self._act_charge)
        slope = (max(0, many - one) / (k - 1)) if k >= 2 else 0
        if slope <= 0:                      # nothing learnt from k items: one item each
            slope = one
        fixed = max(0.0, one - slope)
        cost = ActivationCost(math.ceil(ACTIVATION_MARGIN * fixed),
                              max(1, math.ceil(ACTIVATION_MARGIN * slope)))
        log.info("%s: working memory %d bytes per item + %d (probes of 1 and %d items)",
                 self.name, cost.per_item, cost.fixed, k)
        return cost

    # --- pre-packed session --------------------------------------------------------------
    @property
    def prepacked(self) -> bool:
        return self._fast is not None

    def wait_prepacked(self, timeout: float | None = None) -> bool:
        t = self._building
        if t is not None:
            t.join(timeout)
        return self._fast is not None

    def _start_prepack(self, wait: bool) -> None:
        if self._fast is not None or self._building is not None or self._prepack_skipped:
            return
        need = int(PREPACK_FACTOR * self.dense_bytes)
        try:
            self.rt.arena.charge(self._charge, need)
        except BudgetExceeded as e:
            self._prepack_skipped = str(e)
            log.info("running %s on bound weights only: %s", self.active, e)
            return
        gen = self._gen
        if wait:
            _build(weakref.ref(self), self.engine, gen)
            return
        # NOTE: the thread holds a weak reference: a model dropped mid-build is collected
        self._building = threading.Thread(target=_build, args=(weakref.ref(self), self.engine,
                                                               gen),
                                          daemon=True, name="edgert-prepack")
        self._building.start()

    def _built(self, sess, gen: int) -> None:
        with self._lock:
            if threading.current_thread() is self._building:
                self._building = None
            if self.closed:
                return
            if sess is not None and gen == self._gen:
                self._fast = sess
                self._prepack_builds.append(sess.build_seconds)
            elif self._fast is None and self._building is None:
                self.rt.arena.discharge(self._charge)
                if sess is None:
                    self._prepack_skipped = "build failed"

    def _drop_fast(self) -> None:
        self._gen += 1
        self._fast = None
        if self._building is None:
            self.rt.arena.discharge(self._charge)
        # NOTE: a build still running copies weights that are about to change; _built sees
        # the generation moved on, throws the session away and discharges.

    # --- accounting ----------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            self._check_open()
            sw = self.switcher.stats()
            hist = self.switcher.history
            runs = list(self._run_ms)
            return {**sw,
                    "name": self.name, "kind": self.kind,
                    "tasks": self.tasks,
                    "load": vars(self.load_result),
                    "last_switch": vars(hist[-1]) if hist else None,
                    "switch_ms": summary([1e3 * r.seconds for r in hist]),
                    "run_ms": summary(runs), "runs": len(runs),
                    "storage": self.reader.storage.stats(),
                    "zero_fill": {"blocks": self.reader.zero_blocks_filled,   # memset, not read
                                  "bytes": self.reader.zero_bytes_filled},
                    "engine": {"providers": self.engine.active_providers,
                               "session_build_s": self.engine.build_seconds,
                               "prepacked": self._fast is not None,
                               "prepack_mode": self.prepack,
                               "prepack_builds_s": list(self._prepack_builds),
                               "prepack_skipped": self._prepack_skipped,
                               **self._activation_stats()},
                    "memory": {"dense_task_bytes": self.dense_bytes, **self.memory()}}

    def _activation_stats(self) -> dict:
        key = self.engine.declared_key()
        cost = self._costs.get(key) if key is not None else None
        return {"activation_bytes_per_item": cost.per_item if cost else None,
                "activation_bytes_fixed": cost.fixed if cost else None,
                "batch_axis": self.engine.batch_axis,
                "split_runs": self._split_runs}

    def close(self) -> None:
        """Stop a pre-packing build, give back the run, spare blocks, charge and pack file."""
        with self._lock:
            if not self.closed:
                self._drop_fast()
            building = self._building
        if building is not None and building is not threading.current_thread():
            building.join()
        super().close()
        self._fast = None


def _build(ref, engine, gen: int) -> None:
    """Build a pre-packed session off the caller's thread; hand it to the model if it lives."""
    try:
        sess = engine.build_prepacked()
    except Exception as e:  # ORT refused: keep running on bound weights
        log.warning("pre-packed session build failed: %s", e)
        sess = None
    m = ref()
    if m is not None:
        m._built(sess, gen)
