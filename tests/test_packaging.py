"""A wheel built from the tree installs into a fresh virtual environment with every subpackage
(kernels/ as sora_dist.kernels) and the console script: editable installs are not the only ones
that work."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def source_packages() -> list[str]:
    """Every package of the source tree as it must be importable once installed."""
    found = [".".join(p.relative_to(REPO).parent.parts) for p in (REPO / "sora_dist").rglob("__init__.py")]
    return sorted(found + ["sora_dist.kernels"])


def test_wheel_installs_every_subpackage_and_the_cli(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "src"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("sora_dist-*.whl")

    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh / "bin" / "python"), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, text=True)
    # The dependencies (torch, numpy, ...) come from this environment's site-packages, added as a
    # plain path: its .pth files, the editable install's among them, are not processed.
    site = subprocess.run([str(fresh / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    packages = source_packages()
    assert "sora_dist.parallel" in packages and "sora_dist.perf" in packages
    script = f"import importlib, sora_dist; assert sora_dist.__file__.startswith({str(fresh)!r}), sora_dist.__file__\n"
    script += "".join(f"importlib.import_module({name!r})\n" for name in packages)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(fresh / "bin" / "python"), "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    cli = subprocess.run([str(fresh / "bin" / "sora-dist"), "train", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert cli.returncode == 0 and "--optim.lr=" in cli.stdout, cli.stderr[-2000:]


def test_the_checkouts_kernels_folder_does_not_hide_an_installed_kernels_package():
    # `python -m ...` run from the checkout puts its root on sys.path, where kernels/ (installed as
    # sora_dist.kernels) would shadow a top-level `kernels` distribution such as the one
    # transformers requires. Imported that way, the folder hands over to the installed package.
    from importlib.metadata import PackageNotFoundError, distribution

    code = "import kernels, sora_dist.kernels as ours; print(kernels.__file__); print(ours.attention.__module__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    try:
        installed = Path(distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    except PackageNotFoundError:
        assert result.returncode != 0 and "No module named 'kernels'" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-2000:]
    found, module = result.stdout.split()
    assert Path(found).resolve() == installed != REPO / "kernels" / "__init__.py"
    assert module == "sora_dist.kernels.attention"
