"""The optimizers behind optimizer.name's short names: each learns, alone and one per parameter (fused into
backward, on bf16 weights) unless the config refuses that with one line; schedule-free AdamW samples and saves
its evaluation weights and resumes exactly."""
import copy
import json
import math
import statistics

import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoints, events
from engine import config as cfg
from engine import optim
from engine.testing import tiny_config

# lr of each short name in these tests (Prodigy's and relative-step Adafactor's are their own settings)
LEARNING_RATES = {"adamw": 1e-2, "adam": 1e-2, "sgd": 0.1, "adamw8bit": 1e-2, "lion": 1e-3, "lion8bit": 1e-3,
                  "prodigy": 1.0, "adafactor": 1e-2, "adamw_schedulefree": 1e-2, "came": 1e-2}
PER_PARAMETER_REFUSED = {"prodigy"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def optimizer_config(name: str, **params) -> cfg.Optimizer:
    return cfg.Optimizer(name=name, params=cfg.OptimizerParams(lr=LEARNING_RATES[name], **params))


def test_every_short_name_is_offered_and_builds_its_package_class():
    assert set(cfg.OPTIMIZER_NAMES) <= set(cfg.OPTIMIZER_ALIASES)
    classes = {name: type(optim.build_optimizer(optimizer_config(name), [torch.nn.Parameter(torch.ones(2))],
                                                LEARNING_RATES[name]))
               for name in cfg.OPTIMIZER_NAMES}
    assert {name: f"{cls.__module__.partition('.')[0]}.{cls.__name__}" for name, cls in classes.items()} == {
        "adamw": "torch.AdamW", "adam": "torch.Adam", "sgd": "torch.SGD", "adamw8bit": "bitsandbytes.AdamW8bit",
        "lion": "bitsandbytes.Lion", "lion8bit": "bitsandbytes.Lion8bit", "prodigy": "prodigyopt.Prodigy",
        "adafactor": "transformers.Adafactor", "adamw_schedulefree": "schedulefree.AdamWScheduleFree",
        "came": "came_pytorch.CAME"}


def test_adafactor_runs_at_the_configured_rate_or_its_relative_step():
    param = [torch.nn.Parameter(torch.ones(4, 4))]
    fixed = optim.build_optimizer(optimizer_config("adafactor"), param, 1e-2).param_groups[0]
    assert (fixed["lr"], fixed["relative_step"], fixed["scale_parameter"]) == (1e-2, False, False)
    relative = optim.build_optimizer(optimizer_config("adafactor", relative_step=True, warmup_init=True), param,
                                     1e-2).param_groups[0]
    assert (relative["relative_step"], relative["scale_parameter"], relative["warmup_init"]) == (True, True, True)


def test_schedule_free_warms_up_by_itself_under_a_constant_schedule():
    options = cfg.Optimizer(name="adamw_schedulefree", params=cfg.OptimizerParams(lr=1e-2),
                            lr_scheduler=cfg.LrScheduler(warmup=cfg.Warmup(enabled=True, steps=4)))
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = optim.build_optimizer(options, [param], 1e-2)
    schedule = optim.build_scheduler(options, optimizer, total_steps=10)
    optim.train_mode(optimizer)
    rates, used = [], []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones_like(param)
        optimizer.step()
        used.append(optimizer.param_groups[0]["scheduled_lr"])
        schedule.step()
    assert rates == [1e-2] * 6  # the schedule holds the rate...
    assert used == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])  # ...and the optimizer warms it up


