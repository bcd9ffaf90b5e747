import contextlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread in the test processes and every process they start (training runs, torchrun ranks): the tiny
# models' ops are too small to split, and two test processes share the cores, where torch's spinning thread
# pools make each run several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every process a test starts prints its threads' stacks when it dies of a fatal signal: a test that finds a
# training process hung sends it SIGABRT (abort_children) and shows where it was.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The files that take longest, first. The suite runs each file whole in one process (`--dist loadfile`), taking
# files in collection order: one of these started last would leave the other process idle for minutes.
LONGEST_FIRST = ("test_vram.py", "test_combinations.py", "test_reliability.py", "test_distributed.py",
                 "test_memory_plan.py", "test_fsdp.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    """Demo assets (`demo:` paths) are built once per test run in a private cache."""
    cache = tmp_path_factory.mktemp("scal-cache")
    os.environ["SCAL_SDT_CACHE"] = str(cache)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # The test processes share Inductor's kernels, as a user's runs do (engine.regional_compile): a kernel
        # one of them built is read by the other instead of compiled again. Inductor writes each entry whole.
        shared = tmp_path_factory.getbasetemp().parent / "inductor"
        shared.mkdir(exist_ok=True)
        (cache / "inductor").symlink_to(shared, target_is_directory=True)
    return cache


@pytest.fixture(scope="session", autouse=True)
def app_data(tmp_path_factory):
    """The app's data folder (uploaded datasets, the run queue) is a private one: an app started by a test
    must not read or resume the user's queue."""
    data = tmp_path_factory.mktemp("scal-data")
    os.environ["XDG_DATA_HOME"] = str(data)
    return data


@pytest.fixture(scope="session")
def tiny_model(demo_cache):
    from engine import paths

    return paths.demo_model_dir()


@pytest.fixture(scope="session")
def tiny_sdxl(demo_cache):
    from engine import paths

    return paths.demo_model_dir("sdxl")


@pytest.fixture(scope="session")
def sample_data(demo_cache):
    from engine import paths

    return paths.demo_data_dir()


@pytest.fixture(scope="session")
def class_images(sample_data, tiny_model):
    """Fill the sample data's class folder by rendering the tiny model, as class generation would."""
    from engine.testing import fill_class_folder

    fill_class_folder(tiny_model, sample_data / "class", count=6)
    return sample_data / "class"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Train on one CPU thread. The tiny model's ops are too small to split, and while other processes share
    the cores, torch's spinning thread pool makes these runs several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args, cwd=ROOT, env=None, timeout=600):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def train_here(values: dict):
    """Train the config `values` in this process and return its Trainer: for the run that one started from the
    command line (killed and resumed, or several torchrun processes) is compared with. This process has
    imported and warmed up what a new one would spend seconds on."""
    from engine import config as cfg
    from engine import events
    from engine.train import Trainer

    trainer = Trainer(cfg.from_dict(values))
    result = trainer.run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    return trainer


def lora_checkpoint_over_files(output_dir, model, text_encoder, vae):
    """The checkpoint of a 2-step LoRA run (lr 1e-2 from the first step) over a family's separate files."""
    from engine import checkpoints, events
    from engine import config as cfg
    from engine.testing import tiny_config
    from engine.train import Trainer

    values = tiny_config(output_dir, **{
        "model": str(model), "text_encoder": str(text_encoder), "vae": str(vae),
        "prior_preservation.enabled": False, "sampling.interval_steps": 0,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}],
        "network.type": "lora", "network.rank": 4, "optimizer.params.lr": 1e-2,
        "optimizer.lr_scheduler.warmup.enabled": False, "trainer.max_steps": 2, "checkpoint.every_n_train_steps": 2})
    trainer = Trainer(cfg.from_dict(values))
    result = trainer.run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    return checkpoints.latest_checkpoint(trainer.run_dir)


def torchrun(processes: int, *train_args) -> list:
    """The command line of `engine train train_args` in `processes` gloo processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "engine", "train", *train_args]


def abort_children(pid: int) -> None:
    """SIGABRT to every process below `pid` (torchrun's ranks), each of which prints its threads' stacks
    (PYTHONFAULTHANDLER) and dies."""
    import signal

    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGABRT)


def innermost_frames(output: str, frames: int = 8) -> str:
    """The threads' stacks that faulthandler printed into `output`, each cut to its `frames` innermost frames:
    where every process was, short enough to end a failure's message (the part of a long one that is shown)."""
    kept, taken = [], None
    for line in output.splitlines():
        if line.startswith(("Fatal Python error", "Thread 0x", "Current thread 0x")):
            kept.append(line)
            taken = 0
        elif taken is not None and line.startswith('  File "'):
            if taken < frames:
                kept.append(line)
            taken += 1
        else:
            taken = None
    return "\n".join(kept)


def run_torchrun(processes: int, *train_args, env=None, timeout=480):
    """Run `engine train train_args` in `processes` gloo processes to its end, one torch thread each, and return
    the completed process (text output). Should it outlive `timeout`, every process prints its threads' stacks
    (abort_children) before all are killed, and the test fails with that output, ending with where each was."""
    import signal
    import subprocess

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = torchrun(processes, *train_args)
    process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        abort_children(process.pid)
        try:
            stdout, stderr = process.communicate(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):  # all gone already
                os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"torchrun ran past {timeout} s; its output:\n{stdout[-3000:]}\n{stderr[-8000:]}\n"
                    f"its processes' innermost frames:\n{innermost_frames(stderr)}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def kill_at_checkpoint(config_path, checkpoint_name: str, processes: int = 1) -> None:
    """Train config_path from the CLI (through torchrun for several processes) and SIGKILL it, every process
    at once, as soon as it reports the checkpoint checkpoint_name."""
    import signal
    import subprocess

    command = ([sys.executable, "-m", "engine", "train", "--config", str(config_path)] if processes == 1
               else torchrun(processes, "--config", str(config_path)))
    # its own process group, which the kill ends whole, as a power cut would
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    for line in process.stdout:
        if "checkpoint:" in line and checkpoint_name in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium for the browser tests of a module."""
    from scal_gui.testing import chromium

    with chromium() as launched:
        yield launched

