"""The memory plan: the first settings in order that fit the limits, what it refuses, and where it applies
(the command, memory.fit at the start of training, the app's Fit button). On the tiny demo model, with
limits taken from its own estimates; the tiny config trains on the CPU, where nothing is reserved for CUDA."""
import re
from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT
from engine import config as cfg
from engine import events, memory_plan, vram
from engine.testing import tiny_config

MIB = 2**-20  # GiB per MiB
SETTLED = {"trainer.max_steps": 2, "sampling.interval_steps": 0, "checkpoint.every_n_train_steps": 100,
           "data.concepts[0].class_set.auto_generate.enabled": False}
# Every step before the batch already taken, and a clip norm, which fused backward cannot combine with.
EVERY_STEP_TAKEN = {"cache.latents": True, "cache.text_embeddings": True, "gradient_checkpointing": True,
                    "base_dtype": "fp8", "weights_dtype": "bf16", "optimizer.name": "adafactor",
                    "trainer.gradient_clip_val": 1.0}


def tiny_raw(tmp_path, **overrides) -> dict:
    return tiny_config(tmp_path, **{**SETTLED, **overrides})


@pytest.fixture(scope="module")
def shared_output(tmp_path_factory):
    """The output folder of the configs that no test trains: the estimates of a config are kept by every
    setting it has (memory_plan.TRACES), its output folder among them, so that tests planning the same config
    in this folder trace each candidate once."""
    return tmp_path_factory.mktemp("plan")


@pytest.fixture(scope="module")
def every_step(tiny_model, shared_output):
    """The plan of the tiny config under a limit nothing meets: every step, estimated in turn."""
    config = cfg.load(base=tiny_raw(shared_output))
    return memory_plan.plan_memory(config, vram_gib=1e-9, ram_gib=64)


def figures(plan) -> list[float]:
    return [tried.estimate.peak for tried in plan.tried if tried.estimate is not None]


def between(plan, index: int) -> float:
    """A GPU limit between the figures of the index-th estimated candidate and the one before it."""
    peaks = figures(plan)
    return (peaks[index - 1] + peaks[index]) / 2


def test_each_step_lowers_the_estimate_and_a_refused_one_is_skipped(every_step):
    applied = [tried for tried in every_step.tried if tried.settings]
    # the tiny UNet's 4 repeated blocks wait on the CPU 3, then 4 (a full fine-tune's with its step in backward)
    assert [tried.settings for tried in applied if tried.step == "blocks waiting on the CPU"] == [
        {"memory.blocks_on_cpu": 3, "optimizer.fused_backward": True}, {"memory.blocks_on_cpu": 4}]
    assert [list(tried.settings) for tried in applied] == [
        ["cache.text_embeddings", "cache.latents"], ["gradient_checkpointing"], ["base_dtype"], ["weights_dtype"],
        ["base_dtype"], ["memory.blocks_on_cpu", "optimizer.fused_backward"], ["memory.blocks_on_cpu"],
        ["memory.offload_activations"], ["optimizer.name"], ["optimizer.name"], ["batch_size"]]
    peaks = figures(every_step)
    estimated = [tried for tried in every_step.tried if tried.estimate is not None]
    # each step lowers the estimate, or says it gained nothing (two swapped blocks are on the device at once)
    for before, after in zip(estimated, estimated[1:]):
        assert after.estimate.peak < before.estimate.peak or (
            after.estimate.peak <= before.estimate.peak and after.verdict.endswith("no gain yet")), after.line()
    first_swap = next(t for t in estimated if t.step == "blocks waiting on the CPU")
    assert first_swap.estimate.peak < estimated[estimated.index(first_swap) - 1].estimate.peak
    # nf4 quantizes an adapter's base: the full fine-tune's validation refuses it, so it is never applied
    nf4 = next(tried for tried in every_step.tried if tried.step == "frozen weights in nf4")
    assert nf4.estimate is None and nf4.verdict.startswith("refused: config key 'base_dtype'")
    assert not every_step.fits and every_step.settings == {} and "\n" not in every_step.reason
    # the reason names the smallest figure and the largest part of it
    smallest = min(estimated, key=lambda tried: tried.estimate.peak).estimate
    parts = {"parameters": smallest.parameters, "gradients": smallest.gradients,
             "optimizer state": smallest.optimizer_state, "activations": smallest.activations,
             "other": smallest.other}
    found = re.fullmatch(r"the smallest GPU estimate reached is ([0-9.]+) GiB \(after 'half the batch'\), above "
                         r"0\.00 GiB \(1e-09\); most of it is (.+) ([0-9.]+) GiB", every_step.reason)
    assert found and found.group(1) == f"{min(peaks):.2f}", every_step.reason
    assert found.group(2) == max(parts, key=parts.get) and found.group(3) == f"{max(parts.values()):.2f}"


