"""Run and time a package, in this process (``--local``) or on a device over TVM RPC."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from edgecomp.errors import EdgecompError
from edgecomp.frontend import TensorSpec
from edgecomp.package import Package


@dataclass
class Loaded:
    """A package loaded on a device (this machine or a remote one), ready to call."""

    package: Package
    vm: relax.VirtualMachine
    device: tvm.runtime.Device
    session: Any | None  # tvm.rpc.RPCSession; kept alive as long as the VM is used
    # External weights (``weights.params``) on the device, passed to main after the inputs.
    weights: list[tvm.runtime.Tensor] = field(default_factory=list)

    def _to_device(self, arrays: list[np.ndarray]) -> list[tvm.runtime.Tensor]:
        """``main``'s arguments: the inputs on the device, then the external weights."""
        return [tvm.runtime.tensor(a, self.device) for a in arrays] + self.weights

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run the model once; returns the outputs as numpy arrays, in manifest order."""
        result = self.vm["main"](*self._to_device(inputs))
        items = list(result) if isinstance(result, (tvm.ir.Array, tuple, list)) else [result]
        return [r.numpy() for r in items]

    def bench(
        self, inputs: list[np.ndarray], repeat: int = 20, warmup: int = 2
    ) -> dict[str, float]:
        """Latency in milliseconds over ``repeat`` runs, measured on the device itself."""
        if repeat < 1:
            raise EdgecompError(f"--repeat must be at least 1, not {repeat}")
        args = self._to_device(inputs)
        timer = self.vm.time_evaluator(
            "main", self.device, number=1, repeat=repeat, min_repeat_ms=0
        )
        for _ in range(warmup):
            self.vm["main"](*args)
        times = np.asarray(timer(*args).results) * 1e3
        return {
            "median_ms": float(np.median(times)),
            "min_ms": float(times.min()),
            "max_ms": float(times.max()),
            "mean_ms": float(times.mean()),
            "repeat": repeat,
        }


def host_arch() -> str:
    """ELF architecture name of this machine."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(
        machine, "arm" if machine.startswith("armv") else machine
    )


def load_local(package: Package) -> Loaded:
    """Load a package in this process; it must have been built for this machine's architecture."""
    if package.arch != host_arch():
        raise EdgecompError(
            f"package {package.path} was built for {package.manifest['board']} ({package.arch})"
            f" and cannot run on this {host_arch()} machine: run it on the device with --rpc or"
            " --tracker, or compile it with --target host"
        )
    device = tvm.cpu()
    lib = tvm.runtime.load_module(str(package.library))
    return Loaded(
        package, relax.VirtualMachine(lib, device), device, None, _weights(package, device)
    )


def _weights(package: Package, device: tvm.runtime.Device) -> list[tvm.runtime.Tensor]:
    """The package's external weights on ``device`` (read here, copied over RPC if remote)."""
    from edgecomp.weights import load_weights

    path = package.weights_file
    if path is None:
        return []
    if not path.is_file():
        raise EdgecompError(
            f"package {package.path} lacks its weights file {path.name}; compile it again"
        )
    return load_weights(path, device)


def load_remote(package: Package, session: Any) -> Loaded:
    """Upload a package's library to an RPC session and load it there.

    The device's architecture is checked first when its RPC server reports it (edgecomp's
    device launcher does); otherwise a load failure is reported with the likely cause.
    """
    from edgecomp.rpc import device_arch

    arch = device_arch(session)
    if arch is not None and arch != package.arch:
        raise EdgecompError(
            f"package {package.path} was built for {package.arch} ({package.manifest['board']})"
            f" but the device is {arch}: compile it with the device's --target"
        )
    session.upload(str(package.library))
    try:
        lib = session.load_module(package.library.name)
    except Exception as err:  # an RPCError carrying the remote dlopen message
        raise EdgecompError(
            f"the device could not load {package.library.name} (built for {package.arch});"
            f" is the device of that architecture? {str(err).strip().splitlines()[-1]}"
        ) from err
    device = session.cpu() if package.manifest["target"].get("kind") == "llvm" else session.cl()
    return Loaded(
        package, relax.VirtualMachine(lib, device), device, session, _weights(package, device)
    )


def read_inputs(
    specs: list[TensorSpec], given: dict[str, str] | None, seed: int = 0
) -> list[np.ndarray]:
    """Inputs in call order: from ``.npy`` files where given, else seeded standard-normal data."""
    given = dict(given or {})
    unknown = sorted(set(given) - {s.name for s in specs})
    if unknown:
        raise EdgecompError(
            f"--input names {', '.join(unknown)}, which the model does not have; its inputs are:"
            f" {', '.join(s.name for s in specs)}"
        )
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        if spec.name in given:
            path = Path(given[spec.name])
            try:
                array = np.load(path)
            except (OSError, ValueError) as err:
                raise EdgecompError(
                    f"--input {spec.name}={path}: cannot read it as .npy ({err})"
                ) from err
            if tuple(array.shape) != spec.shape:
                raise EdgecompError(
                    f"--input {spec.name}={path} has shape {tuple(array.shape)}; the model wants"
                    f" {spec.shape}"
                )
            arrays.append(array.astype(spec.dtype, copy=False))
        else:
            arrays.append(rng.standard_normal(spec.shape).astype(spec.dtype))
    return arrays


def parse_named_files(values: list[str] | None, flag: str) -> dict[str, str]:
    """Parse repeated ``NAME=FILE`` flag values."""
    out = {}
    for value in values or []:
        name, sep, file = value.partition("=")
        if not sep or not name or not file:
            raise EdgecompError(f"{flag} {value!r} does not parse: write NAME=FILE.npy")
        out[name] = file
    return out


def save_outputs(
    specs: list[TensorSpec], outputs: list[np.ndarray], path: str | os.PathLike[str]
) -> None:
    """Write outputs to an ``.npz`` keyed by output name."""
    arrays: dict[str, Any] = {s.name: o for s, o in zip(specs, outputs, strict=True)}
    np.savez(path, **arrays)


def open_package(
    path: str | os.PathLike[str],
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    local: bool = False,
    timeout: float = 30.0,
) -> Loaded:
    """Read a package and load it where the caller asked: here, an RPC server, or via a tracker.

    Parameters
    ----------
    path
        The package folder written by ``edgecomp compile``.
    rpc
        ``HOST:PORT`` of a TVM RPC server (e.g. ``edgecomp device emulate``).
    tracker
        ``HOST:PORT`` of a TVM RPC tracker; the device is requested by ``key``
        (default: the board's RPC key from the manifest).
    local
        Run in this process (packages built for this machine, ``--target host``).
    timeout
        Seconds to wait for the device before giving up.
    """
    from edgecomp.package import read_package

    package = read_package(path)
    chosen = sum(x is not None for x in (rpc, tracker)) + bool(local)
    if chosen != 1:
        raise EdgecompError(
            "say where to run: exactly one of --rpc HOST:PORT, --tracker HOST:PORT, --local"
        )
    if local:
        return load_local(package)
    from edgecomp.rpc import connect

    session = connect(
        rpc=rpc, tracker=tracker, key=key or package.manifest["rpc_key"], timeout=timeout
    )
    return load_remote(package, session)