# -- each optimizer learns a fixed batch --------------------------------------------------------------------------
def fixed_batch(dtype: torch.dtype):
    """A small regression over one fixed batch. The first layer is large enough (6144 weights) for the
    8-bit optimizers' quantized state; it has matrices (factored by Adafactor and CAME) and vectors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 1)).to(dtype)
    inputs = torch.randn(128, 64)
    targets = inputs[:, :1] - 0.5 * inputs[:, 1:2]

    def loss() -> torch.Tensor:
        return (model(inputs.to(dtype)).float() - targets).pow(2).mean()

    return model, loss


# (name, optimizer.params, one optimizer per parameter (fused into backward, on bf16 weights)); the config
# refuses Prodigy per parameter (test_whole_model_optimizers_refuse_one_optimizer_per_parameter).
CASES = [(name, params, per_parameter) for name, params in [(name, {}) for name in cfg.OPTIMIZER_NAMES]
         + [("adafactor", {"relative_step": True})] for per_parameter in (False, True)
         if not (per_parameter and name in PER_PARAMETER_REFUSED)]


@pytest.mark.parametrize("name, params, per_parameter", CASES, ids=[
    name + ("-relative" if params else "") + ("-fused-bf16" if per_parameter else "") for name, params, per_parameter
    in CASES])
def test_each_optimizer_fits_a_fixed_batch(name, params, per_parameter):
    model, loss = fixed_batch(torch.bfloat16 if per_parameter else torch.float32)
    options, lr = optimizer_config(name, **params), LEARNING_RATES[name]
    if per_parameter:
        optimizer = optim.PerParameterOptimizer(options, [{"params": list(model.parameters()), "lr": lr}],
                                                fused=True, bf16_weights=True)
        optimizer.armed = True  # every backward is the last of its accumulation group
    else:
        optimizer = optim.build_optimizer(options, model.parameters(), lr)
    optim.train_mode(optimizer)
    with torch.no_grad(), optim.eval_weights(optimizer):
        start = loss().item()
    for _ in range(80):
        loss().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad(), optim.eval_weights(optimizer):
        end = loss().item()
    assert all(p.dtype == (torch.bfloat16 if per_parameter else torch.float32) for p in model.parameters())
    assert end < 0.5 * start, (start, end)


def test_schedule_free_on_bf16_weights_evaluates_at_its_average_and_trains_on():
    model, loss = fixed_batch(torch.bfloat16)
    options = optimizer_config("adamw_schedulefree")
    optimizer = optim.PerParameterOptimizer(options, [{"params": list(model.parameters()), "lr": 1e-2}],
                                            fused=False, bf16_weights=True)
    optim.train_mode(optimizer)
    for _ in range(10):
        loss().backward()
        optimizer.step()
    weight, inner = model[0].weight, optimizer.optimizers[0]
    training_point = weight.detach().clone()
    z = inner.state[weight]["z"]
    assert z.dtype == torch.float32  # the state is computed on fp32 copies, as each step is
    with optim.eval_weights(optimizer):
        assert not inner.param_groups[0]["train_mode"] and weight.dtype == torch.bfloat16
        beta1 = inner.param_groups[0]["betas"][0]
        expected = training_point.float().lerp(z, 1 - 1 / beta1).to(torch.bfloat16)
        assert torch.equal(weight, expected)
        assert not torch.equal(weight, training_point)
    assert inner.param_groups[0]["train_mode"]
    # back at exactly the training weights: the move back, rounded to bf16, would miss some by a bf16 step
    assert torch.equal(weight, training_point)
    beta1 = inner.param_groups[0]["betas"][0]
    moved_back = expected.float().lerp(z, 1 - beta1).to(torch.bfloat16)
    assert not torch.equal(moved_back, training_point)
    loss().backward()
    optimizer.step()  # (schedule-free refuses to step outside training mode)


def test_bf16_weights_keep_their_gradient_accumulators_through_steps():
    """DDP hooks each parameter's gradient accumulator once, at wrapping: a step that replaced it would leave
    every later gradient unexchanged."""
    model, loss = fixed_batch(torch.bfloat16)
    params = list(model.parameters())
    optimizer = optim.PerParameterOptimizer(optimizer_config("adamw"), [{"params": params, "lr": 1e-2}],
                                            fused=False, bf16_weights=True)
    accumulators = [param.view_as(param).grad_fn.next_functions[0][0] for param in params]
    reached = []
    for index, accumulator in enumerate(accumulators):
        accumulator.register_hook(lambda *_, index=index: reached.append(index))
    for _ in range(3):
        reached.clear()
        loss().backward()
        assert sorted(reached) == list(range(len(params)))
        optimizer.step()
    assert all(param.dtype == torch.bfloat16 for param in params)
    assert [param.view_as(param).grad_fn.next_functions[0][0] for param in params] == accumulators


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_bf16_weights_resume_from_a_saved_optimizer_state_exactly(name):
    """A loaded state stays that of the fp32 copies each step works on (8-bit where the optimizer
    quantizes), and stepping on from it moves the weights as the run it was saved from does."""
    def per_parameter(model):
        return optim.PerParameterOptimizer(optimizer_config(name), [{"params": list(model.parameters()),
                                                                     "lr": LEARNING_RATES[name]}],
                                           fused=False, bf16_weights=True, seed=3)

    model, loss = fixed_batch(torch.bfloat16)
    optimizer = per_parameter(model)
    for _ in range(3):
        loss().backward()
        optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    resumed_model, resumed_loss = fixed_batch(torch.bfloat16)
    resumed_model.load_state_dict(model.state_dict())
    resumed = per_parameter(resumed_model)
    resumed.load_state_dict(saved)
    states = [inner.state[param] for inner, param in zip(resumed.optimizers, resumed.params)]
    dtypes = {value.dtype for state in states for key, value in state.items()
              if torch.is_tensor(value) and value.dim() > 0}
    assert dtypes == ({torch.float32} if name == "adamw" else {torch.uint8, torch.float32})
    for _ in range(2):
        for each_loss, each in ((loss, optimizer), (resumed_loss, resumed)):
            each_loss().backward()
            each.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


@pytest.mark.parametrize("strategy", ["constant", "linear"])
@pytest.mark.parametrize("schedule", ["cosine", "torch.optim.lr_scheduler.CosineAnnealingLR"])
def test_warmup_starts_at_init_lr_with_its_strategy_then_the_schedule_runs_the_remaining_steps(schedule, strategy):
    lr, init_lr, warmup_steps, total = 1e-2, 1e-3, 4, 10
    options = cfg.Optimizer(name="adamw", params=cfg.OptimizerParams(lr=lr), lr_scheduler=cfg.LrScheduler(
        name=schedule, warmup=cfg.Warmup(enabled=True, init_lr=init_lr, steps=warmup_steps, strategy=strategy)))

    def build():
        param = torch.nn.Parameter(torch.ones(2))
        optimizer = optim.build_optimizer(options, [param], lr)
        return param, optimizer, optim.build_scheduler(options, optimizer, total_steps=total)

    def rates(param, optimizer, schedule, steps):
        used = []
        for _ in range(steps):
            used.append(optimizer.param_groups[0]["lr"])
            param.grad = torch.ones_like(param)
            optimizer.step()
            schedule.step()
        return used

    param, optimizer, scheduler = build()
    used = rates(param, optimizer, scheduler, 2)
    # the state a checkpoint holds, halfway through the warmup
    saved = copy.deepcopy((optimizer.state_dict(), scheduler.state_dict()))
    used += rates(param, optimizer, scheduler, warmup_steps + 1)
    warmup = ([init_lr] * warmup_steps if strategy == "constant"
              else [init_lr + (lr - init_lr) * step / warmup_steps for step in range(warmup_steps)])
    # a half cosine over the 6 steps after the warmup
    cosine = [lr * (1 + math.cos(math.pi * step / (total - warmup_steps))) / 2 for step in range(3)]
    assert used == pytest.approx(warmup + cosine, rel=1e-6)

    param, optimizer, scheduler = build()
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    assert rates(param, optimizer, scheduler, warmup_steps + 1) == pytest.approx(used[2:], rel=1e-6)


# -- what the config refuses -----------------------------------------------------------------------------------
def tiny_optimizer(name: str, **overrides) -> dict:
    return tiny_config("/tmp", **{"optimizer.name": name, "optimizer.params.lr": LEARNING_RATES[name],
                                  **overrides})


@pytest.mark.parametrize("overrides", [{"optimizer.fused_backward": True}, {"weights_dtype": "bf16"}],
                         ids=["fused", "bf16"])
def test_whole_model_optimizers_refuse_one_optimizer_per_parameter(overrides):
    with pytest.raises(cfg.ConfigError) as error:
        cfg.from_dict(tiny_optimizer("prodigy", **overrides))
    message = str(error.value)
    assert "\n" not in message and message.startswith("config key 'optimizer.name': Prodigy estimates one step "
                                                      "size from all parameters together")
    # An adapter's frozen base in bf16 keeps one optimizer for the adapter.
    config = cfg.from_dict(tiny_optimizer("prodigy", weights_dtype="bf16", **{"network.type": "lora"}))
    assert config.optimizer.name == "prodigy"


@pytest.mark.parametrize("name, overrides, key", [
    ("adamw_schedulefree", {"optimizer.lr_scheduler.name": "cosine"}, "optimizer.lr_scheduler.name"),
    ("adamw_schedulefree", {"optimizer.lr_scheduler.warmup.strategy": "constant"}, "optimizer.lr_scheduler.warmup"),
    ("adafactor", {"optimizer.params.relative_step": True}, "optimizer.lr_scheduler.warmup.enabled"),
    ("adafactor", {"optimizer.params.relative_step": True, "optimizer.lr_scheduler.warmup.enabled": False,
                   "optimizer.lr_scheduler.name": "linear"}, "optimizer.lr_scheduler.name"),
    ("adafactor", {"optimizer.params.warmup_init": True}, "optimizer.params.warmup_init"),
    ("adamw", {"optimizer.params.relative_step": True}, "optimizer.params.relative_step"),
    ("prodigy", {"network.text_encoder_lr": 0.5}, "network.text_encoder_lr"),
])
def test_settings_an_optimizer_cannot_follow_are_refused_in_one_line(name, overrides, key):
    with pytest.raises(cfg.ConfigError) as error:
        cfg.from_dict(tiny_optimizer(name, **overrides))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"config key '{key}': "), message


def test_prodigy_warns_of_a_learning_rate_far_below_its_usual_one():
    with pytest.warns(cfg.ConfigWarning, match=r"'optimizer.params.lr' is 0.001: Prodigy multiplies"):
        config = cfg.from_dict(tiny_optimizer("prodigy", **{"optimizer.params.lr": 1e-3}))
    assert config.optimizer.params.lr == 1e-3  # warned about, not changed


# -- each optimizer trains the tiny demo ---------------------------------------------------------------------------
def train(output_dir, name: str, steps: int, built=None, **overrides):
    """A run of the tiny demo on one instance image per step; returns its folder, its losses and its
    optimizer, which it also appends to `built` as soon as there is one."""
    import engine.train

    built, build = [] if built is None else built, engine.train.build_optimizer

    def build_and_keep(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    values = tiny_config(output_dir, **{
        "prior_preservation.enabled": False,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}],
        "batch_size": 1, "trainer.max_steps": steps, "sampling.interval_steps": 0,
        "checkpoint.every_n_train_steps": 1000, "optimizer.lr_scheduler.warmup.enabled": False,
        "optimizer.name": name, **overrides})
    trainer = engine.train.Trainer(cfg.from_dict(values))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.train, "build_optimizer", build_and_keep)
        result = trainer.run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    metrics = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    return trainer.run_dir, [json.loads(line)["loss"] for line in metrics], built[-1]


STEPS = 6


@pytest.fixture(scope="module")
def untrained_losses(tmp_path_factory, sample_data, one_torch_thread):
    """Every run of one seed sees the same images, noise and timesteps at each step: these losses, of a run
    that changes no weight, are what each step's loss would be without training."""
    return train(tmp_path_factory.mktemp("untrained"), "adamw", STEPS, **{"optimizer.params.lr": 1e-12})[1]


