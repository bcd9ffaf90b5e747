"""The Train tab's form: the sample prompt table, the user's own presets and config files, and the note on the
demo model's samples. Handlers are called without a browser; one browser check saves a preset on the page."""
from pathlib import Path

import gradio as gr
import pytest

from engine import config as schema
from scal_gui import configs, fields, page, presets, tab_train
from scal_gui.actions import Actions
from scal_gui.jobs import JobManager
from scal_gui.testing import CHROMIUM

KEYS = [f.key for f in fields.ALL]
TABLE = KEYS.index("sampling.concepts")
FIRST_PROMPT = KEYS.index("sampling.concepts[0].prompt")

TWO_PROMPTS = [
    {"prompt": "sks toy on a beach", "negative_prompt": "blurry", "steps": 12, "cfg_scale": 5.5, "num_samples": 3,
     "seed": 42, "width": 64, "height": 128},
    {"prompt": "sks toy, watercolor", "negative_prompt": "text, watermark", "steps": 6, "cfg_scale": 2.0,
     "num_samples": 2, "seed": 7, "width": 128, "height": 64},
]
# The same two prompts as table rows, as the page sends them: numbers in number cells, optional numbers as text
# (no control image: the column an edit model reads).
TWO_ROWS = [["sks toy on a beach", "blurry", 12, 5.5, 3, "42", "64", "128", ""],
            ["sks toy, watercolor", "text, watermark", 6, 2.0, 2, "7", "128", "64", ""]]


def tiny():
    return presets.load_preset(next(p for p in presets.list_presets() if p.name == "tiny-demo-cpu"))


def form_with(raw: dict, **changes) -> list:
    values = fields.form_values(raw, fields.ALL)
    for key, value in changes.items():
        values[KEYS.index(key)] = value
    return values


@pytest.fixture
def user_presets(tmp_path, monkeypatch):
    folder = tmp_path / "user-presets"
    monkeypatch.setattr(presets, "USER_PRESETS_DIR", folder)
    return folder


# -- sample prompts -----------------------------------------------------------------------------------------
def test_two_sample_prompts_with_every_column_round_trip_through_the_form():
    raw = tiny()
    values = form_with(raw, **{"sampling.concepts": TWO_ROWS, "sampling.concepts[0].prompt": TWO_ROWS[0][0]})
    merged, message = configs.merge_form(configs.to_yaml(raw), values)
    assert message == "The config is valid.", message
    written = configs.parse_yaml(merged)
    assert written["sampling"]["concepts"] == TWO_PROMPTS
    assert written["sampling"]["interval_steps"] == raw["sampling"]["interval_steps"]
    sampled = schema.from_dict(written).sampling.concepts
    assert [(s.prompt, s.steps, s.cfg_scale, s.seed, s.width) for s in sampled] == [
        ("sks toy on a beach", 12, 5.5, 42, 64), ("sks toy, watercolor", 6, 2.0, 7, 128)]
    back, _ = configs.form_from_yaml(merged)
    assert back == values
    assert back[FIRST_PROMPT] == "sks toy on a beach"


def test_the_table_shows_what_the_yaml_says():
    text = configs.to_yaml({**tiny(), "sampling": {"concepts": TWO_PROMPTS}})
    values, message = configs.form_from_yaml(text)
    assert values[TABLE] == TWO_ROWS and values[FIRST_PROMPT] == TWO_PROMPTS[0]["prompt"]


def test_blank_cells_take_the_defaults_and_a_blank_row_is_no_prompt():
    raw = {"model": "m"}
    rows = [["a dog", "", "", "", "", "", "", ""], [None, None, None, None, None, None, None, None],
            ["a cat", "", 20, float("nan"), None, "", "", ""]]
    written = fields.apply_form(raw, fields.SAMPLES, [rows])
    assert written["sampling"]["concepts"] == [{"prompt": "a dog"}, {"prompt": "a cat", "steps": 20}]


def test_an_untouched_table_adds_no_sample_prompt():
    # An absent list shows one row of defaults; left alone, it writes nothing.
    assert fields.apply_form({}, fields.ALL, fields.form_values({}, fields.ALL)) == {}


