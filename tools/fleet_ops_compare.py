"""`edgert bench fleet`'s throughput load (this tree's generator) against the `edgert server`
processes of a checkout, on Redis only (one server, then two): two trees' servers compared
on the same machine minutes apart, with the CPU each server and Redis spent per op.

    PYTHONPATH=. .venv/bin/python tools/fleet_ops_compare.py /path/to/other/checkout
    PYTHONPATH=. .venv/bin/python tools/fleet_ops_compare.py "$PWD"
"""
from __future__ import annotations

import os
import sys
import tempfile

from edgert.bench import fleet_kv as K
from edgert.control.protocol import decode_reply, encode_request


def main() -> None:
    tree = os.path.abspath(sys.argv[1])
    os.environ["PYTHONPATH"] = tree
    os.chdir(tree)               # NOTE: `python -m edgert` imports from the working directory
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            red = K.Redis(tmp)
            ports = [K._free_port() for _ in range(n)]
            procs = [K._server(red.url, p) for p in ports]
            try:
                c0 = sum(K._cpu_s(p.pid) for p in procs), red.cpu_s()
                r = K._load(ports, 5.0, encode_request, decode_reply)
                c1 = sum(K._cpu_s(p.pid) for p in procs), red.cpu_s()
                print(f"{tree} redis x{n}: {r['ops_per_s']:.0f} ops/s, errors {r['errors']}, "
                      f"server CPU {1e6 * (c1[0] - c0[0]) / r['ops']:.0f} us/op, Redis CPU "
                      f"{1e6 * (c1[1] - c0[1]) / r['ops']:.1f} us/op, load average "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
            finally:
                for p in procs:
                    K._stop(p)
                red.stop()


if __name__ == "__main__":
    main()
