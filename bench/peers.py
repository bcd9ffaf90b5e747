"""This project beside kohya's sd-scripts and diffusers' training examples: one model, one set of images, one set
of settings, each trainer in its own process, on the CPU.

    python bench/peers.py --kohya PATH --kohya-site DIR --diffusers-examples PATH --diffusers-site DIR
                          [--rounds 7] [--threads 2] [--steps 10] [--warmup 2] [--resolution 256]
                          [--cases sd15-lora sd15-full sdxl-lora] [--trainers ours kohya ...] [--work DIR]
    python bench/peers.py --smoke ...   (the tiny demo models, 64 px, 3 steps, 2 rounds: checks the script; kohya's
                                         sd-scripts cannot load them and is skipped)

Cases: SD1.5 LoRA (rank 16, alpha 16, over the UNet's transformer blocks: this project eager and with
`compile: true`, diffusers' `examples/dreambooth/train_dreambooth_lora.py` with its UNet targets widened to that
set, kohya's `train_network.py` with `networks.lora`), SD1.5 full fine-tune of the UNet (diffusers'
`train_dreambooth.py`) and SDXL LoRA (kohya's `sdxl_train_network.py`). Every trainer gets the same random full-size
model (the shipped configs, written once as a diffusers folder into the cache), the same 16 images at the
resolution, one prompt, batch 1, fp32, AdamW (lr 1e-4, weight decay 1e-2, constant rate), PyTorch's SDPA attention,
frozen text encoders and VAE run on every step, no data-loader workers, no GPU (CUDA_VISIBLE_DEVICES empty) and
`--threads` torch threads.

Measurement: each run starts with `bench/step_probe.py` loaded at interpreter start, whose global optimizer-step
hook records wall time, process CPU time, RSS and peak RSS after every step and ends the process after the last one.
s/step and CPU s/step are the gaps from the end of step `--warmup` to the end of step `--steps` over the steps
between; peak RSS is the process's by then (loading included), steady RSS its RSS after the last step; trained
parameters are those the optimizer updates. The trainers alternate within each round (A B C A B C ...); each ratio
is the median over the rounds of that round's trainer / this project. A case whose trainers update different numbers
of parameters is not reported. The 1-minute load average before and after each run is printed: on a shared machine
other work inflates wall time, and CPU time too (torch's threads spin while they wait for each other).

The peers run from the checkouts named (nothing of theirs is in this project), with the project's torch and, first on
their PYTHONPATH, a folder of packages for each: `--kohya-site` (what its requirements.txt pins and this project's
environment has newer or lacks: transformers 4.54.1, diffusers 0.32.1, accelerate 1.6.0, huggingface-hub 0.34.3,
tokenizers 0.21, toml, voluptuous, imagesize, einops, opencv-python-headless, torchvision) and `--diffusers-site`
(torchvision), each made with `pip install --no-deps --target DIR ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
PROMPT = "sks toy"
IMAGES = 16  # one epoch: a run of at most this many steps has no epoch's end inside its timed steps
LEARNING_RATE = 1e-4
RANK = 16
GIB = 2**30
# the tokenizer ids kohya's sd-scripts looks up in its --tokenizer_cache_dir, and the model folder's tokenizers
KOHYA_TOKENIZERS = {"openai/clip-vit-large-patch14": "tokenizer",
                    "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": "tokenizer_2"}
LORA_TARGETS = "PEERS_UNET_LORA_TARGETS"
# A failure here would leave the run unmeasured, so it ends the process.
SITECUSTOMIZE = '''\
import importlib.util, os, sys, traceback


def _load(name):
    spec = importlib.util.spec_from_file_location(name, {bench!r} + "/" + name + ".py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


try:
    _load("step_probe").install()
    if os.environ.get({targets!r}):
        _load("peers").widen_unet_lora_targets(os.environ[{targets!r}])
except Exception:
    traceback.print_exc()
    print("error: the step probe could not be installed", flush=True)
    os._exit(3)
'''


def widen_unet_lora_targets(names_file: str) -> None:
    """In a diffusers example's process: the UNet's LoRA adapts exactly the modules named in names_file (a JSON
    list of full module names), wherever the script puts its own target list."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.peft import PeftAdapterMixin

    names = set(json.loads(Path(names_file).read_text(encoding="utf-8")))
    original = PeftAdapterMixin.add_adapter

    def add_adapter(self, adapter_config, *args, **kwargs):
        if isinstance(self, UNet2DConditionModel):
            adapter_config.target_modules = set(names)
        return original(self, adapter_config, *args, **kwargs)

    PeftAdapterMixin.add_adapter = add_adapter