def test_an_invalid_cell_is_refused_naming_its_key():
    raw = tiny()
    rows = [list(row) for row in TWO_ROWS]
    rows[1][2] = 0  # steps
    merged, message = configs.merge_form(configs.to_yaml(raw), form_with(raw, **{"sampling.concepts": rows}))
    assert message.startswith("Error: config key 'sampling.concepts[1].steps'"), message
    assert Actions(JobManager()).start_training(merged).startswith("Not started: config key 'sampling.concepts[1].steps'")

    rows[1][2] = "many"
    merged, message = configs.merge_form(configs.to_yaml(raw), form_with(raw, **{"sampling.concepts": rows}))
    assert merged is None and message.startswith("Error: config key 'sampling.concepts[1].steps': expected a number")


def test_the_sample_prompt_box_and_the_tables_first_row_stay_one_value():
    assert tab_train.first_prompt_to_table("new", TWO_ROWS)[0][0] == "new"
    assert tab_train.first_prompt_to_table("new", TWO_ROWS)[1] == TWO_ROWS[1]
    assert tab_train.first_prompt_to_table("first", [[]]) == [["first", "", 28, 7.5, 1, "", "", "", ""]]
    assert tab_train.table_to_first_prompt([["", "", "", "", "", "", "", ""], *TWO_ROWS]) == TWO_ROWS[0][0]

    # Whichever of the two the user edited is written, the other (not yet redrawn) does not undo it.
    raw = {**tiny(), "sampling": {"concepts": TWO_PROMPTS}}
    values = fields.form_values(raw, fields.ALL)
    values[FIRST_PROMPT] = "from the box"
    assert configs.parse_yaml(configs.merge_form(configs.to_yaml(raw), values)[0])[
        "sampling"]["concepts"][0]["prompt"] == "from the box"
    values = fields.form_values(raw, fields.ALL)
    values[TABLE] = [["from the table", *TWO_ROWS[0][1:]], TWO_ROWS[1]]
    assert configs.parse_yaml(configs.merge_form(configs.to_yaml(raw), values)[0])[
        "sampling"]["concepts"][0]["prompt"] == "from the table"


def test_a_new_preset_keeps_sample_prompts_the_user_changed():
    before = next(p for p in presets.list_presets() if p.name == "tiny-demo-cpu")
    after = next(p for p in presets.list_presets() if p.name == "dreambooth-10gb")
    values = fields.form_values(presets.load_preset(before), fields.ALL)
    values[TABLE] = TWO_ROWS
    values[FIRST_PROMPT] = TWO_ROWS[0][0]
    raw = tab_train.preset_config(after, before, values, None)
    assert raw["sampling"]["concepts"] == TWO_PROMPTS
    # Left as the old preset had them (the page sends 4.0 for 4), the new preset's prompts come in.
    values = fields.form_values(presets.load_preset(before), fields.ALL)
    values[TABLE] = [[cell if not isinstance(cell, int) else float(cell) for cell in row] for row in values[TABLE]]
    raw = tab_train.preset_config(after, before, values, None)
    assert raw["sampling"] == presets.load_preset(after)["sampling"]


# -- the user's presets and config files --------------------------------------------------------------------
def test_the_form_saved_as_a_preset_is_offered_as_the_users(user_presets):
    raw = tiny()
    values = form_with(raw, batch_size=3, **{"sampling.concepts": TWO_ROWS})
    message, dropdown, previous, description = tab_train.save_preset(" my toy ", configs.to_yaml(raw), *values)
    assert message.startswith("Saved the preset **my toy**"), message
    saved = configs.parse_yaml((user_presets / "my toy.yaml").read_text())
    assert saved["batch_size"] == 3 and saved["sampling"]["concepts"] == TWO_PROMPTS
    assert ("my toy (yours)", "my toy") in dropdown["choices"] and dropdown["value"] == "my toy"
    assert previous == "my toy" and description
    (mine,) = [p for p in presets.all_presets() if p.user]
    assert mine.name == "my toy" and mine.label == "my toy (yours)"
    # Picking it loads it like a shipped preset.
    shipped = next(p for p in presets.list_presets() if p.name == "tiny-demo-cpu")
    picked = tab_train.preset_config(mine, shipped, fields.form_values(raw, fields.ALL), None)
    assert picked["batch_size"] == 3 and picked["sampling"]["concepts"] == TWO_PROMPTS


@pytest.mark.parametrize("name", ["", "  ", "../escape", "a/b", "a\\b", ".hidden", "tiny-demo-cpu"])
def test_a_preset_name_is_a_name(user_presets, name):
    raw = tiny()
    message, *rest = tab_train.save_preset(name, configs.to_yaml(raw), *fields.form_values(raw, fields.ALL))
    assert message.startswith("Not saved: ") and "\n" not in message
    assert rest == [gr.skip()] * 3
    assert not user_presets.exists() or not any(user_presets.iterdir())
    assert not (user_presets.parent / "escape.yaml").exists()


