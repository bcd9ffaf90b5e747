#!/usr/bin/env bash
# SCAL-SDT launcher: creates .venv, installs torch and the requirements once, then starts the app.
#   ./launch.sh [app options]     start the web app (e.g. ./launch.sh --listen --port 7861)
#   ./launch.sh --test [pytest options]   install, then run the test suite
# Environment:
#   SCAL_TORCH        torch requirement to install first (default torch==2.13.0)
#   SCAL_TORCH_INDEX  extra pip index for torch, e.g. https://download.pytorch.org/whl/cu128 for a CUDA build;
#                     unset, engine/torch_choice.py picks one from the NVIDIA driver (see README, GPU installs)
#   PYTHON            interpreter used to create the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")"

mode=app
if [[ "${1:-}" == "--test" ]]; then
  mode=test
  shift
fi

venv=.venv
torch_spec=${SCAL_TORCH:-torch==2.13.0}

if [[ ! -x "$venv/bin/python" ]]; then
  echo "creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"

# An explicit SCAL_TORCH_INDEX wins; otherwise the build follows the NVIDIA driver's CUDA version. The choice
# runs every start so that a driver update changes the stamp below; its reason is shown when torch installs.
if [[ -n "${SCAL_TORCH_INDEX:-}" ]]; then
  torch_index=$SCAL_TORCH_INDEX
  torch_why="torch: the build from SCAL_TORCH_INDEX=$torch_index"
else
  torch_index=$("$py" engine/torch_choice.py 2>"$venv/.scal-sdt-torch-why")
  torch_why=$(cat "$venv/.scal-sdt-torch-why")
fi

# Reinstall only when what is asked for changed: the stamp holds a hash of the requirements, the pinned
# package T5's vocabulary comes from and the torch choice.
# Hashed by the venv's python because sha256sum is missing on macOS; launch.bat runs the same code.
hash_code="import hashlib, os, re; data = open('requirements.txt', 'rb').read() + open('requirements-nodeps.txt', 'rb').read() + re.search('PACKAGE = .*', open('engine/models/t5_vocab.py').read()).group(0).encode() + (os.environ['SCAL_TORCH'] + ' ' + os.environ.get('SCAL_TORCH_INDEX', '') + '\n').encode(); print(hashlib.sha256(data).hexdigest())"
want=$(SCAL_TORCH="$torch_spec" SCAL_TORCH_INDEX="$torch_index" "$py" -c "$hash_code")
stamp="$venv/.scal-sdt-installed"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "$torch_why"
  echo "installing $torch_spec, then requirements.txt and requirements-nodeps.txt (first run only)"
  "$py" -m pip install --quiet --upgrade pip
  # torch first: a bare torch pulled in by another package would be a multi-GB default build.
  if [[ -n "$torch_index" ]]; then
    "$py" -m pip install --quiet "$torch_spec" --extra-index-url "$torch_index"
  else
    "$py" -m pip install --quiet "$torch_spec"
  fi
  "$py" -m pip install --quiet -r requirements.txt
  "$py" -m pip install --quiet --no-deps -r requirements-nodeps.txt
  # T5's vocabulary for Flux.1 and Qwen2's for the tiny captioners, from the pinned sdist that embeds them
  # (engine/models/t5_vocab.py, engine/models/qwen2_vocab.py)
  "$py" -m engine.models.t5_vocab
  "$py" -m engine.models.qwen2_vocab
  echo "$want" > "$stamp"
fi

export GRADIO_ANALYTICS_ENABLED=${GRADIO_ANALYTICS_ENABLED:-False}

if [[ "$mode" == "test" ]]; then
  # The browser tests drive Debian's Chromium; install it when missing and we may.
  if [[ ! -x /usr/bin/chromium ]] && command -v apt-get >/dev/null && [[ $(id -u) -eq 0 ]]; then
    echo "installing chromium for the browser tests"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
  export HF_HUB_OFFLINE=1 WANDB_MODE=offline
  set +e
  "$py" -m pytest tests "$@"
  status=$?
  set -e
  if [[ $status -eq 5 ]]; then
    echo "error: pytest collected no tests" >&2
    exit 1
  fi
  exit $status
fi

exec "$py" app.py "$@"