# ---------------------------------------------------------------------------------------------------- inputs

def model_folder(arch: str, smoke: bool) -> Path:
    """The diffusers folder every trainer loads: the tiny demo model, or the architecture's shipped configs at
    their real sizes with random weights (seed 0), built once into the cache. Its tokenizer folders also hold the
    vocab.json and merges.txt that the transformers version kohya's sd-scripts pins reads (the same vocabulary)."""
    from unittest import mock

    from engine.models import tiny
    from engine.models.clip_vocab import write_tokenizer_files
    from engine.paths import build_once, cache_dir, demo_model_dir

    if smoke:
        return demo_model_dir(arch)

    def build(folder: Path) -> None:
        real_sizes = {arch: {name: {} for name in tiny.SIZES[arch]}}  # no size changed: the real architecture
        with mock.patch.dict(tiny.SIZES, real_sizes):
            tiny.make_tiny_model(folder, seed=0, arch=arch)
        for subfolder in KOHYA_TOKENIZERS.values():
            if (folder / subfolder).is_dir():
                write_tokenizer_files(folder / subfolder)

    return build_once(cache_dir() / "bench-peers" / f"random-{arch}", build)


def image_folder(resolution: int) -> Path:
    """IMAGES of the demo's captioned shapes resized to resolution², in `<folder>/1_<prompt>/` for the peers (kohya's
    sd-scripts reads repeats and prompt from the sub-folder's name; diffusers' examples are pointed at it, and read
    every file there) and the same files in `<folder>/ours/` for this project, which keeps its index beside them."""
    from PIL import Image

    from engine.paths import build_once, cache_dir, demo_data_dir

    def build(folder: Path) -> None:
        peers, mine = folder / f"1_{PROMPT}", folder / "ours"
        peers.mkdir()
        for source in sorted((demo_data_dir() / "finetune").glob("*.png"))[:IMAGES]:
            Image.open(source).convert("RGB").resize((resolution, resolution), Image.BICUBIC).save(peers / source.name)
        shutil.copytree(peers, mine)

    return build_once(cache_dir() / "bench-peers" / f"images-{resolution}", build)


def kohya_tokenizers(model: Path) -> Path:
    """kohya's sd-scripts loads its tokenizers by Hub id, or from a folder per id under --tokenizer_cache_dir:
    the model folder's own, there (it runs offline)."""
    from engine.paths import build_once, cache_dir

    def build(folder: Path) -> None:
        for hub_id, subfolder in KOHYA_TOKENIZERS.items():
            if (model / subfolder).is_dir():
                shutil.copytree(model / subfolder, folder / hub_id.replace("/", "_"))

    return build_once(cache_dir() / "bench-peers" / f"kohya-tokenizers-{model.name}", build)


