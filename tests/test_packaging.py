"""The distribution installs one import package, `meshserve`, with every source and data
file of the layer folders, and a `meshserve` console script that runs from it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from tests.serving_fixtures import REPO

LAYERS = ("engine", "meshes", "models", "pallas_kernels", "serving", "tools")


def _tracked_package_files() -> set[str]:
    out = subprocess.run(["git", "ls-files", *LAYERS], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    return {f for f in out if not f.endswith(("BUILD", ".sh"))}


def test_wheel_holds_one_top_level_package_and_every_file(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), REPO],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("meshserve-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"meshserve"}, sorted(top)
    assert "meshserve = meshserve.tools.cli:main" in entry_points
    missing = {f for f in _tracked_package_files() if f"meshserve/{f}" not in names}
    assert not missing, sorted(missing)

    # Installed from the wheel alone, outside the source tree, it imports from there.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    code = ("import meshserve.tools.cli as cli, meshserve.serving.server, "
            "meshserve.engine.engine, meshserve.models.demo; print(cli.__file__)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(target))
    for layer in LAYERS:
        assert not (target / layer).exists(), f"{layer} installed as a top-level package"
