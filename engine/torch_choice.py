"""Which PyTorch build the launchers install, from the platform and the NVIDIA driver's CUDA version.

`python engine/torch_choice.py` prints the extra pip index for torch (nothing for PyPI's default build) and,
on stderr, one line saying which build and why. It runs with a bare venv's python before anything is
installed, so it imports only the standard library.

The rule:
- Windows: PyPI's torch is CPU-only, so take the newest CUDA build the driver supports.
- Linux: PyPI's torch is already a CUDA build; keep it unless the driver is too old for its CUDA, then take
  the newest CUDA build the driver supports.
- A driver too old for every CUDA build, no driver, or macOS: PyPI's default build.
"""
from __future__ import annotations

import re
import subprocess
import sys
from typing import Optional

# The CUDA versions download.pytorch.org builds torch==2.13.0 (the launchers' default SCAL_TORCH) for, and
# the one PyPI's Linux torch is built with (CUDA 13.0 since torch 2.11). Update both with SCAL_TORCH.
CUDA_BUILDS = ("12.6", "12.8", "13.0")
PYPI_LINUX_CUDA = "13.0"
INDEX_URL = "https://download.pytorch.org/whl/cu{}"
# nvidia-smi initialises the driver when nothing holds it open, which can take seconds on a large machine.
SMI_TIMEOUT_S = 30

_CUDA_VERSION = re.compile(r"CUDA Version:\s*(\d+)\.(\d+)")


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def index_url(cuda: str) -> str:
    return INDEX_URL.format(cuda.replace(".", ""))


def driver_cuda(smi_output: str) -> Optional[str]:
    """The newest CUDA version the driver supports, from nvidia-smi's header ("CUDA Version: 12.8")."""
    match = _CUDA_VERSION.search(smi_output)
    return f"{int(match.group(1))}.{int(match.group(2))}" if match else None


def choose(platform: str, smi_output: Optional[str]) -> tuple[str, str]:
    """(the extra index URL, or "" for PyPI's default build; the reason line) for sys.platform `platform`
    and nvidia-smi's output (None when there is no nvidia-smi)."""
    windows, linux = platform == "win32", platform.startswith("linux")
    if not (windows or linux):
        return "", f"torch: default build (there are no CUDA builds for {platform})"
    if smi_output is None:
        return "", "torch: default build (no NVIDIA driver found: no nvidia-smi on PATH)"
    driver = driver_cuda(smi_output)
    if driver is None:
        return "", "torch: default build (nvidia-smi reports no CUDA version; run nvidia-smi to see why)"
    reported = f"nvidia-smi reports driver CUDA {driver}"
    if linux and _version(driver) >= _version(PYPI_LINUX_CUDA):
        return "", f"torch: PyPI's CUDA {PYPI_LINUX_CUDA} build ({reported})"
    supported = [cuda for cuda in CUDA_BUILDS if _version(cuda) <= _version(driver)]
    if not supported:
        default = "PyPI's CUDA build, which will not use this GPU" if linux else "CPU-only"
        oldest = min(CUDA_BUILDS, key=_version)
        return "", (f"torch: default build, {default} ({reported}; the CUDA builds need {oldest} or newer: "
                    "update the NVIDIA driver)")
    newest = max(supported, key=_version)
    why = f"{reported}; PyPI's build needs {PYPI_LINUX_CUDA}" if linux else reported
    return index_url(newest), f"torch: CUDA {newest} build ({why})"


def read_nvidia_smi() -> Optional[str]:
    """nvidia-smi's output, or None when there is none on PATH. A failing nvidia-smi still answers: its
    error message has no CUDA version, which choose() reports."""
    try:
        result = subprocess.run(["nvidia-smi"], capture_output=True, text=True, errors="replace",
                                timeout=SMI_TIMEOUT_S)
    except FileNotFoundError:
        return None
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return result.stdout + result.stderr


def main() -> int:
    index, reason = choose(sys.platform, read_nvidia_smi())
    if index:
        print(index)
    print(reason, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
