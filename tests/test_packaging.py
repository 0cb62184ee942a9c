"""The wheel: every module of edgecomp, and the data folders shipped inside it (not top level)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kwargs) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_wheel_ships_code_and_data_under_edgecomp(tmp_path):
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
        ],
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("edgecomp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "edgecomp").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sources <= names, f"modules missing from the wheel: {sorted(sources - names)}"
    assert "edgecomp/zoo/digits_cnn.onnx" in names
    for folder in ("targets", "deploy", "schedules"):
        for f in (ROOT / folder).rglob("*"):  # deploy/cpp, deploy/android/... too
            if f.is_file() and not f.name.startswith(".") and "__pycache__" not in f.parts:
                assert f"edgecomp/_data/{folder}/{f.relative_to(ROOT / folder)}" in names
    tops = {n.split("/")[0] for n in names}
    assert tops == {
        "edgecomp",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }

    site = tmp_path / "site"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ]
    )
    probe = (
        "import edgecomp.resources as r, edgecomp.targets as t;"
        "print(r.data_dir('targets')); print(r.data_dir('deploy'));"
        "print(','.join(t.known_boards()))"
    )
    out = run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    ).splitlines()
    assert out[0] == str(site / "edgecomp" / "_data" / "targets")
    assert out[1] == str(site / "edgecomp" / "_data" / "deploy")
    assert out[2] == "android-arm64,host,rasp3b,rasp4b,rk3399,rk3399-mali"
