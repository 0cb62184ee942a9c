"""The main job, end to end on an emulated board, with nothing but this machine.

Compile the bundled CNN for the board, start a tracker and the emulated device on loopback,
run the package on the device over RPC, compare with ONNX Runtime on the host, time it on the
device, stop what was started, and leave the package folder for an app to ship.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgecomp.build import compile_model
from edgecomp.device import start_emulated_device, stop_emulated_devices
from edgecomp.errors import EdgecompError
from edgecomp.models import bundled_model_path
from edgecomp.progress import console, step
from edgecomp.reference import max_abs_error, onnxruntime_outputs
from edgecomp.rpc import free_port, start_tracker
from edgecomp.runner import open_package, read_inputs
from edgecomp.targets import load_board


def run_demo(board: str = "rasp4b", outdir: str | os.PathLike[str] = "edgecomp-out/rasp4b") -> bool:
    """Run the whole path on an emulated board; True when the device matches ONNX Runtime."""
    spec = load_board(board)
    if spec.emulate is None:
        raise EdgecompError(f"board {board!r} cannot be emulated here: {spec.emulate_why}")
    model = bundled_model_path()
    package = compile_model(model, spec, outdir)

    tracker_port = free_port()
    tracker = start_tracker(host="127.0.0.1", port=tracker_port)
    device_port = free_port()
    try:
        start_emulated_device(
            spec, port=device_port, tracker=f"127.0.0.1:{tracker_port}", key=spec.rpc_key
        )
        with step("running the package on the device over RPC"):
            loaded = open_package(
                package.path, tracker=f"127.0.0.1:{tracker_port}", key=spec.rpc_key, timeout=120
            )
            inputs = read_inputs(loaded.package.inputs, None, seed=0)
            outputs = loaded.run(inputs)
        reference = onnxruntime_outputs(
            model, {s.name: a for s, a in zip(package.inputs, inputs, strict=True)}
        )
        error = max_abs_error(outputs, reference)
        match = all(
            np.allclose(o, r, rtol=1e-4, atol=1e-5) for o, r in zip(outputs, reference, strict=True)
        )
        with step("timing it on the device"):
            stats = loaded.bench(inputs, repeat=10)
    finally:
        stop_emulated_devices(device_port)
        tracker.terminate()

    verdict = (
        "[green]outputs match ONNX Runtime[/green]"
        if match
        else "[red]OUTPUTS DIFFER from ONNX Runtime[/red]"
    )
    console.print(f"{verdict}: max abs error {error:.3g} (rtol 1e-4, atol 1e-5)")
    console.print(
        f"device latency ({board}, emulated by qemu-user: correct, not real-device speed):"
        f" median {stats['median_ms']:.2f} ms, min {stats['min_ms']:.2f} ms,"
        f" max {stats['max_ms']:.2f} ms"
        f" over {stats['repeat']} runs"
    )
    files = " + ".join(["manifest.json", *sorted(package.manifest["files"])])
    console.print(f"deployable package: {Path(package.path).resolve()} ({files})")
    return match
