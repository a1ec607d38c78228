"""Static checks of what CI cannot run: the Dockerfiles (hadolint) and the launch scripts
(shellcheck, bash -n). Both tools come with the test extra."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
def tool(name: str) -> str:
    """A binary of the test extra: beside this Python (a venv run without activating it) or on PATH."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert found, f"{name} is missing: pip install -e '.[test]'"
    return found


SCRIPTS = sorted([*REPO.glob("launch/*.sh"), REPO / "launch" / "slurm.sbatch", *REPO.glob("scripts/*.sh")])


def test_dockerfiles_pass_hadolint():
    dockerfiles = sorted(REPO.glob("docker/Dockerfile.*"))
    assert len(dockerfiles) == 2
    result = subprocess.run([tool("hadolint"), *map(str, dockerfiles)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_pass_shellcheck_and_parse():
    assert len(SCRIPTS) >= 5
    result = subprocess.run([tool("shellcheck"), *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_slurm_script_requeues_signals_and_restarts():
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    for needed in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "--max-restarts", "scontrol requeue", "trap '' USR1"):
        assert needed in text, needed


def test_docker_images_never_reinstall_torch():
    for dockerfile in REPO.glob("docker/Dockerfile.*"):
        text = dockerfile.read_text()
        assert "pip install --no-cache-dir --no-deps -e ." in text
        assert text.index("COPY pyproject.toml") < text.index("COPY sora_dist")  # dependencies cached apart from the source
    requirements = subprocess.run([sys.executable, "docker/requirements.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "webdataset>=0.2.90" in requirements.splitlines()
    assert not any(line.startswith("torch") for line in requirements.splitlines())
