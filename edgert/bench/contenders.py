"""The contenders of `edgert bench switch` that its sparse rows (switch_pruned.py) share:
one way to get from the current task to the next, and edgert's own switch."""
from __future__ import annotations


class Contender:
    """One way to get from the current task to the next: ``switch(t) -> (seconds, bytes)``."""
    name = ""

    def switch(self, task: str) -> tuple[float, int]:
        raise NotImplementedError


class EdgertSwitch(Contender):
    def __init__(self, cfg, pack, mode: str, first: str, lm_pack: str | None = None):
        from ..runtime import Runtime
        self.name, self.mode = {"warm": "(a) edgert warm", "cold": "(a) edgert cold",
                                "mono": "(d) monolithic reload",
                                "cold+lm": "(e) edgert cold, MoE LM beside"}[mode], mode
        self.rt = Runtime(cfg)
        self.lm = None
        if lm_pack is not None:   # co-residence: an MoE LM in the same runtime, used once
            self.lm = self.rt.load(lm_pack)
            self.lm.generate(list(b"import os\ndef "), max_new_tokens=16)
        self.m = self.rt.load(pack, task=first, prepack="off",
                              keep_displaced=(mode == "warm"))
        if mode == "warm":
            self.m.prewarm(self.m.tasks)
            for t in self.m.tasks:          # every task's blocks pass through the run once
                self.m.switch(t)
            self.m.switch(first)

    def switch(self, task):
        sw = self.m.switcher
        if self.mode != "warm":
            sw.cache.clear()
            if self.m.storage.mode != "direct":
                self.m.storage.drop_cache()
        if self.mode == "mono":
            sw.invalidate()
        r = self.m.switch(task)
        if self.mode == "warm":
            assert r.from_storage == 0, "warm contender read from storage"
        return r.seconds, r.bytes_moved