def test_the_first_step_that_fits_is_chosen_with_the_ones_before(every_step, shared_output):
    config = cfg.load(base=tiny_raw(shared_output))
    plan = memory_plan.plan_memory(config, vram_gib=between(every_step, 2), ram_gib=64)
    assert plan.fits and plan.settings == {"cache.text_embeddings": True, "cache.latents": True,
                                           "gradient_checkpointing": True}
    assert plan.estimate.peak == figures(every_step)[2]
    assert [tried.step for tried in plan.tried] == ["as configured", "cached latents and text embeddings",
                                                    "gradient checkpointing"]


def test_a_step_that_gained_nothing_is_dropped_where_the_fit_holds_without_it(tmp_path, monkeypatch):
    """The search itself, on a model of the memory in which the optimizer's state sets the peak until it
    shrinks, and only then do checkpointed activations matter."""
    from engine.ram import RamEstimate

    def estimate(config, arch=None, traces=None, processes=None):
        parameters = 2 if config.weights_dtype == "bf16" else 4
        state = {"torch.optim.AdamW": 6, "bitsandbytes.optim.AdamW8bit": 3}.get(
            cfg.optimizer_path(config.optimizer.name), 1)
        activations = 1 if config.gradient_checkpointing else 3
        return vram.VramEstimate(parameters, 0, state, activations, 0, parameters + max(state, activations),
                                 RamEstimate(loading=1, training=1))

    monkeypatch.setattr(memory_plan, "estimate", estimate)
    plan = memory_plan.plan_memory(cfg.load(base=tiny_raw(tmp_path)), vram_gib=3.5, ram_gib=64)
    assert plan.fits and plan.estimate.peak == 3
    assert plan.settings == {"gradient_checkpointing": True, "weights_dtype": "bf16", "optimizer.name": "adafactor"}
    verdicts = {tried.step: tried.verdict for tried in plan.tried}
    assert verdicts["gradient checkpointing"].endswith(", no gain yet")
    assert verdicts["without gradient checkpointing"] == "does not fit: kept"
    assert verdicts["without cached latents and text embeddings"] == "fits: dropped"


def test_the_command_writes_a_config_whose_estimate_fits(every_step, shared_output, tmp_path, capsys):
    from engine.cli import main

    source, written = tmp_path / "tiny.yaml", tmp_path / "fitted.yaml"
    source.write_text(yaml.safe_dump(tiny_raw(shared_output)), encoding="utf-8")
    limit = between(every_step, 1)
    assert main(["plan-memory", "--config", str(source), "--vram", str(limit), "--ram", "64",
                 "--write", str(written)]) == 0
    out = capsys.readouterr().out
    assert "chosen settings:\n  cache.text_embeddings: true\n  cache.latents: true\n" in out
    fitted = cfg.load(written)
    assert fitted.cache.latents and fitted.cache.text_embeddings and not fitted.gradient_checkpointing
    assert vram.estimate(fitted).peak <= limit


def test_nothing_fits_gives_one_line_and_exit_status_1(tiny_model, shared_output, tmp_path, capsys):
    from engine.cli import main

    source = tmp_path / "tiny.yaml"
    source.write_text(yaml.safe_dump(tiny_raw(shared_output, **EVERY_STEP_TAKEN, batch_size=1)), encoding="utf-8")
    assert main(["plan-memory", "--config", str(source), "--vram", "1e-9", "--ram", "64"]) == 1
    lines = capsys.readouterr().out.splitlines()
    # fused backward would drop the clip norm: refused by the config's validation, never applied
    assert "  optimizer step fused into backward: skipped: refused: config key 'optimizer.fused_backward': " \
           "cannot be combined with 'trainer.gradient_clip_val'" in "\n".join(lines)
    assert lines[-2:] == ["  half the batch: skipped: already 1", lines[-1]]
    assert lines[-1].startswith("nothing fits: the smallest GPU estimate reached is ")
    assert main(["plan-memory", "--config", str(source), "--vram", "0", "--ram", "64"]) == 2
    assert capsys.readouterr().err == "error: --vram: a size in GiB above 0, got 0.0\n"


def test_system_ram_above_its_limit_is_the_reason(tiny_model, shared_output):
    config = cfg.load(base=tiny_raw(shared_output, **EVERY_STEP_TAKEN, batch_size=1))
    plan = memory_plan.plan_memory(config, vram_gib=64, ram_gib=0.1)
    ram = plan.tried[0].estimate.ram.peak
    assert not plan.fits and plan.reason == (
        f"the GPU fits ({plan.tried[0].estimate.peak:.2f} GiB after 'as configured') but system RAM needs at least "
        f"{ram:.2f} GiB while training, above the 0.1 GiB limit")


def test_memory_fit_is_refused_out_of_range_or_half_set(tmp_path):
    for fit, key in (({"vram_gib": 0, "ram_gib": 8}, "memory.fit.vram_gib"),
                     ({"vram_gib": 8, "ram_gib": -1}, "memory.fit.ram_gib"), ({"vram_gib": 8}, "memory.fit")):
        with pytest.raises(cfg.ConfigError, match=rf"^config key '{key}': "):
            cfg.load(base=tiny_raw(tmp_path, memory={"fit": fit}))


