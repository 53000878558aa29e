"""The set-up scripts' choices, with stand-ins for the machine: the Python version checked first, and the torch build
picked for what nvidia-smi says (no GPU: the CPU build; a GPU: the newest CUDA build its driver runs) and, for an AMD
GPU, what rocm-smi and the installed ROCm say."""

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def fake_command(directory, name, script):
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(0o755)
    return path


def test_an_old_python_is_refused_before_anything_is_installed(tmp_path):
    old = fake_command(tmp_path, "python3.10", 'if [ "$1" = -V ]; then echo "Python 3.10.12"; else exit 1; fi\n')
    result = subprocess.run(
        ["bash", "-c", f". {REPO_ROOT}/scripts/venv.sh"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": str(old)},
    )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.startswith("error: the kit needs Python 3.11 or newer, and ")
        and "Python 3.10.12" in result.stderr
    )
    assert not (tmp_path / ".venv").exists()


@pytest.mark.parametrize(
    "nvidia_smi, expected",
    [
        (None, ""),
        ("| NVIDIA-SMI 570.86   Driver Version: 570.86   CUDA Version: 12.8     |", "12.8 cu128"),
        ("| NVIDIA-SMI 560.35   Driver Version: 560.35   CUDA Version: 12.7     |", "12.7 cu126"),
        ("| NVIDIA-SMI 580.65   Driver Version: 580.65   CUDA Version: 13.0     |", "13.0 cu130"),
        ("| NVIDIA-SMI 535.10   Driver Version: 535.10   CUDA Version: 12.2     |", "12.2 none"),
    ],
)
def test_the_torch_build_follows_the_driver(tmp_path, nvidia_smi, expected):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvidia_smi is not None:
        fake_command(bin_dir, "nvidia-smi", f"echo '{nvidia_smi}'\n")
    script = (
        f". {REPO_ROOT}/scripts/torch_build.sh; cuda=$(gpu_cuda_version); "
        'if [ -n "$cuda" ]; then echo "$cuda $(cuda_build_for "$cuda" || echo none)"; else echo; fi'
    )
    # Only the stand-in's directory and the system's: a real nvidia-smi elsewhere on PATH must not answer.
    result = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


ROCM_SMI_WITH_A_GPU = 'echo "GPU[0]          : Card Series:          AMD Instinct MI210"\n'
ROCM_SMI_WITHOUT_ONE = 'echo "WARNING: No AMD GPUs specified"; exit 1\n'


@pytest.mark.parametrize(
    "rocm_smi, installed_rocm, expected",
    [
        (None, "6.4.1-120", ""),
        (ROCM_SMI_WITHOUT_ONE, "6.4.1-120", ""),
        (ROCM_SMI_WITH_A_GPU, "6.4.1-120", "6.4 rocm6.4"),
        (ROCM_SMI_WITH_A_GPU, "7.0.2-56", "7.0 rocm7.0"),
        (ROCM_SMI_WITH_A_GPU, "7.9.0", "7.9 rocm7.1"),
        (ROCM_SMI_WITH_A_GPU, "6.2.0", "6.2 none"),
        (ROCM_SMI_WITH_A_GPU, None, "unknown none"),
    ],
)
def test_the_torch_build_follows_the_installed_rocm(tmp_path, rocm_smi, installed_rocm, expected):
    bin_dir, rocm = tmp_path / "bin", tmp_path / "rocm"
    bin_dir.mkdir()
    if rocm_smi is not None:
        fake_command(bin_dir, "rocm-smi", rocm_smi)
    if installed_rocm is not None:
        (rocm / ".info").mkdir(parents=True)
        (rocm / ".info" / "version").write_text(installed_rocm + "\n")
    script = (
        f". {REPO_ROOT}/scripts/torch_build.sh; rocm=$(gpu_rocm_version); "
        'if [ -n "$rocm" ]; then echo "$rocm $(rocm_build_for "$rocm" 2>/dev/null || echo none)"; else echo; fi'
    )
    result = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": sys.executable, "ROCM_PATH": str(rocm)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_the_lock_pins_every_dependency_within_its_range_and_leaves_torch_to_the_set_up():
    """requirements-lock.txt (scripts/lock.sh) is what scripts/venv.sh installs: every requirement of pyproject.toml
    and its dev extra pinned inside its range, and neither torch nor a CUDA-only package, whose build venv.sh picks."""
    import re
    import tomllib

    from packaging.requirements import Requirement

    lock_text = (REPO_ROOT / "requirements-lock.txt").read_text()
    pins = {
        re.sub(r"[-_.]+", "-", name).lower(): version
        for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", lock_text, re.M)
    }
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(text)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name == "torch":
            assert name not in pins
            continue
        assert name in pins and requirement.specifier.contains(pins[name], prereleases=True), (text, pins.get(name))
    assert not [name for name in pins if name.startswith("nvidia-") or name == "triton"]
    venv_script = (REPO_ROOT / "scripts" / "venv.sh").read_text()
    assert "-c requirements-lock.txt" in venv_script and "# torch" in lock_text
