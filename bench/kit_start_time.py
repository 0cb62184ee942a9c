"""Process start to first output: the kit's native runner vs the Python runner, emulated rasp4b.

Compiles the bundled model for ``rasp4b`` (weights embedded and external), makes each kit,
builds its C++ runner with the kit's CMake and aarch64 toolchain file, then times, per run,
from process start to the first output line on stdout:

- native: ``qemu-aarch64 -L /usr/aarch64-linux-gnu build/edgecomp_run model --input ...``
- Python: ``deploy/run_model.py`` under the emulated device's Python (qemu-aarch64 +
  Debian arm64 sysroot + the aarch64 TVM wheels), as ``tests/test_run_device.py`` does.

Also prints the kit's size and the runtime libraries' sizes. Emulated times show start-up
cost under qemu-user (dominated by Python's imports), not a real board's.

Run:  PYTHONPATH=. .venv/bin/python bench/kit_start_time.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from edgecomp.build import compile_model
from edgecomp.device import prepare
from edgecomp.kit import make_kit
from edgecomp.models import bundled_model_path
from edgecomp.resources import data_dir
from edgecomp.targets import load_board

QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]


def first_output_seconds(cmd: list[str]) -> float:
    """Seconds from starting ``cmd`` to its first stdout line; the process must succeed."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{cmd[0]} failed: {err.strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    python = prepare(load_board("rasp4b")) / "python"
    work = Path(tempfile.mkdtemp(prefix="kit-start-"))
    x = work / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32))
    results = {}
    for weights in ("embedded", "external"):
        package = compile_model(
            bundled_model_path(), "rasp4b", work / f"pkg-{weights}", weights=weights
        )
        archive = make_kit(package.path, work / f"rasp4b-{weights}.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(work / weights, filter="data")
        kit = work / weights / archive.name.removesuffix(".tar.gz")
        toolchain = f"-DCMAKE_TOOLCHAIN_FILE={kit / 'cpp' / 'toolchain-aarch64.cmake'}"
        for cmake in (["-S", "cpp", "-B", "build", toolchain], ["--build", "build"]):
            subprocess.run(["cmake", *cmake], cwd=kit, check=True, capture_output=True)
        native = [*QEMU, str(kit / "build" / "edgecomp_run"), str(kit / "model"),
                  "--input", f"input={x}"]  # fmt: skip
        py = [str(python), str(data_dir("deploy") / "run_model.py"), str(kit / "model"),
              "--input", f"input={x}"]  # fmt: skip
        times = {
            "native": [first_output_seconds(native) for _ in range(args.runs)],
            "python": [first_output_seconds(py) for _ in range(args.runs)],
        }
        libs = {p.name: p.stat().st_size for p in sorted((kit / "lib").glob("*.so"))}
        results[weights] = {
            "kit_bytes": archive.stat().st_size,
            "runtime_lib_bytes": libs,
            "native_s": float(np.median(times["native"])),
            "python_s": float(np.median(times["python"])),
        }
        print(
            f"{weights:9} kit {archive.stat().st_size / 1e6:.2f} MB;"
            f" native first output {results[weights]['native_s']:.2f} s,"
            f" Python {results[weights]['python_s']:.2f} s (median of {args.runs})"
        )
    print("runtime libraries:", ", ".join(f"{n} {b / 1e6:.2f} MB" for n, b in libs.items()))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