def unet_lora_targets(model: Path, folder: Path) -> Path:
    """The UNet modules this project adapts (every Linear and 1x1 convolution of its transformer blocks, as kohya's
    sd-scripts does), named in a JSON file for diffusers' example."""
    import torch
    from diffusers import UNet2DConditionModel

    from engine.config import Network
    from engine.models.adapters import target_modules

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model / "unet"))
    names = sorted(target_modules(unet, "unet", Network(type="lora", rank=RANK, alpha=RANK)))
    path = folder / "unet-lora-targets.json"
    path.write_text(json.dumps(names), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- trainers

@dataclass
class Settings:
    steps: int
    warmup: int
    threads: int
    resolution: int
    images: Path  # image_folder's
    work: Path
    kohya: Optional[Path]
    diffusers: Optional[Path]
    sites: dict  # checkout name ('kohya', 'diffusers'): a folder of packages for that peer's runs, or None
    timeout: float


@dataclass
class Run:
    """What one trainer is started with."""
    command: list[str]
    cwd: Path
    env: dict = field(default_factory=dict)
    site: Optional[Path] = None  # put first on PYTHONPATH


def ours(case: "Case", model: Path, s: Settings, out: Path, compile_blocks: bool = False) -> Run:
    import yaml

    values = {"compile": compile_blocks,
        "model": str(model), "output_dir": str(out), "project": "peers", "batch_size": 1, "seed": 0,
        "num_workers": 0, "network": {"type": "lora", "rank": RANK, "alpha": RANK} if case.lora else {"type": "full"},
        "data": {"resolution": s.resolution, "center_crop": True,
                 "concepts": [{"instance_set": {"path": str(s.images / "ours"), "prompt": PROMPT}}]},
        "sampling": {"interval_steps": 0}, "checkpoint": {"every_n_epochs": None, "every_n_train_steps": None},
        "trainer": {"precision": 32, "accelerator": "cpu", "max_steps": s.steps, "max_epochs": None},
        "prior_preservation": {"enabled": False},
        "optimizer": {"name": "torch.optim.AdamW", "params": {"lr": LEARNING_RATE, "weight_decay": 1e-2},
                      "lr_scheduler": {"name": "constant"}},
    }
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(values), encoding="utf-8")
    return Run([sys.executable, "-m", "engine", "train", "--config", str(config)], ROOT)


def ours_compiled(case: "Case", model: Path, s: Settings, out: Path) -> Run:
    """This project with `compile: true`: its blocks compile during the first step, before the timed ones."""
    return ours(case, model, s, out, compile_blocks=True)


def _diffusers_common(model: Path, s: Settings, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(s.images / f"1_{PROMPT}"),
            "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", str(s.resolution),
            "--center_crop", "--train_batch_size", "1", "--max_train_steps", str(s.steps),
            "--learning_rate", str(LEARNING_RATE), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--mixed_precision", "no", "--seed", "0", "--dataloader_num_workers", "0",
            "--checkpointing_steps", str(10**6)]


def diffusers_lora(case: "Case", model: Path, s: Settings, out: Path) -> Run:
    folder = s.diffusers / "examples" / "dreambooth"
    targets = unet_lora_targets(model, out.parent)
    return Run([sys.executable, str(folder / "train_dreambooth_lora.py"), *_diffusers_common(model, s, out),
                "--rank", str(RANK)], folder, {LORA_TARGETS: str(targets)}, s.sites["diffusers"])


def diffusers_full(case: "Case", model: Path, s: Settings, out: Path) -> Run:
    folder = s.diffusers / "examples" / "dreambooth"
    return Run([sys.executable, str(folder / "train_dreambooth.py"), *_diffusers_common(model, s, out)], folder,
               site=s.sites["diffusers"])


def kohya(case: "Case", model: Path, s: Settings, out: Path) -> Run:
    script = "sdxl_train_network.py" if case.arch == "sdxl" else "train_network.py"
    return Run([sys.executable, str(s.kohya / script), "--pretrained_model_name_or_path", str(model),
                "--train_data_dir", str(s.images), "--output_dir", str(out), "--output_name", "lora",
                "--save_model_as", "safetensors", "--resolution", str(s.resolution), "--train_batch_size", "1",
                "--max_train_steps", str(s.steps), "--optimizer_type", "AdamW", "--learning_rate", str(LEARNING_RATE),
                "--lr_scheduler", "constant", "--network_module", "networks.lora", "--network_dim", str(RANK),
                "--network_alpha", str(RANK), "--network_train_unet_only", "--mixed_precision", "no",
                "--save_precision", "float", "--sdpa", "--seed", "0", "--max_data_loader_n_workers", "0",
                "--tokenizer_cache_dir", str(kohya_tokenizers(model))], s.kohya, site=s.sites["kohya"])