def test_an_invalid_form_is_not_saved(user_presets):
    raw = tiny()
    message, *_ = tab_train.save_preset("bad", configs.to_yaml(raw), *form_with(raw, batch_size=0))
    assert message.startswith("Not saved: config key 'batch_size'") and not (user_presets / "bad.yaml").exists()


def test_a_config_file_loads_into_the_form(tmp_path):
    text = "# my run\n" + configs.to_yaml({**tiny(), "batch_size": 5, "sampling": {"concepts": TWO_PROMPTS}})
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    message, yaml_text, check, *values = tab_train.load_config_file(str(path))
    assert message == "Loaded `mine.yaml`." and yaml_text == text and check == "The config is valid."
    assert values[KEYS.index("batch_size")] == 5 and values[TABLE] == TWO_ROWS


def test_a_config_naming_a_folder_missing_here_still_saves_and_loads(tmp_path, user_presets):
    # A preset or a file from another machine: the check line names the path, the form takes the config.
    raw = {**tiny(), "model": str(tmp_path / "absent" / "model.safetensors")}
    message, *_ = tab_train.save_preset("elsewhere", configs.to_yaml(raw), *fields.form_values(raw, fields.ALL))
    assert message.startswith("Saved the preset"), message
    message, _, check, *values = tab_train.load_config_file(str(user_presets / "elsewhere.yaml"))
    assert message == "Loaded `elsewhere.yaml`." and values[KEYS.index("model")] == raw["model"]
    assert check.startswith("Error:") and "absent" in check


@pytest.mark.parametrize("text, error", [
    ("model: [unclosed\n", "YAML syntax error at line 2"),
    ("batch_size: many\n", "batch_size"),
    ("sampling:\n  concepts:\n    - {prompt: a, steps: 0}\n", "config key 'sampling.concepts[0].steps'"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_an_invalid_config_file_changes_nothing(tmp_path, text, error):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    message, *rest = tab_train.load_config_file(str(path))
    assert message.startswith("Not loaded: bad.yaml: ") and error in message and "\n" not in message, message
    assert rest == [gr.skip()] * (2 + len(fields.ALL))


# -- the note on the demo model's samples -------------------------------------------------------------------
def test_the_demo_models_samples_are_explained_and_no_other_models():
    assert "samples stay noise" in tab_train.sample_note("demo:tiny-sd")
    assert "falling loss" in tab_train.sample_note("demo:tiny-sd")
    assert tab_train.sample_note("/models/v1-5-pruned.safetensors") == ""
    assert tab_train.sample_note("runwayml/stable-diffusion-v1-5") == ""


def find(blocks, elem_id):
    return next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)


@pytest.mark.parametrize("gpu, shown", [(False, True), (True, False)])
def test_the_page_opens_with_the_note_only_for_a_demo_model(monkeypatch, user_presets, gpu, shown):
    # Without a GPU the page opens on tiny-demo-cpu (demo:tiny-sd), with one on a real model's preset.
    monkeypatch.setattr(presets, "has_cuda_gpu", lambda: gpu)
    note = find(page.build_page(JobManager()), "sample-note")
    assert note.visible is shown and ("samples stay noise" in note.value) is shown


# -- in a browser --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")
def test_a_preset_saved_on_the_page_joins_the_dropdown(tmp_path):
    from playwright.sync_api import expect

    from scal_gui.testing import app_server, chromium, open_tab

    config_home = tmp_path / "config"
    with app_server("--output-dir", str(tmp_path / "out"), env={"XDG_CONFIG_HOME": str(config_home),
                                                                 "CUDA_VISIBLE_DEVICES": ""}) as url:
        with chromium() as browser:
            tab = open_tab(browser, url, "Train", {"width": 1280, "height": 1000})
            expect(tab.locator("#sample-note")).to_contain_text("samples stay noise")
            tab.locator("#own-presets").get_by_text("Save the form as a preset").click()
            tab.locator("#preset-name textarea, #preset-name input").first.fill("page preset")
            tab.locator("#save-preset").click()
            expect(tab.locator("#preset-message")).to_contain_text("Saved the preset page preset")
            tab.locator("#preset input").click()
            expect(tab.get_by_role("option", name="page preset (yours)")).to_be_visible()
    assert (config_home / "scal-sdt" / "presets" / "page preset.yaml").is_file()
