"""The app's Network section (network.* fields on the Train tab) and the Convert tab's adapter outputs."""
import re
from pathlib import Path

import pytest
import torch

from engine import config as schema
from engine.run_dir import RunDir
from scal_gui import configs, convert_options, fields, presets, widgets
from scal_gui.actions import Actions
from scal_gui.jobs import JobManager
from test_adapter_convert import file_tensors, train_adapter_run

# as the page sends them: an optional number is a text box, empty for None
NETWORK_VALUES = {"network.type": "lokr", "network.rank": 8, "network.alpha": 4.0, "network.conv_rank": 2,
                  "network.conv_alpha": 1.5, "network.dropout": 0.1, "network.modulation": True,
                  "network.text_encoder_lr": "5e-05",
                  "network.init_from": "/adapters/start.safetensors"}


def tiny_preset() -> dict:
    return presets.load_preset(next(p for p in presets.list_presets() if p.name == "tiny-demo-cpu"))


def test_the_network_fields_are_the_schemas_keys():
    keys = [f.key for f in fields.NETWORK]
    assert keys == list(NETWORK_VALUES)
    assert set(keys) <= set(schema.iter_keys()) and set(keys) <= {f.key for f in fields.ALL}
    by_key = {f.key: f for f in fields.NETWORK}
    assert by_key["network.type"].choices == ("full", "lora", "dora", "loha", "lokr")
    assert by_key["network.text_encoder_lr"].optional and by_key["network.text_encoder_lr"].kind == "float"
    assert by_key["network.rank"].kind == "int" and by_key["network.alpha"].kind == "float"


def test_the_form_writes_the_network_into_the_yaml_and_reads_it_back():
    raw = tiny_preset()
    assert "network" not in raw
    values = fields.form_values(raw, fields.ALL)
    index = {f.key: i for i, f in enumerate(fields.ALL)}
    assert values[index["network.type"]] == "full" and values[index["network.text_encoder_lr"]] == ""
    for key, value in NETWORK_VALUES.items():
        values[index[key]] = value
    merged, message = configs.merge_form(configs.to_yaml(raw), values)
    assert message == "The config is valid.", message
    written = configs.parse_yaml(merged)
    assert written["network"] == {key.removeprefix("network."): value for key, value in
                                  {**NETWORK_VALUES, "network.text_encoder_lr": 5e-5}.items()}
    assert written["sampling"] == raw["sampling"]  # keys the form does not show are kept
    network = schema.from_dict(written).network
    assert (network.type, network.rank, network.alpha, network.conv_rank, network.conv_alpha,
            network.text_encoder_lr) == ("lokr", 8, 4.0, 2, 1.5, 5e-5)
    back, _ = configs.form_from_yaml(merged)
    assert back == values

    # Back to the defaults: the YAML says so (the keys stay, with the default values).
    values[index["network.type"]] = "full"
    values[index["network.modulation"]] = False  # a full fine-tune refuses it
    values[index["network.text_encoder_lr"]] = ""
    again = configs.parse_yaml(configs.merge_form(merged, values)[0])
    assert again["network"]["type"] == "full" and again["network"]["text_encoder_lr"] is None


def test_a_bad_network_value_is_named():
    values = fields.form_values({}, fields.ALL)
    values[[f.key for f in fields.ALL].index("network.rank")] = 2.5
    merged, message = configs.merge_form("model: m\n", values)
    assert merged is None and "network.rank" in message
    values, message = configs.form_from_yaml("network: {type: lora, rank: 0}\n")
    assert values is not None and "network.rank" in message  # shown, and the check names the key


def test_a_preset_fills_the_network_section(tmp_path):
    (tmp_path / "lora-demo.yaml").write_text(
        "description: a LoRA run\nmodel: demo:tiny-sd\n"
        "network: {type: dora, rank: 32, alpha: 16, conv_rank: 4, conv_alpha: 2, text_encoder_lr: 1e-5}\n")
    (preset,) = presets.list_presets(tmp_path)
    raw = presets.load_preset(preset)
    # what the Train tab's preset menu fills the form with
    shown = dict(zip([f.key for f in fields.ALL], fields.form_values(raw, fields.ALL)))
    assert [shown[k] for k in ("network.type", "network.rank", "network.alpha", "network.conv_rank",
                               "network.conv_alpha", "network.text_encoder_lr")] == ["dora", 32, 16.0, 4, 2.0, "1e-05"]
    assert fields.apply_form(raw, fields.ALL, list(shown.values())) == raw  # untouched, the preset is unchanged


