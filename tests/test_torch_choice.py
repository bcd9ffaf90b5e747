"""The launchers' torch build choice, on nvidia-smi outputs as drivers print them."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from engine.torch_choice import CUDA_BUILDS, PYPI_LINUX_CUDA, choose, driver_cuda

CU126 = "https://download.pytorch.org/whl/cu126"
CU128 = "https://download.pytorch.org/whl/cu128"
CU130 = "https://download.pytorch.org/whl/cu130"
NO_DRIVER = "torch: default build (no NVIDIA driver found: no nvidia-smi on PATH)"

LINUX_535_CUDA_12_2 = """\
Tue Jan 14 10:21:33 2025
+---------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.183.01             Driver Version: 535.183.01   CUDA Version: 12.2     |
|-----------------------------------------+----------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id        Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |         Memory-Usage | GPU-Util  Compute M. |
|                                         |                      |               MIG M. |
|=========================================+======================+======================|
|   0  NVIDIA GeForce RTX 3090        Off | 00000000:01:00.0  On |                  N/A |
|  0%   45C    P8              22W / 350W |    512MiB / 24576MiB |      2%      Default |
|                                         |                      |                  N/A |
+-----------------------------------------+----------------------+----------------------+
"""

WINDOWS_560_CUDA_12_6 = """\
Mon Sep  9 18:02:47 2024
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 560.94                 Driver Version: 560.94         CUDA Version: 12.6     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                  Driver-Model | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA GeForce RTX 4070      WDDM  |   00000000:01:00.0  On |                  N/A |
|  0%   38C    P8              9W /  200W |     845MiB /  12282MiB |      3%      Default |
|                                         |                        |                  N/A |
+-----------------------------------------+------------------------+----------------------+
"""

WINDOWS_572_CUDA_12_8 = """\
Fri Feb  7 21:14:05 2025
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 572.16                 Driver Version: 572.16         CUDA Version: 12.8     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                  Driver-Model | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA GeForce RTX 5090      WDDM  |   00000000:01:00.0  On |                  N/A |
|  0%   35C    P8             21W /  575W |    1722MiB /  32607MiB |      1%      Default |
|                                         |                        |                  N/A |
+-----------------------------------------+------------------------+----------------------+
"""

LINUX_580_CUDA_13_0 = """\
Wed Aug 27 09:40:12 2025
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.65.06              Driver Version: 580.65.06      CUDA Version: 13.0     |
+-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA L40S                    On  |   00000000:41:00.0 Off |                    0 |
| N/A   29C    P8             33W /  350W |       0MiB /  46068MiB |      0%      Default |
|                                         |                        |                  N/A |
+-----------------------------------------+------------------------+----------------------+
"""

# A driver newer than every build.
LINUX_CUDA_13_2 = LINUX_580_CUDA_13_0.replace("580.65.06 ", "595.10.02 ").replace("CUDA Version: 13.0",
                                                                                    "CUDA Version: 13.2")

OLD_520_CUDA_11_8 = """\
Thu Nov 10 14:55:02 2022
+-----------------------------------------------------------------------------+
| NVIDIA-SMI 520.61.05    Driver Version: 520.61.05    CUDA Version: 11.8     |
|-------------------------------+----------------------+----------------------+
| GPU  Name        Persistence-M| Bus-Id        Disp.A | Volatile Uncorr. ECC |
| Fan  Temp  Perf  Pwr:Usage/Cap|         Memory-Usage | GPU-Util  Compute M. |
|                               |                      |               MIG M. |
|===============================+======================+======================|
|   0  NVIDIA GeForce ...  Off  | 00000000:01:00.0  On |                  N/A |
| 30%   41C    P8    17W / 220W |    300MiB /  8192MiB |      1%      Default |
|                               |                      |                  N/A |
+-------------------------------+----------------------+----------------------+
"""

# Four GPUs and their processes: one header, one CUDA version for the driver.
MULTI_GPU_575_CUDA_12_9 = """\
Mon Jun 16 08:12:44 2025
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 575.57.08              Driver Version: 575.57.08      CUDA Version: 12.9     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA A100-SXM4-80GB          On  |   00000000:07:00.0 Off |                    0 |
| N/A   31C    P0             62W /  400W |   40213MiB /  81920MiB |     97%      Default |
|                                         |                        |             Disabled |
+-----------------------------------------+------------------------+----------------------+
|   1  NVIDIA A100-SXM4-80GB          On  |   00000000:0F:00.0 Off |                    0 |
| N/A   30C    P0             60W /  400W |   40197MiB /  81920MiB |     96%      Default |
|                                         |                        |             Disabled |
+-----------------------------------------+------------------------+----------------------+
|   2  NVIDIA A100-SXM4-80GB          On  |   00000000:47:00.0 Off |                    0 |
| N/A   29C    P0             58W /  400W |       4MiB /  81920MiB |      0%      Default |
|                                         |                        |             Disabled |
+-----------------------------------------+------------------------+----------------------+
|   3  NVIDIA A100-SXM4-80GB          On  |   00000000:4E:00.0 Off |                    0 |
| N/A   30C    P0             59W /  400W |       4MiB /  81920MiB |      0%      Default |
|                                         |                        |             Disabled |
+-----------------------------------------+------------------------+----------------------+