@pytest.mark.parametrize("name, overrides", [
    # Prodigy's own step size d starts at 1e-6 (its d0) and grows with the distance the weights travel: at
    # lr 1.0, over far more steps than these. lr multiplies each step, so the weights travel further.
    ("prodigy", {"optimizer.params.lr": 30.0}),
    ("adafactor", {"optimizer.params.lr": 1e-3, "optimizer.fused_backward": True}),
    ("adafactor", {"optimizer.params.relative_step": True, "weights_dtype": "bf16"}),
    ("lion", {"optimizer.params.lr": 3e-4, "optimizer.fused_backward": True, "weights_dtype": "bf16"}),
    ("adamw_schedulefree", {"optimizer.params.lr": 1e-3, "optimizer.fused_backward": True,
                            "weights_dtype": "bf16"}),
    ("came", {"optimizer.params.lr": 1e-4}),
], ids=["prodigy", "adafactor-fused", "adafactor-relative-bf16", "lion-fused-bf16", "schedulefree-fused-bf16",
        "came"])
def test_each_optimizer_trains_the_tiny_demo(tmp_path, untrained_losses, name, overrides):
    _, losses, optimizer = train(tmp_path, name, STEPS, **overrides)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    if name == "prodigy":
        group = optimizer.param_groups[0]
        assert group["d"] > 10 * group["d0"]  # its own step size adapted
    # The first step sees the untrained weights; the timesteps make the losses spread far more from step to
    # step than a few steps of training lower them, so each step is compared with its untrained self.
    assert losses[0] == pytest.approx(untrained_losses[0], rel=0.02)
    trained, untrained = statistics.mean(losses[2:]), statistics.mean(untrained_losses[2:])
    assert trained < 0.95 * untrained, (losses, untrained_losses)


