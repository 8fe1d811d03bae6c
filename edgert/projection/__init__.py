"""The offline projection of the expert cache, apart from the cache itself (experts/):
routing traces (trace.py), their replay through the real cache on a virtual clock
(replay.py), cross-layer slot sharing (share.py) and the per-device cost model
(costmodel.py). Benchmarks use all of it; at run time only the cost model is read, by the
model layer (kinds/moe.py: the default policy and prefetch from a config's ``perf:``).
Nothing under experts/ imports this package."""
