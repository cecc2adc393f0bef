"""Benchmark 3: DKIM signatures per second on one core (bench/bench_dkim.py), vs dkimpy."""

from __future__ import annotations

import json
import sys

from benchkit import procs
from benchkit.context import BENCH, Context
from benchkit.report import Figure, Target


def run(ctx: Context) -> Figure:
    out = ctx.work / "dkim.json"
    argv = [sys.executable, str(BENCH / "bench_dkim.py"), "--json", str(out)]
    procs.run([*argv, "--quick"] if ctx.quick else argv, timeout=300)
    result = json.loads(out.read_text())["dkim"]
    return Figure(
        "dkim",
        "DKIM signing, one core",
        "sig/s",
        result["sendkit_per_s"],
        peer=result["dkimpy_per_s"],
        peer_name="dkimpy",
        target=Target("value", ">=", 2000),
        details={
            "median_us": result["median_us"],
            "openssl_rsa_per_s": result.get("openssl_rsa_per_s"),
        },
    )