# -- schedule-free: evaluation weights for samples and checkpoints, exact resume -----------------------------------
SCHEDULE_FREE = {"optimizer.params.lr": 1e-3, "sampling.interval_steps": 2, "checkpoint.every_n_train_steps": 2,
                 "sampling.concepts[0].num_samples": 1}
WEIGHTS = {"fp32": {}, "fused-bf16": {"optimizer.fused_backward": True, "weights_dtype": "bf16"}}


def modes(optimizer) -> set:
    return {group["train_mode"] for each in getattr(optimizer, "optimizers", [optimizer])
            for group in each.param_groups}


@pytest.fixture(scope="module", params=list(WEIGHTS))
def schedule_free_run(request, tmp_path_factory, sample_data, one_torch_thread):
    """Four steps of schedule-free AdamW that sample and save every two, with the optimizer's mode seen
    while each round of samples renders; one optimizer, or one per parameter on bf16 weights."""
    import engine.train

    built, seen, generate = [], [], engine.train.generate_samples

    def generate_and_look(*args, **kwargs):
        seen.append(modes(built[-1]))
        return generate(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.train, "generate_samples", generate_and_look)
        run_dir, _, optimizer = train(tmp_path_factory.mktemp("schedule-free"), "adamw_schedulefree", 4, built,
                                      **SCHEDULE_FREE, **WEIGHTS[request.param])
    return run_dir, optimizer, seen, WEIGHTS[request.param]


