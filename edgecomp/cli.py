"""The ``edgecomp`` command. It only parses arguments; the work is done by the Python API."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable

from edgecomp.errors import EdgecompError

Handler = Callable[[argparse.Namespace], int]


def _cmd_targets(args: argparse.Namespace) -> int:
    from edgecomp.targets import known_boards, load_board

    for name in known_boards():
        board = load_board(name)
        emulated = "emulated" if board.emulate else "        "
        print(f"{name:14} {board.arch:8} {emulated}  {board.description}")
    return 0


def _decompose_options(args: argparse.Namespace):  # noqa: ANN202 - DecomposeOptions | None
    from edgecomp.build import DecomposeOptions

    if args.decompose is None:
        refuse = getattr(args, "refuse", None)
        asked = args.rank_policy, args.calib, refuse, args.decompose_fc, args.refit
        if any(a is not None for a in asked):
            raise EdgecompError(
                "--rank-policy, --calib, --refuse, --[no-]decompose-fc and --[no-]refit need"
                " --decompose {cp,tucker,kronecker}"
            )
        return None
    calib = None
    if args.calib is not None:
        import numpy as np

        try:
            calib = np.load(args.calib)
        except (OSError, ValueError) as err:
            raise EdgecompError(f"--calib {args.calib}: cannot read it as .npy ({err})") from err
    return DecomposeOptions(
        args.decompose,
        args.rank_policy or "flops=2x",
        calib,
        refuse=getattr(args, "refuse", None) or "auto",
        fc=args.decompose_fc is not False,
        refit=args.refit is not False,
    )


def _cmd_compile(args: argparse.Namespace) -> int:
    from edgecomp.build import compile_model
    from edgecomp.frontend import parse_input_shapes

    package = compile_model(
        args.model,
        args.target,
        args.output,
        input_shapes=parse_input_shapes(args.input_shape),
        decompose=_decompose_options(args),
        weights=args.weights,
        tuning_db=args.tuning_db,
    )
    size = package.manifest["files"]["model.so"]["bytes"]
    weights = package.manifest.get("options", {}).get("weight_bytes", {})
    shrink = (
        f", weights {weights['before'] / 1e6:.1f} -> {weights['after'] / 1e6:.1f} MB"
        if weights and weights["before"] != weights["after"]
        else ""
    )
    print(
        f"{package.path}/model.so  ({size / 1e6:.1f} MB, {package.arch},"
        f" board {package.manifest['board']}{shrink})"
    )
    if package.weights_file is not None:
        size = package.manifest["files"][package.weights_file.name]["bytes"]
        print(f"{package.weights_file}  ({size / 1e6:.1f} MB of weights, loaded by every runner)")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from edgecomp.frontend import parse_input_shapes
    from edgecomp.targets import load_board
    from edgecomp.tuning import Devices, format_table, tune

    board = load_board(args.target)
    where = [w for w in (args.rpc, args.tracker, args.local or None) if w]
    if len(where) != 1:
        raise EdgecompError("say where to measure: exactly one of --rpc, --tracker, --local")
    devices = Devices(
        rpc=args.rpc,
        tracker=args.tracker,
        key=(args.key or board.rpc_key) if args.tracker else None,
        local=args.local,
        device_wait=args.device_wait,
        session_timeout=args.session_timeout,
    )
    result = tune(
        args.model,
        board,
        args.work_dir,
        args.trials,
        devices,
        input_shapes=parse_input_shapes(args.input_shape),
        decompose=_decompose_options(args),
    )
    print(format_table(result))
    return 0


def _cmd_package(args: argparse.Namespace) -> int:
    from edgecomp.kit import make_kit

    kit = make_kit(args.package, args.output, runtime_dir=args.runtime)
    print(
        f"{kit}  ({kit.stat().st_size / 1e6:.1f} MB: model, TVM runtime, headers, C++ runner,"
        " Android sample; unpack it and read its README.md)"
    )
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from edgecomp.analyze import analyze, format_table
    from edgecomp.frontend import parse_input_shapes

    options = _decompose_options(args)
    if options is None:
        raise EdgecompError("analyze needs --decompose {cp,tucker,kronecker}")
    report = analyze(
        args.model,
        options.method,
        options.policy,
        calib=options.calib,
        input_shapes=parse_input_shapes(args.input_shape),
        fc=options.fc,
        refit=options.refit,
    )
    print(format_table(report))
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from edgecomp.decompose.cache import clear_factor_cache, factor_cache_dir

    if args.action == "clear":
        count, size = clear_factor_cache()
        print(
            f"removed {count} cached factorizations ({size / 1e6:.1f} MB) from {factor_cache_dir()}"
        )
    else:
        entries = list(factor_cache_dir().glob("*.npz")) if factor_cache_dir().is_dir() else []
        size = sum(e.stat().st_size for e in entries)
        print(f"{factor_cache_dir()}: {len(entries)} cached factorizations, {size / 1e6:.1f} MB")
    return 0


def _open(args: argparse.Namespace):  # noqa: ANN202 - runner.Loaded
    from edgecomp.runner import open_package

    return open_package(
        args.package,
        rpc=args.rpc,
        tracker=args.tracker,
        key=args.key,
        local=args.local,
        timeout=args.timeout,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from edgecomp.runner import parse_named_files, read_inputs, save_outputs

    loaded = _open(args)
    inputs = read_inputs(loaded.package.inputs, parse_named_files(args.input, "--input"))
    outputs = loaded.run(inputs)
    for spec, out in zip(loaded.package.outputs, outputs, strict=True):
        print(f"{spec.name}: shape {tuple(out.shape)} {out.dtype}, first values {out.ravel()[:5]}")
    if args.check is not None:
        from edgecomp.reference import max_abs_error, onnxruntime_outputs

        ref = onnxruntime_outputs(
            args.check, {s.name: a for s, a in zip(loaded.package.inputs, inputs, strict=True)}
        )
        err = max_abs_error(outputs, ref)
        ok = all(
            __import__("numpy").allclose(o, r, rtol=args.rtol, atol=args.atol)
            for o, r in zip(outputs, ref, strict=True)
        )
        print(
            f"{'outputs match' if ok else 'OUTPUTS DIFFER'} ONNX Runtime: max abs error {err:.3g}"
        )
        if not ok:
            return 1
    if args.output is not None:
        save_outputs(loaded.package.outputs, outputs, args.output)
        print(f"wrote {args.output}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from edgecomp.runner import parse_named_files, read_inputs

    loaded = _open(args)
    inputs = read_inputs(loaded.package.inputs, parse_named_files(args.input, "--input"))
    stats = loaded.bench(inputs, repeat=args.repeat)
    where = "this machine" if args.local else f"the device ({args.rpc or args.tracker})"
    print(
        f"latency on {where}: median {stats['median_ms']:.3f} ms, min {stats['min_ms']:.3f} ms,"
        f" max {stats['max_ms']:.3f} ms over {stats['repeat']} runs"
    )
    if args.json:
        print(json.dumps(stats))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from edgecomp.report import run_report

    timed = args.local or args.rpc or args.tracker
    print(run_report(args.package, loaded=_open(args) if timed else None, plot=args.plot))
    return 0


def _cmd_device_emulate(args: argparse.Namespace) -> int:
    from edgecomp.device import start_emulated_devices
    from edgecomp.targets import load_board

    port = args.port if args.port is not None or args.tracker else 9090
    infos = start_emulated_devices(
        load_board(args.target),
        args.count,
        host=args.host,
        port=port,
        tracker=args.tracker,
        key=args.key,
        timeout=args.timeout,
    )
    for info in infos:
        where = f" (key {info['key']!r} at {args.tracker})" if args.tracker else ""
        print(
            f"emulated {args.target} RPC server on {info['host']}:{info['port']}{where}"
            f" (pid {info['pid']})"
        )
    print(f"stop {'it' if len(infos) == 1 else 'them'} with: edgecomp device stop")
    return 0


def _cmd_device_stop(args: argparse.Namespace) -> int:
    from edgecomp.device import stop_emulated_devices

    stopped = stop_emulated_devices(args.port, args.key)
    for info in stopped:
        print(
            f"stopped {info.get('board', 'device')} on {info['host']}:{info['port']}"
            f" (pid {info['pid']})"
        )
    if not stopped:
        print("no emulated device was running")
    return 0


def _cmd_tracker(args: argparse.Namespace) -> int:
    from edgecomp.rpc import serve_tracker

    serve_tracker(host=args.host, port=args.port)
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    from edgecomp.rpc import list_devices

    devices = list_devices(args.tracker, timeout=args.timeout)
    if args.json:
        print(json.dumps(devices, indent=2))
    elif not devices:
        print(f"no device is registered at the tracker {args.tracker}")
    for d in [] if args.json else devices:
        print(f"{d['key']:14} {d['address']:21} free {d['free']}  queued {d['pending']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgecomp.demo import run_demo

    return 0 if run_demo(board=args.target, outdir=args.output) else 1


def _add_where(p: argparse.ArgumentParser, required: bool = True) -> None:
    where = p.add_argument_group("where to run (exactly one)" if required else "where to time it")
    where.add_argument(
        "--rpc", metavar="HOST:PORT", help="a TVM RPC server, e.g. edgecomp device emulate"
    )
    where.add_argument(
        "--tracker", metavar="HOST:PORT", help="a TVM RPC tracker; the device is asked for by --key"
    )
    where.add_argument(
        "--local", action="store_true", help="this machine (packages compiled with --target host)"
    )
    p.add_argument("--key", help="device key at the tracker (default: the board's RPC key)")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the device (default 30)"
    )
    p.add_argument(
        "--input",
        action="append",
        metavar="NAME=FILE.npy",
        help="an input array; inputs not given are seeded random data",
    )


def _add_input_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME:1x3x224x224",
        help="static shape for a dynamic input",
    )


def _add_decompose(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decomposition")
    g.add_argument(
        "--decompose",
        choices=["cp", "tucker", "kronecker"],
        help="replace dense convolutions by CP, Tucker-2 or Kronecker (GKPD) factor chains",
    )
    g.add_argument(
        "--rank-policy",
        metavar="POLICY",
        help="rank=R | params=3x | flops=2x | error=0.05 | output=0.05 (default flops=2x)",
    )
    g.add_argument(
        "--calib",
        metavar="FILE.npy",
        help="calibration inputs (batch of the model's input): per-layer output errors, and"
        " the refit of each decomposed layer's last factor and bias (see --no-refit)",
    )
    g.add_argument(
        "--decompose-fc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also factorize fully connected layers (Gemm / MatMul with a constant weight) by"
        " truncated SVD under the same rank policy (default on; --no-decompose-fc keeps them"
        " dense)",
    )
    g.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --calib: refit each decomposed layer's last factor and bias by least squares"
        " to the dense network's outputs (default on)",
    )


def _parser() -> argparse.ArgumentParser:
    def sub(name: str, handler: Handler, help_: str, example: str, parent=None):  # noqa: ANN001, ANN202
        p = (parent or subs).add_parser(
            name,
            help=help_,
            description=help_,
            epilog="example:\n" + textwrap.indent(example, "  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    parser = argparse.ArgumentParser(
        prog="edgecomp",
        description="Compile ONNX CNNs for edge boards with TVM; run and time them on the device.",
        epilog=textwrap.dedent("""\
            example, the whole path on an emulated Raspberry Pi 4:
              edgecomp compile model.onnx --target rasp4b -o out/rasp4b
              edgecomp device emulate --target rasp4b --port 9090
              edgecomp run out/rasp4b --rpc 127.0.0.1:9090 --check model.onnx
              edgecomp bench out/rasp4b --rpc 127.0.0.1:9090
              edgecomp device stop"""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from edgecomp import __version__

    parser.add_argument("--version", action="version", version=f"edgecomp {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub("targets", _cmd_targets, "list the boards edgecomp knows", "edgecomp targets")

    p = sub(
        "compile",
        _cmd_compile,
        "compile an ONNX model into a deployable package for a board",
        "edgecomp compile model.onnx --target rasp4b -o out/rasp4b\n"
        "edgecomp compile model.onnx --target rasp3b --input-shape data:1x3x224x224 -o out/rasp3b\n"
        "edgecomp compile model.onnx --target host --decompose cp --rank-policy flops=2x"
        " -o out/host",
    )
    p.add_argument("model", help="the ONNX file")
    p.add_argument(
        "--target",
        required=True,
        metavar="BOARD",
        help="a board name (edgecomp targets) or a board JSON file",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTDIR",
        help="package folder: model.so + manifest.json",
    )
    _add_input_shape(p)
    p.add_argument(
        "--weights",
        choices=["auto", "embedded", "external"],  # edgecomp.weights.WEIGHT_MODES
        default="auto",
        help="weights inside model.so (embedded) or beside it in weights.params (external);"
        " auto (default): external where the board's linker cannot embed them (rasp3b above"
        " 256 MB, e.g. VGG-19), embedded elsewhere",
    )
    _add_decompose(p)
    p.add_argument(
        "--refuse",
        choices=["auto", "all", "none"],  # refuse_chains.REFUSE_MODES (importing it loads TVM)
        help="with --decompose: fuse each factor chain into one kernel where that lowers the"
        " model's planned peak memory (auto, the default), every chain (all: the least memory,"
        " slower where the fused kernel recomputes its halo), or none (separate ops)",
    )

    p.add_argument(
        "--tuning-db",
        metavar="W",
        help="apply the best record per kernel from an edgecomp tune work dir (the others keep"
        " edgecomp's default schedules); default: the records shipped in schedules/BOARD, if any",
    )

    p = sub(
        "tune",
        _cmd_tune,
        "tune edgecomp's kernels for a model on the device: search their schedules with"
        " MetaSchedule, measure candidates on the board, keep the records in a work dir that"
        " compile --tuning-db applies (rerun the same command to resume)",
        "edgecomp tune model.onnx --target rasp4b --tracker 127.0.0.1:9190 --key rasp4b"
        " --trials 500 --work-dir tune-rasp4b\n"
        "edgecomp tune model.onnx --target rasp4b --rpc 192.168.1.20:9090 --trials 200"
        " --work-dir tune-pi\n"
        "edgecomp tune model.onnx --target host --local --trials 300 --work-dir tune-host\n"
        "edgecomp compile model.onnx --target rasp4b --tuning-db tune-rasp4b -o out/rasp4b",
    )
    p.add_argument("model", help="the ONNX file")
    p.add_argument("--target", required=True, metavar="BOARD", help="a board name or JSON file")
    p.add_argument("--trials", type=int, required=True, help="total measured candidates")
    p.add_argument(
        "--work-dir", required=True, metavar="W", help="records, cost model, progress (resumable)"
    )
    where = p.add_argument_group("where to measure (exactly one)")
    where.add_argument("--rpc", metavar="HOST:PORT", help="one device's RPC server")
    where.add_argument(
        "--tracker", metavar="HOST:PORT", help="a tracker: every device under --key measures"
    )
    where.add_argument("--local", action="store_true", help="this machine (--target host)")
    p.add_argument("--key", help="device key at the tracker (default: the board's RPC key)")
    p.add_argument(
        "--device-wait",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for a free device before a candidate counts as failed (default 60)",
    )
    p.add_argument(
        "--session-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds one measuring session may last on the device (default 120)",
    )
    _add_input_shape(p)
    _add_decompose(p)
    p.add_argument(
        "--refuse",
        choices=["auto", "all", "none"],
        help="with --decompose: which factor chains run fused (as for compile)",
    )

    p = sub(
        "package",
        _cmd_package,
        "make an app kit of a package: the model, the board's TVM runtime, headers, a native"
        " C++ runner and an Android sample, in one .tar.gz",
        "edgecomp package out/rasp4b -o rasp4b-kit.tar.gz\n"
        "edgecomp package out/rasp3b -o rasp3b-kit.tar.gz --runtime ~/tvm-armv7/lib",
    )
    p.add_argument("package", help="the package folder from edgecomp compile")
    p.add_argument("-o", "--output", required=True, metavar="KIT.tar.gz", help="the kit to write")
    p.add_argument(
        "--runtime",
        metavar="DIR",
        help="libtvm_runtime.so and libtvm_ffi.so built for the board, where PyPI has none"
        " (armv7, Android, OpenCL); default: the PyPI wheels of the board's architecture",
    )

    p = sub(
        "analyze",
        _cmd_analyze,
        "show per layer what decomposition would do: ranks, params, FLOPs, errors",
        "edgecomp analyze model.onnx --decompose cp --rank-policy flops=2x\n"
        "edgecomp analyze model.onnx --decompose tucker --rank-policy output=0.05"
        " --calib inputs.npy",
    )
    p.add_argument("model", help="the ONNX file")
    _add_input_shape(p)
    _add_decompose(p)

    p = sub(
        "cache",
        _cmd_cache,
        "show or clear the cache of factorizations ($EDGECOMP_CACHE/factors)",
        "edgecomp cache\nedgecomp cache clear",
    )
    p.add_argument("action", nargs="?", choices=["show", "clear"], default="show")

    p = sub(
        "run",
        _cmd_run,
        "run a package once on a device (or here) and print or save its outputs",
        "edgecomp run out/rasp4b --rpc 127.0.0.1:9090 --input data=x.npy -o y.npz\n"
        "edgecomp run out/rasp4b --tracker 127.0.0.1:9190 --key rasp4b --check model.onnx\n"
        "edgecomp run out/host --local",
    )
    p.add_argument("package", help="the package folder from edgecomp compile")
    _add_where(p)
    p.add_argument(
        "-o", "--output", metavar="OUT.npz", help="save the outputs, keyed by output name"
    )
    p.add_argument(
        "--check", metavar="MODEL.onnx", help="compare with ONNX Runtime on this machine"
    )
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance for --check")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance for --check")

    p = sub(
        "bench",
        _cmd_bench,
        "time a package on the device: median, min and max latency over N runs",
        "edgecomp bench out/rasp4b --rpc 127.0.0.1:9090 --repeat 20\n"
        "edgecomp bench out/host --local",
    )
    p.add_argument("package", help="the package folder from edgecomp compile")
    _add_where(p)
    p.add_argument("--repeat", type=int, default=20, help="timed runs (default 20)")
    p.add_argument("--json", action="store_true", help="also print the numbers as JSON")

    p = sub(
        "report",
        _cmd_report,
        "per-layer memory of a package (intermediates, kernel workspaces, planned peak) before"
        " and after edgecomp's MEC and re-fusion; with a device, per-kernel times too",
        "edgecomp report out/host\n"
        "edgecomp report out/host --local --plot memory.png\n"
        "edgecomp report out/rasp4b --rpc 127.0.0.1:9090",
    )
    p.add_argument("package", help="the package folder from edgecomp compile")
    _add_where(p, required=False)
    p.add_argument("--plot", metavar="PNG", help="also plot memory (and times) per layer")

    dev = subs.add_parser(
        "device",
        help="start or stop an emulated device (qemu-user + TVM RPC server)",
        description="start or stop an emulated device (qemu-user + TVM RPC server)",
        epilog="example:\n  edgecomp device emulate --target rasp4b --port 9090\n"
        "  edgecomp device stop",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def device_help(args: argparse.Namespace) -> int:
        dev.print_help()
        return 2

    dev.set_defaults(handler=device_help)
    devsubs = dev.add_subparsers(dest="device_command", metavar="ACTION")
    p = sub(
        "emulate",
        _cmd_device_emulate,
        "prepare (once, then cached) an emulated board and start its RPC server in the background",
        "edgecomp device emulate --target rasp4b --port 9090\n"
        "edgecomp device emulate --target rasp4b --tracker 127.0.0.1:9190 --key rasp4b\n"
        "edgecomp device emulate --count 4 --tracker 127.0.0.1:9190 --key rasp4b",
        parent=devsubs,
    )
    p.add_argument(
        "--target", default="rasp4b", metavar="BOARD", help="the board to emulate (default rasp4b)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address the RPC server binds (default loopback)"
    )
    p.add_argument(
        "--port",
        type=int,
        help="RPC server port; with --count N, ports PORT..PORT+N-1"
        " (default 9090; with --tracker, free ports)",
    )
    p.add_argument("--tracker", metavar="HOST:PORT", help="register with this tracker")
    p.add_argument("--key", help="device key at the tracker (default: the board's RPC key)")
    p.add_argument("--count", type=int, default=1, help="start N devices, in parallel (default 1)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds for every device to answer (default 300; TVM imports slowly under qemu)",
    )
    p = sub(
        "stop",
        _cmd_device_stop,
        "stop the emulated devices started by edgecomp device emulate",
        "edgecomp device stop\nedgecomp device stop --port 9090",
        parent=devsubs,
    )
    p.add_argument("--port", type=int, help="only the device on this port (default: all)")
    p.add_argument("--key", help="only the devices started with --key KEY (default: all)")

    p = sub(
        "tracker",
        _cmd_tracker,
        "run a TVM RPC tracker in the foreground (Ctrl-C stops it)",
        "edgecomp tracker --port 9190",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=9190, help="port (default 9190)")

    p = sub(
        "devices",
        _cmd_devices,
        "list the devices registered with a tracker",
        "edgecomp devices --tracker 127.0.0.1:9190",
    )
    p.add_argument("--tracker", required=True, metavar="HOST:PORT", help="the tracker")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the tracker (default 10)"
    )

    p = sub(
        "demo",
        _cmd_demo,
        "the whole path on an emulated board: compile the bundled CNN, start the device and"
        " a tracker,"
        " run over RPC, check against ONNX Runtime, time it, keep the package",
        "edgecomp demo\nedgecomp demo --target rasp4b -o edgecomp-out/rasp4b",
    )
    p.add_argument(
        "--target", default="rasp4b", metavar="BOARD", help="an emulated board (default rasp4b)"
    )
    p.add_argument(
        "-o",
        "--output",
        default="edgecomp-out/rasp4b",
        metavar="OUTDIR",
        help="where the package stays (default edgecomp-out/rasp4b)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgecomp`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except EdgecompError as err:
        print(f"edgecomp: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgecomp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
