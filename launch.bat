@echo off
rem SCAL-SDT launcher for Windows: creates .venv, installs torch and the requirements once, starts the app.
rem   launch.bat [app options]         start the web app
rem   launch.bat --test [pytest opts]  install, then run the test suite
rem Environment: SCAL_TORCH (default torch==2.13.0), SCAL_TORCH_INDEX (e.g.
rem https://download.pytorch.org/whl/cu128; PyPI's Windows torch is CPU-only), PYTHON (default python).
setlocal EnableDelayedExpansion
cd /d "%~dp0"

set MODE=app
if "%~1"=="--test" (
  set MODE=test
  shift
)
if "%SCAL_TORCH%"=="" set SCAL_TORCH=torch==2.13.0
if "%PYTHON%"=="" set PYTHON=python
set VENV=.venv
set PY=%VENV%\Scripts\python.exe

if not exist "%PY%" (
  echo creating %VENV%
  "%PYTHON%" -m venv %VENV% || exit /b 1
)

rem Reinstall only when the requirements or the torch choice changed.
copy /y requirements.txt "%TEMP%\scal-sdt-want.txt" >nul
echo %SCAL_TORCH% %SCAL_TORCH_INDEX%>> "%TEMP%\scal-sdt-want.txt"
for /f "skip=1 tokens=* delims=" %%H in ('certutil -hashfile "%TEMP%\scal-sdt-want.txt" SHA256') do (
  if not defined WANT set WANT=%%H
)
set HAVE=
if exist "%VENV%\.scal-sdt-installed" set /p HAVE=<"%VENV%\.scal-sdt-installed"
if not "%HAVE%"=="%WANT%" (
  echo installing %SCAL_TORCH%, then requirements.txt ^(first run only^)
  "%PY%" -m pip install --quiet --upgrade pip || exit /b 1
  if "%SCAL_TORCH_INDEX%"=="" (
    "%PY%" -m pip install --quiet "%SCAL_TORCH%" || exit /b 1
  ) else (
    "%PY%" -m pip install --quiet "%SCAL_TORCH%" --extra-index-url "%SCAL_TORCH_INDEX%" || exit /b 1
  )
  "%PY%" -m pip install --quiet -r requirements.txt || exit /b 1
  >"%VENV%\.scal-sdt-installed" echo %WANT%
)

if "%GRADIO_ANALYTICS_ENABLED%"=="" set GRADIO_ANALYTICS_ENABLED=False
if "%MODE%"=="test" (
  set HF_HUB_OFFLINE=1
  set WANDB_MODE=offline
  "%PY%" -m pytest tests %1 %2 %3 %4 %5 %6 %7 %8 %9
  if !ERRORLEVEL!==5 (
    echo error: pytest collected no tests
    exit /b 1
  )
  exit /b !ERRORLEVEL!
)
"%PY%" app.py %*