def test_schedule_free_samples_in_evaluation_mode_and_trains_in_training_mode(schedule_free_run):
    run_dir, optimizer, seen, _ = schedule_free_run
    assert seen == [{False}, {False}]  # two rounds of samples, at steps 2 and 4, at the evaluation point
    assert len(list(run_dir.glob("samples/*/*.png"))) == 2
    assert modes(optimizer) == {True}  # where training goes on from (it refuses to step otherwise)


# In bf16 the evaluation weights are rounded, as large as the moves themselves:
# test_schedule_free_on_bf16_weights_evaluates_at_its_average_and_trains_on covers them.
@pytest.mark.parametrize("schedule_free_run", ["fp32"], indirect=True)
def test_schedule_free_checkpoints_hold_the_evaluation_weights(schedule_free_run, tiny_model):
    from diffusers import UNet2DConditionModel

    run_dir, optimizer, _, _ = schedule_free_run
    names = [name for name, _ in UNet2DConditionModel.from_pretrained(tiny_model / "unet").named_parameters()]
    saved = load_file(checkpoints.latest_checkpoint(run_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    params = optimizer.param_groups[0]["params"]
    assert len(params) == len(names)
    training_point = [p.detach().clone() for p in params]
    assert max((saved[n] - p).abs().max().item() for n, p in zip(names, training_point)) > 1e-5
    optimizer.eval()
    try:
        assert max((saved[n] - p).abs().max().item() for n, p in zip(names, params)) < 1e-6
    finally:
        optimizer.train()


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_schedule_free_trains_to_the_same_weights_with_validation_on_or_off(weights, tmp_path, sample_data):
    """Each validation round scores the evaluation weights; training goes on from exactly its own."""
    validation = {"validation.every_n_steps": 1, "validation.path": "demo:sample-data/instance",
                  "validation.prompt": "sks toy", "validation.timesteps": [500]}
    trained = {}
    for name, settings in (("off", {}), ("on", validation)):
        run_dir, _, optimizer = train(tmp_path / name, "adamw_schedulefree", 4, **{
            **SCHEDULE_FREE, **settings, "sampling.interval_steps": 0, "weights_dtype": weights})
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert sum("val_loss" in record for record in metrics) == (4 if settings else 0)
        trained[name] = [p.detach().clone() for p in getattr(optimizer, "params", optimizer.param_groups[0]["params"])]
    assert trained["on"][0].dtype == (torch.bfloat16 if weights == "bf16" else torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(trained["off"], trained["on"]))


def test_schedule_free_resumes_exactly(schedule_free_run, tmp_path):
    from engine.train import Trainer

    straight, _, _, weights = schedule_free_run
    halfway, _, _ = train(tmp_path, "adamw_schedulefree", 2, **SCHEDULE_FREE, **weights)
    resumed = Trainer.for_resume(str(halfway), overrides=["trainer.max_steps=4"]).run()
    assert isinstance(resumed, events.Finished) and resumed.step == 4

    def final_unet(run_dir):
        newest = checkpoints.latest_checkpoint(run_dir)
        assert newest.name == "step-00000004"
        return load_file(newest / "unet" / "diffusion_pytorch_model.safetensors")

    expected, actual = final_unet(straight), final_unet(halfway)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


@pytest.mark.parametrize("key, path", [("optimizer.name", "os.system"), ("optimizer.name", "torch.nn.Linear"),
                                       ("optimizer.lr_scheduler.name", "subprocess.Popen")])
def test_a_class_path_that_is_no_optimizer_or_schedule_is_refused_before_it_is_called(key, path, monkeypatch):
    called = []
    monkeypatch.setattr("os.system", lambda *args, **kwargs: called.append(args))
    monkeypatch.setattr("subprocess.Popen", lambda *args, **kwargs: called.append(args))
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(optim.UserError, match=rf"^config key '{key}': {path} is not a torch\.optim\."):
        if key == "optimizer.name":
            optim.build_optimizer(cfg.Optimizer(name=path), params, 1e-3)
        else:
            optimizer = torch.optim.SGD(params, lr=1e-3)
            optim.build_scheduler(cfg.Optimizer(lr_scheduler=cfg.LrScheduler(name=path)), optimizer, 10)
    assert called == []
