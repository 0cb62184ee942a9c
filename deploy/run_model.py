"""Run an edgecomp package on the device itself, with only TVM's runtime and numpy installed.

This is what an app does with a package: load ``model.so`` into a Relax VM and call ``main``.
It needs no edgecomp and no compiler on the device::

    pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy
    TVM_USE_RUNTIME_LIB=1 python3 run_model.py PACKAGE_DIR --input input=x.npy -o out.npz

A package compiled with ``--weights external`` has its weights in ``weights.params`` beside
``model.so``; they are loaded and passed to ``main`` after the inputs. Inputs not given are
seeded random data of the manifest's shape; ``--repeat N`` also prints the latency (median,
min, max in ms).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    """Load the package, check its checksums, run it, print or save the outputs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path, help="folder with model.so and manifest.json")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    parser.add_argument("-o", "--output", metavar="OUT.npz", help="save the outputs here")
    parser.add_argument("--repeat", type=int, default=0, help="also time N runs")
    args = parser.parse_args(argv)

    manifest = json.loads((args.package / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        if not (args.package / name).is_file():
            print(
                f"run_model: {args.package / name} is missing; copy the whole package",
                file=sys.stderr,
            )
            return 1
        digest = hashlib.sha256((args.package / name).read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            print(f"run_model: {name} does not match its checksum in the manifest", file=sys.stderr)
            return 1

    import tvm
    from tvm.runtime.vm import VirtualMachine

    # model.so calls into the runtime it was compiled against: another TVM may crash in it.
    if manifest.get("tvm") not in (None, tvm.__version__):
        print(
            f"run_model: the model was compiled with TVM {manifest['tvm']} but this device has"
            f" TVM {tvm.__version__}: install apache-tvm=={manifest['tvm']} or compile it again",
            file=sys.stderr,
        )
        return 1

    given = dict(item.split("=", 1) for item in args.input)
    rng = np.random.default_rng(0)
    inputs = []
    for spec in manifest["inputs"]:
        if spec["name"] in given:
            array = np.load(given[spec["name"]]).astype(spec["dtype"])
        else:
            array = rng.standard_normal(spec["shape"]).astype(spec["dtype"])
        inputs.append(tvm.runtime.tensor(array))

    # --weights external: main takes the weights after the inputs, in the order of their names.
    weights = manifest.get("weights")
    if isinstance(weights, dict) and weights.get("file"):
        params = tvm.runtime.load_param_dict((args.package / weights["file"]).read_bytes())
        inputs += [params[name] for name in sorted(params)]

    device = tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(str(args.package / "model.so")), device)
    result = vm["main"](*inputs)
    results = list(result) if not hasattr(result, "numpy") else [result]
    outputs = {
        spec["name"]: r.numpy() for spec, r in zip(manifest["outputs"], results, strict=True)
    }
    for name, value in outputs.items():
        print(f"{name}: shape {value.shape} {value.dtype}, first values {value.ravel()[:5]}")
    if args.output:
        np.savez(args.output, **outputs)
    if args.repeat:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            vm["main"](*inputs)
            times.append((time.perf_counter() - start) * 1e3)
        print(
            f"latency: median {np.median(times):.3f} ms, min {min(times):.3f} ms,"
            f" max {max(times):.3f} ms over {args.repeat} runs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