+-----------------------------------------------------------------------------------------+
| Processes:                                                                              |
|  GPU   GI   CI              PID   Type   Process name                        GPU Memory |
|        ID   ID                                                               Usage      |
|=========================================================================================|
|    0   N/A  N/A         1843201      C   python                                40204MiB |
|    1   N/A  N/A         1843202      C   python                                40188MiB |
+-----------------------------------------------------------------------------------------+
"""

DRIVER_NOT_LOADED = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure "
                     "that the latest NVIDIA driver is installed and running.\n\n")


@pytest.mark.parametrize("output, cuda", [
    (LINUX_535_CUDA_12_2, "12.2"), (WINDOWS_560_CUDA_12_6, "12.6"), (WINDOWS_572_CUDA_12_8, "12.8"),
    (LINUX_580_CUDA_13_0, "13.0"), (OLD_520_CUDA_11_8, "11.8"), (MULTI_GPU_575_CUDA_12_9, "12.9"),
    (LINUX_CUDA_13_2, "13.2"), (DRIVER_NOT_LOADED, None), ("", None)])
def test_the_driver_cuda_version_is_read_from_the_header(output, cuda):
    assert driver_cuda(output) == cuda


@pytest.mark.parametrize("output, index, build", [
    (WINDOWS_560_CUDA_12_6, CU126, "CUDA 12.6 build"),
    (WINDOWS_572_CUDA_12_8, CU128, "CUDA 12.8 build"),
    (MULTI_GPU_575_CUDA_12_9, CU128, "CUDA 12.8 build"),
    (LINUX_580_CUDA_13_0, CU130, "CUDA 13.0 build"),
    (LINUX_CUDA_13_2, CU130, "CUDA 13.0 build")])
def test_windows_takes_the_newest_cuda_build_the_driver_supports(output, index, build):
    chosen, reason = choose("win32", output)
    assert chosen == index
    assert reason == f"torch: {build} (nvidia-smi reports driver CUDA {driver_cuda(output)})"


@pytest.mark.parametrize("output", [LINUX_535_CUDA_12_2, OLD_520_CUDA_11_8])
def test_windows_with_a_driver_too_old_for_every_build_gets_the_default_build_and_why(output):
    chosen, reason = choose("win32", output)
    assert chosen == ""
    assert reason.startswith("torch: default build, CPU-only")
    assert f"driver CUDA {driver_cuda(output)}" in reason
    assert "need 12.6 or newer: update the NVIDIA driver" in reason


def test_linux_keeps_pypis_build_when_the_driver_runs_it():
    for output in (LINUX_580_CUDA_13_0, LINUX_CUDA_13_2):
        chosen, reason = choose("linux", output)
        assert chosen == ""
        assert reason == (f"torch: PyPI's CUDA {PYPI_LINUX_CUDA} build (nvidia-smi reports driver CUDA "
                          f"{driver_cuda(output)})")


@pytest.mark.parametrize("output, index, build", [
    (WINDOWS_560_CUDA_12_6, CU126, "CUDA 12.6 build"), (WINDOWS_572_CUDA_12_8, CU128, "CUDA 12.8 build"),
    (MULTI_GPU_575_CUDA_12_9, CU128, "CUDA 12.8 build")])
def test_linux_with_a_driver_older_than_pypis_build_takes_a_cuda_build_it_supports(output, index, build):
    chosen, reason = choose("linux", output)
    assert chosen == index
    assert reason == (f"torch: {build} (nvidia-smi reports driver CUDA {driver_cuda(output)}; "
                      f"PyPI's build needs {PYPI_LINUX_CUDA})")


def test_linux_with_a_driver_too_old_for_every_build_says_the_gpu_will_not_be_used():
    chosen, reason = choose("linux", OLD_520_CUDA_11_8)
    assert chosen == ""
    assert reason.startswith("torch: default build, PyPI's CUDA build, which will not use this GPU")
    assert "driver CUDA 11.8" in reason and "update the NVIDIA driver" in reason


@pytest.mark.parametrize("platform", ["win32", "linux"])
def test_no_nvidia_smi_or_no_cuda_version_gets_the_default_build(platform):
    assert choose(platform, None) == ("", NO_DRIVER)
    for output in (DRIVER_NOT_LOADED, "", "garbage\x00\xff CUDA Version: N/A\n"):
        assert choose(platform, output) == ("", "torch: default build (nvidia-smi reports no CUDA version; "
                                                "run nvidia-smi to see why)")


def test_macos_gets_the_default_build_whatever_nvidia_smi_says():
    assert choose("darwin", WINDOWS_572_CUDA_12_8) == ("", "torch: default build (there are no CUDA builds "
                                                           "for darwin)")


def test_every_chosen_index_is_one_of_the_builds():
    urls = {f"https://download.pytorch.org/whl/cu{cuda.replace('.', '')}" for cuda in CUDA_BUILDS}
    outputs = [LINUX_535_CUDA_12_2, WINDOWS_560_CUDA_12_6, WINDOWS_572_CUDA_12_8, LINUX_580_CUDA_13_0,
               OLD_520_CUDA_11_8, MULTI_GPU_575_CUDA_12_9]
    chosen = {choose(platform, output)[0] for platform in ("win32", "linux") for output in outputs}
    assert chosen - {""} <= urls and chosen - {""}


def run_script(tmp_path, smi_output=None):
    """`python -S engine/torch_choice.py` as the launchers run it, with a fake nvidia-smi printing
    smi_output (none at all when it is None) as the only program on PATH. -S leaves site-packages out,
    so an import of anything but the standard library fails."""
    if smi_output is not None:
        (tmp_path / "smi.txt").write_text(smi_output)
        fake = tmp_path / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\n'{shutil.which('cat')}' '{tmp_path / 'smi.txt'}'\n")
        fake.chmod(0o755)
    env = {**os.environ, "PATH": str(tmp_path)}
    return subprocess.run([sys.executable, "-S", "engine/torch_choice.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fakes nvidia-smi with a shell script")
def test_the_script_prints_the_index_on_stdout_and_the_reason_on_stderr(tmp_path):
    result = run_script(tmp_path, WINDOWS_572_CUDA_12_8)
    assert result.returncode == 0, result.stderr
    assert result.stdout == CU128 + "\n"
    assert result.stderr == ("torch: CUDA 12.8 build (nvidia-smi reports driver CUDA 12.8; PyPI's build needs "
                             f"{PYPI_LINUX_CUDA})\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="runs the Linux choice")
def test_the_script_prints_no_index_without_nvidia_smi(tmp_path):
    result = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == NO_DRIVER + "\n"
