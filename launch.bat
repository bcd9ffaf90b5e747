@echo off
rem SCAL-SDT launcher for Windows: creates .venv, installs torch and the requirements once, starts the app.
rem   launch.bat [app options]         start the web app
rem   launch.bat --test [pytest opts]  install, then run the test suite
rem Environment: SCAL_TORCH (default torch==2.13.0), SCAL_TORCH_INDEX (e.g.
rem https://download.pytorch.org/whl/cu128; unset, engine\torch_choice.py picks the CUDA build the NVIDIA
rem driver supports, as PyPI's Windows torch is CPU-only), PYTHON (default python).
setlocal EnableDelayedExpansion
cd /d "%~dp0"

set MODE=app
if "%~1"=="--test" set MODE=test
if not defined SCAL_TORCH set SCAL_TORCH=torch==2.13.0
if not defined PYTHON set PYTHON=python
set VENV=.venv
set PY=%VENV%\Scripts\python.exe

if not exist "%PY%" (
  echo creating %VENV%
  "%PYTHON%" -m venv %VENV% || exit /b 1
)

rem An explicit SCAL_TORCH_INDEX wins; otherwise the build follows the NVIDIA driver's CUDA version. The choice
rem runs every start so that a driver update changes the stamp below; its reason is shown when torch installs.
rem An empty index file, PyPI's default build, leaves SCAL_TORCH_INDEX undefined.
set TORCH_WHY=
if defined SCAL_TORCH_INDEX (
  set "TORCH_WHY=torch: the build from SCAL_TORCH_INDEX=!SCAL_TORCH_INDEX!"
) else (
  "%PY%" engine\torch_choice.py >"%VENV%\.scal-sdt-torch-index" 2>"%VENV%\.scal-sdt-torch-why" || exit /b 1
  set /p SCAL_TORCH_INDEX=<"%VENV%\.scal-sdt-torch-index"
  set /p TORCH_WHY=<"%VENV%\.scal-sdt-torch-why"
)

rem Reinstall only when the requirements or the torch choice changed; the same hash as launch.sh.
rem The torch spec goes to python through the environment: on a command line its comparison signs redirect.
set WANT=
"%PY%" -c "import hashlib, os, re; data = open('requirements.txt', 'rb').read() + open('requirements-nodeps.txt', 'rb').read() + re.search('PACKAGE = .*', open('engine/models/t5_vocab.py').read()).group(0).encode() + (os.environ['SCAL_TORCH'] + ' ' + os.environ.get('SCAL_TORCH_INDEX', '') + '\n').encode(); print(hashlib.sha256(data).hexdigest())" > "%VENV%\.scal-sdt-want" || exit /b 1
set /p WANT=<"%VENV%\.scal-sdt-want"
set HAVE=
if exist "%VENV%\.scal-sdt-installed" set /p HAVE=<"%VENV%\.scal-sdt-installed"
if not "%HAVE%"=="%WANT%" (
  echo !TORCH_WHY!
  echo installing !SCAL_TORCH!, then requirements.txt and requirements-nodeps.txt ^(first run only^)
  "%PY%" -m pip install --quiet --upgrade pip || exit /b 1
  if defined SCAL_TORCH_INDEX (
    "%PY%" -m pip install --quiet "!SCAL_TORCH!" --extra-index-url "!SCAL_TORCH_INDEX!" || exit /b 1
  ) else (
    "%PY%" -m pip install --quiet "!SCAL_TORCH!" || exit /b 1
  )
  "%PY%" -m pip install --quiet -r requirements.txt || exit /b 1
  "%PY%" -m pip install --quiet --no-deps -r requirements-nodeps.txt || exit /b 1
  rem T5's vocabulary for Flux.1 and Qwen2's for the tiny captioners, from the pinned sdist that embeds them
  "%PY%" -m engine.models.t5_vocab || exit /b 1
  "%PY%" -m engine.models.qwen2_vocab || exit /b 1
  >"%VENV%\.scal-sdt-installed" echo %WANT%
)

if "%GRADIO_ANALYTICS_ENABLED%"=="" set GRADIO_ANALYTICS_ENABLED=False
rem The pytest options are all the arguments after --test. Python drops --test itself: cmd's shift leaves the
rem full argument list as it was and numbers only nine, and a goto loop is unsafe in a file checked out with
rem LF line endings.
if "%MODE%"=="test" (
  set HF_HUB_OFFLINE=1
  set WANDB_MODE=offline
  "%PY%" -c "import sys, pytest; sys.exit(pytest.main(['tests'] + sys.argv[2:]))" %*
  if !ERRORLEVEL!==5 (
    echo error: pytest collected no tests
    exit /b 1
  )
  exit /b !ERRORLEVEL!
)
"%PY%" app.py %*