def test_the_train_tab_has_a_network_section():
    from scal_gui.page import build_page

    page = build_page()
    (section,) = [b for b in page.blocks.values() if getattr(b, "elem_id", None) == "network-section"]

    def inside(block):
        for child in getattr(block, "children", []):
            yield child
            yield from inside(child)

    ids = {getattr(b, "elem_id", None) for b in inside(section)}
    assert {widgets.elem_id(f.key) for f in fields.NETWORK} <= ids
    dropdown = next(b for b in inside(section) if b.elem_id == widgets.elem_id("network.type"))
    assert [value for _, value in dropdown.choices] == ["full", "lora", "dora", "loha", "lokr"]


# -- the Convert tab on an adapter run -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, class_images):
    return train_adapter_run(tmp_path_factory.mktemp("gui-lora"), "lora")


def convert_through_the_page(actions, source, out, **changes):
    """The Convert action with the tab's defaults and the given options changed, as the button sends them."""
    defaults = convert_options.defaults()
    values = [value for value, _ in defaults.values()]
    for name, value in changes.items():
        values[convert_options.ORDER.index(name)] = value
    message = actions.convert(str(source), str(out), convert_options.to_kwargs(values))
    match = re.match(r"Wrote `(.+)` \(", message)
    return (Path(match.group(1)) if match else None), message


def test_the_convert_tab_offers_every_adapter_output():
    default, choices = convert_options.defaults()["adapter_output"]
    assert default == "kohya" and [value for _, value in choices] == ["kohya", "merged", "diffusers"]
    assert convert_options.ORDER[-1] == "adapter_output"
    values = [value for value, _ in convert_options.defaults().values()]
    assert convert_options.to_kwargs(values[:-1] + ["merged"])["adapter_output"] == "merged"
    assert convert_options.to_kwargs(values[:-1] + [None])["adapter_output"] == "kohya"  # an API call without it


def test_the_convert_action_writes_each_kind_of_adapter_file(lora_run, tiny_model, tmp_path):
    actions = Actions(JobManager())
    folder = RunDir(lora_run).converted  # where the tab puts a checkpoint's files
    written = {}
    for kind in ("kohya", "merged", "diffusers"):
        written[kind], message = convert_through_the_page(actions, lora_run, folder, adapter_output=kind)
        assert written[kind] is not None and written[kind].is_file(), message
    # three files side by side, none in place of another
    assert len(set(written.values())) == 3 and all(folder in path.parents for path in written.values())

    kohya, kohya_meta = file_tensors(written["kohya"])
    assert {k.split("_")[1] for k in kohya} == {"unet", "te"} and kohya_meta["ss_network_module"] == "networks.lora"
    lora, lora_meta = file_tensors(written["diffusers"])
    assert written["diffusers"].name == "pytorch_lora_weights.safetensors"
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder"} and "lora_adapter_metadata" in lora_meta
    # the same adapter weights in either layout
    down = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    assert torch.equal(kohya[down], lora["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"])

    # The merged file is the base model plus the adapter: the adapted weights moved, the VAE did not.
    base, message = convert_through_the_page(actions, tiny_model, tmp_path / "base.safetensors")
    assert base is not None, message
    merged, _ = file_tensors(written["merged"])
    original, _ = file_tensors(base)
    assert merged.keys() == original.keys()
    moved = [k for k in merged if (merged[k] - original[k]).abs().max().item() > 1e-3]
    assert any(k.startswith("model.diffusion_model.") for k in moved)
    assert any(k.startswith("cond_stage_model.") for k in moved)
    assert not any(k.startswith("first_stage_model.") for k in moved)

    # the page's choice reaches the converter: the same file again is refused, and so is a merge of a model
    # folder (no adapter), naming the option
    again = actions.convert(str(lora_run), str(folder), convert_options.to_kwargs(
        [v for v, _ in convert_options.defaults().values()]))
    assert again.startswith("Error:") and "already exists" in again
    _, refused = convert_through_the_page(actions, tiny_model, tmp_path / "x.safetensors", adapter_output="merged")
    assert refused.startswith("Error: --merge:") and not (tmp_path / "x.safetensors").exists()