@dataclass
class Contender:
    name: str
    build: object  # (case, model, settings, output folder) -> Run
    script: str = ""  # the peer's script, relative to its checkout ("" = this project)
    checkout: str = ""  # which of --kohya / --diffusers-examples holds it


OURS = Contender("this project", ours)
OURS_COMPILED = Contender("this project, compile: true", ours_compiled)
DIFFUSERS_LORA = Contender("diffusers train_dreambooth_lora.py", diffusers_lora,
                           "examples/dreambooth/train_dreambooth_lora.py", "diffusers")
DIFFUSERS_FULL = Contender("diffusers train_dreambooth.py", diffusers_full,
                           "examples/dreambooth/train_dreambooth.py", "diffusers")
KOHYA_SD = Contender("kohya train_network.py", kohya, "train_network.py", "kohya")
KOHYA_SDXL = Contender("kohya sdxl_train_network.py", kohya, "sdxl_train_network.py", "kohya")


@dataclass
class Case:
    name: str
    arch: str
    lora: bool
    trainers: list


CASES = [Case("sd15-lora", "sd", True, [OURS, OURS_COMPILED, DIFFUSERS_LORA, KOHYA_SD]),
         Case("sd15-full", "sd", False, [OURS, DIFFUSERS_FULL]),
         Case("sdxl-lora", "sdxl", True, [OURS, KOHYA_SDXL])]


def unavailable(trainer: Contender, s: Settings, smoke: bool) -> Optional[str]:
    """Why the trainer cannot run here, before trying; None when it may."""
    if not trainer.checkout:
        return None
    checkout = s.kohya if trainer.checkout == "kohya" else s.diffusers
    flag = "--kohya" if trainer.checkout == "kohya" else "--diffusers-examples"
    if checkout is None:
        return f"no checkout given ({flag} PATH)"
    if not (checkout / trainer.script).is_file():
        return f"{checkout / trainer.script} does not exist"
    if smoke and trainer.checkout == "kohya":
        return ("kohya's sd-scripts rebuilds a diffusers UNet as its own fixed-size SD1.5/SDXL UNet "
                "(library/original_unet.py, library/sdxl_original_unet.py), which the tiny demo models do not fit")
    return None


def commit(checkout: Optional[Path]) -> str:
    if checkout is None:
        return "-"
    found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else "unknown (not a git checkout)"


# ---------------------------------------------------------------------------------------------------- measuring

def _last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors or lines or ["(no output)"])[-1][:400]