def test_the_trainer_applies_memory_fit_before_setup(every_step, class_images, tmp_path, one_torch_thread):
    from engine.train import Trainer

    fit = {"vram_gib": between(every_step, 1), "ram_gib": 64}
    logs = []
    result = Trainer(cfg.load(base=tiny_raw(tmp_path, memory={"fit": fit})),
                     on_event=lambda e: logs.append(e.message) if isinstance(e, events.Log) else None).run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    saved = yaml.safe_load(next((tmp_path / "tiny-demo").glob("*/config.yaml")).read_text())
    assert saved["cache"]["latents"] and saved["cache"]["text_embeddings"] and not saved["gradient_checkpointing"]
    assert "memory.fit: cache.latents=true" in logs and "memory.fit: cache.text_embeddings=true" in logs


def test_the_trainer_refuses_to_start_when_nothing_fits(tiny_model, tmp_path):
    from engine.train import Trainer

    config = cfg.load(base=tiny_raw(tmp_path, **EVERY_STEP_TAKEN, batch_size=1,
                                    memory={"fit": {"vram_gib": 1e-9, "ram_gib": 64}}))
    result = Trainer(config).run()
    assert isinstance(result, events.Failed) and result.user_error
    assert result.error.startswith("config key 'memory.fit': nothing fits: the smallest GPU estimate reached is ")
    assert not (tmp_path / "tiny-demo").exists()


def test_the_app_writes_the_chosen_settings_into_the_yaml(every_step, shared_output):
    from scal_gui import configs, fields
    from scal_gui.actions import Actions
    from scal_gui.jobs import JobManager
    from scal_gui.tab_train import fit_to_card

    actions = Actions(JobManager())
    text = configs.to_yaml(tiny_raw(shared_output))
    message, fitted = actions.fit_memory(text, between(every_step, 1), 64)
    assert message.startswith("Fits: estimated GPU peak ") and "cache.latents=true" in message
    raw = configs.parse_yaml(fitted)
    assert raw["cache"] == {"latents": True, "text_embeddings": True}
    assert raw["batch_size"] == 2 and "gradient_checkpointing" not in raw  # the rest as the page had it
    assert actions.fit_memory(text, None, 64) == ("Error: GPU memory: a size in GiB above 0, got None", None)
    # the button's handler puts the fitted YAML and its form values on the page
    planned = SimpleNamespace(fit_memory=lambda *args: (message, fitted))
    shown = fit_to_card(planned, text, 8, 64)
    assert shown[:2] == [message, fitted] and shown[3:] == fields.form_values(raw, fields.ALL)


# Flux.1-dev LoRA rank 64 at 1024 px, traced on the real 12-billion-parameter transformer (about 20 s a trace
# on an idle core); the block-swap counts share the traces of their option sets (memory_plan.TRACES).
FLUX_LORA = ROOT / "presets" / "flux-lora-24gb.yaml"
TRIED_GPU = re.compile(r"^  (.+?)(?: \(.*\))?: GPU ([0-9.]+) GiB, RAM ([0-9.]+) GiB: ")


def test_the_plan_fits_a_flux_lora_into_8_gib_and_32_gib_of_ram(tmp_path, capsys):
    from engine.cli import main

    written = tmp_path / "fitted.yaml"
    assert main(["plan-memory", "--config", str(FLUX_LORA), "--vram", "8", "--ram", "32",
                 "--write", str(written)]) == 0
    out = capsys.readouterr().out
    fitted = cfg.load(written)
    assert vram.resolve_architecture(fitted).source == "flux1-dev" and fitted.data.resolution == 1024
    assert fitted.memory.blocks_on_cpu > 0
    result = vram.estimate(fitted, traces=memory_plan.TRACES)
    assert result.peak <= 8 - memory_plan.CUDA_RESERVE_GIB and result.ram.peak <= 32
    assert f"peak_gib: {result.peak:.3f}\n" in out and f"system_ram_peak_gib: {result.ram.peak:.3f}\n" in out
    # the swap counts were derived, not traced: one trace for the config and one per other option set
    assert len([line for line in out.splitlines() if TRIED_GPU.match(line)]) > len(
        {key for key in memory_plan.TRACES if "flux1-dev" in key})


@pytest.mark.parametrize("arch", vram.ARCHITECTURES)
def test_the_plan_counts_the_blocks_block_swap_moves_for_every_shipped_architecture(arch):
    """The count the plan grows `memory.blocks_on_cpu` towards is the number of blocks block swap finds in the
    real denoiser (built on `meta`): a model the count misses would stop the plan with an error."""
    import diffusers
    import torch

    from engine import block_swap

    architecture = vram.resolve_architecture(cfg.from_dict({"model": "x"}), arch)
    with torch.device("meta"):
        model = getattr(diffusers, architecture.unet["_class_name"]).from_config(architecture.unet)
    config = cfg.from_dict({"model": architecture.source})  # the model's name alone tells its architecture
    assert memory_plan.repeated_block_count(config) == len(block_swap.repeated_blocks(model))
