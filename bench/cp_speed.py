"""CP decomposition time and per-layer error: the old ALS against edgecomp's fast CP.

AlexNet at ``flops=2x`` and VGG-19 at ``flops=3x`` (``edgecomp.models.light_model``, seeded
He-normal weights), every layer ``DecomposeConv`` factorizes (AlexNet's grouped conv2 is two
factorizations). The old algorithm is :func:`edgecomp.decompose.cp.cp_als_reference` (float64
ALS from a random start, at most 300 sweeps); the new one is what ``edgecomp compile`` runs.
The factor cache is off for both (a temporary ``EDGECOMP_CACHE``), so every factorization runs.

Run:  PYTHONPATH=. .venv/bin/python bench/cp_speed.py [--which old new] [--models alexnet]
Each algorithm's per-layer results go to bench/results/cp_speed_<model>_<algo>.json; once both
exist, the comparison table is written to bench/results/cp_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = {"alexnet": "flops=2x", "vgg19": "flops=3x"}


def run(model_name: str, algo: str) -> list[dict]:
    """Decompose ``model_name``'s convs with CP and record every factorization."""
    # A fresh, empty cache, so that every factorization runs; CP_SPEED_CACHE names it (it must
    # not exist yet) to keep the new factors for bench/compress_end_to_end.py.
    keep = os.environ.get("CP_SPEED_CACHE")
    if keep and Path(keep).exists():
        raise SystemExit(f"CP_SPEED_CACHE={keep} exists; name a new folder")
    os.environ["EDGECOMP_CACHE"] = keep or tempfile.mkdtemp(prefix="edgecomp-cp-speed-")
    os.environ.pop("EDGECOMP_NO_FACTOR_CACHE", None)
    import edgecomp.decompose.rank as rank_mod
    from edgecomp.decompose.cp import cp_als_reference, cp_decompose
    from edgecomp.frontend import import_onnx
    from edgecomp.models import light_model
    from edgecomp.passes.decompose_conv import decompose_conv

    algorithm = cp_als_reference if algo == "old" else cp_decompose
    calls: list[dict] = []

    def timed(weight: np.ndarray, rank: int, **kw):  # noqa: ANN003, ANN202
        start = time.perf_counter()
        f = algorithm(weight, rank)
        seconds = time.perf_counter() - start
        calls.append(
            {
                "shape": list(weight.shape),
                "rank": rank,
                "error": f.error,
                "seconds": seconds,
            }
        )
        print(
            f"  {algo} {model_name} {'x'.join(map(str, weight.shape))} rank {rank}: "
            f"error {f.error:.4f}, {seconds:.1f} s",
            flush=True,
        )
        return f

    rank_mod.cp_decompose = timed  # type: ignore[assignment]
    mod, _ = import_onnx(light_model(model_name, seed=0))
    start = time.perf_counter()
    decompose_conv(mod, "cp", POLICIES[model_name])
    total = time.perf_counter() - start
    print(f"{algo} {model_name}: {total:.1f} s in all", flush=True)
    return calls


def table() -> str:
    """The comparison as markdown; layers the old run did not reach show as not run."""
    lines = []
    for model_name, policy in POLICIES.items():
        files = {a: RESULTS / f"cp_speed_{model_name}_{a}.json" for a in ("old", "new")}
        if not files["new"].is_file():
            continue
        new = json.loads(files["new"].read_text())
        old = json.loads(files["old"].read_text()) if files["old"].is_file() else []
        lines += [
            f"**{model_name}, CP at {policy}**",
            "",
            "| layer kernel (per group) | rank | old error | new error | old s | new s |",
            "|---|---|---|---|---|---|",
        ]
        by_index = {o.get("index", i): o for i, o in enumerate(old)}
        for i, n in enumerate(new):
            o = by_index.get(i)
            old_err = f"{o['error']:.4f}" if o else "not run"
            old_s = f"{o['seconds']:.1f}" if o else "not run"
            lines.append(
                f"| {'x'.join(map(str, n['shape']))} | {n['rank']} | {old_err} "
                f"| {n['error']:.4f} | {old_s} | {n['seconds']:.1f} |"
            )
        t_new = sum(n["seconds"] for n in new)
        t_old = sum(o["seconds"] for o in old)
        t_same = sum(new[i]["seconds"] for i in by_index)
        lines += [f"| **total** | | | | | **{t_new:.1f}** |", ""]
        if old:
            lines += [
                f"On the layers both ran: old {t_old:.1f} s, new {t_same:.1f} s "
                f"({t_old / max(t_same, 1e-9):.1f}x).",
                "",
            ]
        if old:
            both = [(o, new[i]) for i, o in by_index.items()]
            worse = sum(n["error"] > o["error"] for o, n in both)
            lines += [
                f"Layers compared: {len(both)}; where the new error is higher: {worse}.",
                "",
            ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--which", nargs="+", default=["old", "new"], choices=["old", "new"])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    RESULTS.mkdir(exist_ok=True)
    for model_name in args.models:
        for algo in args.which:
            calls = run(model_name, algo)
            out = RESULTS / f"cp_speed_{model_name}_{algo}.json"
            out.write_text(json.dumps(calls, indent=1))
    text = table()
    if text:
        (RESULTS / "cp_speed.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