def measure(trainer: Contender, case: Case, model: Path, s: Settings, label: str) -> dict:
    """One run of trainer; its figures, or {'error': why}."""
    import step_probe

    out = s.work / label
    run = trainer.build(case, model, s, out)
    probe_file, log = s.work / f"{label}.steps.jsonl", s.work / f"{label}.log"
    probe_file.unlink(missing_ok=True)
    probe_dir = s.work / "probe"
    paths = [str(probe_dir)] + ([str(run.site)] if run.site else [])
    env = {**os.environ, **run.env, "PYTHONPATH": os.pathsep.join(paths), step_probe.OUT: str(probe_file),
           step_probe.STOP_AFTER: str(s.steps), step_probe.THREADS: str(s.threads),
           "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads), "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()[0]
    with open(log, "w", encoding="utf-8") as sink:
        try:
            result = subprocess.run(run.command, cwd=run.cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    timeout=s.timeout)
            returncode = result.returncode
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {s.timeout:.0f} s (log: {log})"}
    rows = [json.loads(line) for line in probe_file.read_text(encoding="utf-8").splitlines()] \
        if probe_file.exists() else []
    if len(rows) < s.steps:
        return {"error": f"exit {returncode} after {len(rows)} of {s.steps} steps: {_last_error(log)} (log: {log})"}
    first, last = rows[s.warmup - 1], rows[s.steps - 1]
    steps = s.steps - s.warmup
    threads = {row["threads"] for row in rows}
    if threads != {s.threads}:
        return {"error": f"ran with {sorted(threads)} torch threads, not {s.threads}"}
    shutil.rmtree(out, ignore_errors=True)  # whatever the trainer wrote; the figures are in the probe file
    return {"step_s": (last["time"] - first["time"]) / steps, "cpu_s": (last["cpu"] - first["cpu"]) / steps,
            "peak_rss": last["peak_rss"], "rss": last["rss"], "load": (load_before, os.getloadavg()[0]),
            "trained": rows[0]["trained"], "torchvision_ops_stubbed": rows[0]["torchvision_ops_stubbed"]}


def run_case(case: Case, s: Settings, rounds: int, smoke: bool) -> dict:
    """Every round runs each available trainer once, in the case's order; a trainer whose run fails is dropped."""
    model = model_folder(case.arch, smoke)
    results = {trainer.name: [] for trainer in case.trainers}
    skipped = {trainer.name: why for trainer in case.trainers if (why := unavailable(trainer, s, smoke))}
    for round_ in range(1, rounds + 1):
        for trainer in case.trainers:
            if trainer.name in skipped:
                continue
            label = f"{case.name}-{trainer.build.__name__}-{round_}"
            started = time.monotonic()
            found = measure(trainer, case, model, s, label)
            if "error" in found:
                skipped[trainer.name] = found["error"]
                print(f"{case.name} round {round_} {trainer.name}: FAILED, dropped: {found['error']}", flush=True)
                if trainer is OURS:
                    return {"results": results, "skipped": skipped}
                continue
            results[trainer.name].append(found)
            print(f"{case.name} round {round_} {trainer.name}: {found['step_s']:.3f} s/step, {found['cpu_s']:.3f} CPU "
                  f"s/step, peak RSS {found['peak_rss'] / GIB:.2f} GiB, {found['trained']:,} trained "
                  f"({time.monotonic() - started:.0f} s, load average {found['load'][0]:.1f} to "
                  f"{found['load'][1]:.1f})", flush=True)
    return {"results": results, "skipped": skipped}


def report(case: Case, found: dict) -> bool:
    """Print the case's table; False when it cannot be reported (this project failed, or counts differ)."""
    results, skipped = found["results"], found["skipped"]
    print(f"\n### {case.name}\n")
    for name, why in skipped.items():
        print(f"- {name}: skipped: {why}")
    ran = {name: rows for name, rows in results.items() if rows and name not in skipped}
    if OURS.name not in ran:
        print("not reported: this project's runs did not complete")
        return False
    counts = {name: {row["trained"] for row in rows} for name, rows in ran.items()}
    if len({count for values in counts.values() for count in values}) > 1:
        print("not reported: the trainers update different numbers of parameters: " +
              ", ".join(f"{name} {sorted(values)}" for name, values in counts.items()))
        return False
    base = ran[OURS.name]
    loads = [value for rows in ran.values() for row in rows for value in row["load"]]
    print(f"{len(base)} rounds, load average {min(loads):.1f}-{max(loads):.1f}; ratios are the median over the rounds "
          "of trainer / this project\n")
    print("| trainer | s/step | ratio | CPU s/step | ratio | peak RSS (GiB) | ratio | steady RSS (GiB) | ratio "
          "| trained parameters |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in ran.items():
        cells = []
        for key, scale in (("step_s", 1), ("cpu_s", 1), ("peak_rss", GIB), ("rss", GIB)):
            value = statistics.median(row[key] for row in rows) / scale
            ratio = statistics.median(row[key] / ours_row[key] for row, ours_row in zip(rows, base))
            cells += [f"{value:.3f}" if scale == 1 else f"{value:.2f}", f"{ratio:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + f" | {rows[0]['trained']:,} |")
    stubbed = [name for name, rows in ran.items() if rows[0]["torchvision_ops_stubbed"]]
    if stubbed:
        print("\n(torchvision's compiled ops did not load beside this torch; their schemas were defined for: "
              f"{', '.join(stubbed)})")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kohya", type=Path, help="a checkout of kohya-ss/sd-scripts")
    parser.add_argument("--diffusers-examples", type=Path, help="a checkout of huggingface/diffusers (its examples/)")
    parser.add_argument("--kohya-site", type=Path, help="packages for kohya's runs only, first on their PYTHONPATH")
    parser.add_argument("--diffusers-site", type=Path,
                        help="packages for the diffusers examples' runs only, first on their PYTHONPATH")
    parser.add_argument("--cases", nargs="+", choices=[case.name for case in CASES], default=[c.name for c in CASES])
    parser.add_argument("--trainers", nargs="+", choices=sorted({t.build.__name__ for c in CASES for t in c.trainers}),
                        help="only these trainers of each case (default: all); this project's eager run always runs")
    parser.add_argument("--rounds", type=int, help="default 7, or 2 with --smoke")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, help="steps per run (default 10, or 3 with --smoke)")
    parser.add_argument("--warmup", type=int, help="steps before the timed ones (default 2, or 1 with --smoke)")
    parser.add_argument("--resolution", type=int, help="default 256, or 64 with --smoke")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    parser.add_argument("--work", type=Path, help="folder for configs, logs and step files (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="the tiny demo models, to check the script quickly")
    args = parser.parse_args()
    steps = args.steps or (3 if args.smoke else 10)
    warmup = args.warmup or (1 if args.smoke else 2)
    if not 1 <= warmup < steps <= IMAGES:
        parser.error(f"--warmup must be at least 1 and below --steps, and --steps at most {IMAGES} (one epoch)")
    if args.threads < 1 or (args.rounds is not None and args.rounds < 1):
        parser.error("--threads and --rounds must be at least 1")
    for flag, path in (("--kohya", args.kohya), ("--diffusers-examples", args.diffusers_examples),
                       ("--kohya-site", args.kohya_site), ("--diffusers-site", args.diffusers_site)):
        if path is not None and not path.is_dir():
            parser.error(f"{flag}: {path} is not a folder")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    work = args.work or Path(tempfile.mkdtemp(prefix="peers-"))
    (work / "probe").mkdir(parents=True, exist_ok=True)
    (work / "probe" / "sitecustomize.py").write_text(SITECUSTOMIZE.format(bench=str(BENCH), targets=LORA_TARGETS),
                                                     encoding="utf-8")
    resolution = args.resolution or (64 if args.smoke else 256)
    s = Settings(steps, warmup, args.threads, resolution, image_folder(resolution), work,
                 args.kohya and args.kohya.resolve(), args.diffusers_examples and args.diffusers_examples.resolve(),
                 {"kohya": args.kohya_site and args.kohya_site.resolve(),
                  "diffusers": args.diffusers_site and args.diffusers_site.resolve()}, args.timeout)
    print(f"{'tiny demo models (smoke)' if args.smoke else 'random full-size models'}, {resolution} px, batch 1, "
          f"fp32, {args.threads} threads, steps {warmup + 1}-{steps} timed; kohya {commit(s.kohya)}, diffusers "
          f"{commit(s.diffusers)}; work folder {work}", flush=True)
    rounds = args.rounds or (2 if args.smoke else 7)
    cases = [Case(case.name, case.arch, case.lora,
                  [t for t in case.trainers if t is OURS or not args.trainers or t.build.__name__ in args.trainers])
             for case in CASES if case.name in args.cases]
    found = {case.name: run_case(case, s, rounds, args.smoke) for case in cases}
    reported = [report(case, found[case.name]) for case in cases]
    if not all(reported):
        sys.exit(1)


if __name__ == "__main__":
    main()
