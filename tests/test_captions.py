"""Captions edited in place (scal_gui.captions): each image's caption as the trainer reads it, one caption
saved, a trigger word added or replaced, find and replace, tag counts; refusals that write nothing, nothing
written outside the dataset folder; and the Dataset tab's Captions handlers as the page wires them."""
import os
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from engine.errors import UserError
from scal_gui import captions


def dataset(folder: Path, **captioned) -> Path:
    """8 x 8 PNGs named by the keys (`__` for a dot in the stem), each with its caption unless it is None."""
    folder.mkdir(parents=True)
    for stem, text in captioned.items():
        stem = stem.replace("__", ".")
        Image.new("RGB", (8, 8), (len(stem) * 20 % 256, 90, 160)).save(folder / f"{stem}.png")
        if text is not None:
            (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    return folder


def snapshot(root: Path) -> dict:
    """Every file under root with its bytes (links as their targets)."""
    return {str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


def texts(folder: Path) -> dict:
    return {entry.image: entry.caption for entry in captions.entries(folder)}


def test_entries_are_the_images_with_the_captions_the_trainer_reads(tmp_path):
    from engine.data.index import scan_folder
    from engine.data.records import TXT_PROMPT

    folder = dataset(tmp_path / "set", a="a cat, sitting", b=None, c="old", d="  spaced \n")
    (folder / "c.TXT").write_text("the other case")   # of two captions of a stem, the trainer reads c.txt
    (folder / "e.txt").write_bytes("pré".encode("utf-16"))   # with a byte-order mark, as Notepad writes
    Image.new("RGB", (8, 8)).save(folder / "e.JPG")
    Image.new("L", (8, 8)).save(folder / "a.mask.png")
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "notes.md").write_text("not a caption")

    found = captions.entries(folder)
    assert [(e.image, e.caption, e.caption_file) for e in found] == [
        ("a.png", "a cat, sitting", "a.txt"), ("b.png", "", "b.txt"), ("c.png", "old", "c.txt"),
        ("d.png", "spaced", "d.txt"), ("e.JPG", "pré", "e.txt")]
    with pytest.warns(UserWarning, match="no caption file b.txt"):
        scanned = scan_folder(str(folder), TXT_PROMPT, processes=1).records
    scanned = {Path(r.path).name: r.caption for r in scanned}
    assert scanned == texts(folder)


def test_a_caption_is_saved_beside_its_image_and_nothing_else_is_written(tmp_path):
    folder = dataset(tmp_path / "data" / "set", a="old", b=None)
    outside = dataset(tmp_path / "data" / "other", a="theirs")
    (tmp_path / "victim.txt").write_text("keep me")
    os.symlink(tmp_path / "victim.txt", folder / "b.txt")   # a caption that links out of the folder
    before = snapshot(tmp_path)

    saved = captions.save_caption(folder, "a.png", "  a red toy, studio light \n")
    assert saved == captions.Entry("a.png", "a red toy, studio light", "a.txt")
    assert (folder / "a.txt").read_bytes() == b"a red toy, studio light\n"
    captions.save_caption(folder, "b.png", "a blue toy")
    assert not (folder / "b.txt").is_symlink() and (folder / "b.txt").read_text() == "a blue toy\n"
    changed = {name for name, data in snapshot(tmp_path).items() if before.get(name) != data}
    assert changed == {"data/set/a.txt", "data/set/b.txt"} and snapshot(tmp_path).keys() == before.keys()
    assert (tmp_path / "victim.txt").read_text() == "keep me" and texts(outside) == {"a.png": "theirs"}


REFUSED = [("../other/a.png", "'../other/a.png': refused: a '..' component"),
           (None, "refused: an absolute path"),
           ("sub/a.png", "'sub/a.png': refused: a folder in its name"),
           ("a\\b.png", "refused: a folder in its name"),
           ("nope.png", "'nope.png': not an image of the dataset 'set'"),
           ("a.txt", "'a.txt': not an image"),
           ("a.mask.png", "'a.mask.png': not an image"),
           ("", "choose an image first")]


@pytest.mark.parametrize("image, message", REFUSED, ids=[f"{i + 1}of{len(REFUSED)}" for i in range(len(REFUSED))])
def test_each_of_8_images_outside_the_dataset_or_not_in_it_is_refused_in_one_line(image, message, tmp_path):
    folder = dataset(tmp_path / "set", a="old")
    dataset(tmp_path / "other", a="theirs")
    Image.new("L", (8, 8)).save(folder / "a.mask.png")
    image = str(tmp_path / "other" / "a.png") if image is None else image
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as refused:
        captions.save_caption(folder, image, "written anyway")
    assert message in str(refused.value)
    assert "\n" not in str(refused.value) and snapshot(tmp_path) == before


def test_a_missing_dataset_folder_is_refused(tmp_path):
    with pytest.raises(UserError, match="dataset folder .*gone.* does not exist"):
        captions.add_trigger(tmp_path / "gone", "sks")
    assert os.listdir(tmp_path) == []


def test_the_trigger_word_goes_first_once_as_a_whole_word(tmp_path):
    folder = dataset(tmp_path / "set", a="a cat", b=None, c="dog, sks", d="sksdog, red", e="a sks toy", f="task")
    assert captions.add_trigger(folder, " sks ") == 4
    assert texts(folder) == {"a.png": "sks, a cat", "b.png": "sks", "c.png": "dog, sks", "d.png": "sks, sksdog, red",
                             "e.png": "a sks toy", "f.png": "sks, task"}
    assert captions.add_trigger(folder, "sks") == 0
    assert not [name for name in os.listdir(folder) if name.startswith(".")]   # no staging file left
    Image.new("RGB", (8, 8)).save(folder / "a.jpg")   # a second image of the stem a: one caption file, counted once
    assert captions.add_trigger(folder, "toy") == 5 and (folder / "a.txt").read_text() == "toy, sks, a cat\n"


def test_a_trigger_word_is_replaced_only_where_it_is_a_whole_word_or_tag(tmp_path):
    folder = dataset(tmp_path / "set", a="sks, dog", b="sksdog, sks", c="a sks_toy, sks.", d="task, asks", e=None)
    assert captions.replace_trigger(folder, "sks", "ohwx") == 3
    assert texts(folder) == {"a.png": "ohwx, dog", "b.png": "sksdog, ohwx", "c.png": "a sks_toy, ohwx.",
                             "d.png": "task, asks", "e.png": ""}
    assert not (folder / "e.txt").exists()
    # the new word is written as typed, never read as a pattern
    assert captions.replace_trigger(folder, "ohwx", r"\1 x") == 3 and texts(folder)["a.png"] == r"\1 x, dog"


BAD_WORDS = [("", "trigger word: type a word first"), ("   ", "trigger word: type a word first"),
             ("a, b", "trigger word 'a, b': refused: a comma"), ("a\nb", "trigger word 'a\\nb': refused")]


@pytest.mark.parametrize("word, message", BAD_WORDS, ids=[f"{i + 1}of{len(BAD_WORDS)}" for i in range(len(BAD_WORDS))])
def test_each_of_4_bad_trigger_words_is_refused_and_writes_nothing(word, message, tmp_path):
    folder = dataset(tmp_path / "set", a="a cat", b=None)
    before = snapshot(tmp_path)
    for edit in (lambda: captions.add_trigger(folder, word), lambda: captions.replace_trigger(folder, "cat", word)):
        with pytest.raises(UserError) as refused:
            edit()
        assert message.split(": ")[-1] in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(UserError, match="trigger word 'a, b'"):
        captions.add_trigger(folder, "a, b")
    assert snapshot(tmp_path) == before


def test_find_and_replace_is_literal_and_counts_the_captions_it_changed(tmp_path):
    folder = dataset(tmp_path / "set", a="red hair, bored", b="a.b", c="axb", d=None)
    assert captions.find_replace(folder, "red", "blue") == 1
    assert texts(folder)["a.png"] == "blue hair, boblue"
    assert captions.find_replace(folder, "a.b", r"\g<0>") == 1
    assert texts(folder) == {"a.png": "blue hair, boblue", "b.png": r"\g<0>", "c.png": "axb", "d.png": ""}
    assert captions.find_replace(folder, ", boblue", "") == 1 and texts(folder)["a.png"] == "blue hair"
    assert captions.find_replace(folder, "nowhere", "x") == 0
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="^find: type the text to find first$"):
        captions.find_replace(folder, "", "x")
    assert snapshot(tmp_path) == before


def test_tags_are_counted_most_common_first(tmp_path):
    folder = dataset(tmp_path / "set", a="sks, dog, red", b=" dog ,red,, ", c="red", d=None, e="blue sky")
    assert captions.tag_counts(folder) == [("red", 3), ("dog", 2), ("blue sky", 1), ("sks", 1)]


# -- the section's handlers, found through the page's own wiring -------------------------------------------
def wired(page: gr.Blocks, elem_id: str, event: str):
    """(handler, its inputs, its outputs) of the page's first listener of event on the element elem_id."""
    (block,) = [b for b in page.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    for dependency in page.fns.values():
        if (block._id, event) in dependency.targets:
            return dependency.fn, dependency.inputs, dependency.outputs
    raise AssertionError(f"nothing listens to {event} of #{elem_id}")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from scal_gui.page import build_page

    data = tmp_path_factory.mktemp("data")
    return build_page(data_dir=str(data)), data


def named_outputs(outputs, values):
    return {o.elem_id: v for o, v in zip(outputs, values) if getattr(o, "elem_id", None)}


def test_the_buttons_of_the_captions_section_return_the_section_updated(page, monkeypatch):
    from scal_gui import caption_section

    page, data = page
    folder = dataset(data / "pets", a="a cat", b=None, c="sks, dog")

    show, inputs, outputs = wired(page, "dataset-choice", "input")
    shown = named_outputs(outputs, show("pets"))
    assert shown["caption-message"] == "pets: 3 images, 2 captioned."
    assert [label for _, label in shown["caption-gallery"]["value"]] == ["a.png: a cat", "b.png (no caption)",
                                                                       "c.png: sks, dog"]
    assert all(Path(thumb).is_file() for thumb, _ in shown["caption-gallery"]["value"])
    assert shown["tag-counts"] == [["a cat", 1], ["dog", 1], ["sks", 1]]
    entries, selected = [value for o, value in zip(outputs, show("pets")) if isinstance(o, gr.State)]
    assert entries == [["a.png", "a cat"], ["b.png", ""], ["c.png", "sks, dog"]] and selected is None

    paged, _, outputs = wired(page, "caption-page", "submit")
    monkeypatch.setattr(caption_section, "PAGE_SIZE", 2)
    second = named_outputs(outputs, paged("pets", 5))   # past the last page: the last
    assert second["caption-message"] == "pets: 3 images, 2 captioned, page 2 of 2."
    assert [label for _, label in second["caption-gallery"]["value"]] == ["c.png: sks, dog"]
    assert (second["caption-page"]["value"], second["caption-page"]["visible"]) == (2, True)
    monkeypatch.undo()

    choose, _, _ = wired(page, "caption-gallery", "select")
    selected, caption = choose(entries, gr.SelectData(None, {"index": 1, "value": None, "selected": True}))
    assert selected == "b.png" and caption["value"] == "" and caption["label"] == "Caption of b.png"

    save, inputs, outputs = wired(page, "caption-save", "click")
    saved = named_outputs(outputs, save("pets", 1, "b.png", "a dog, sks"))
    assert saved["caption-message"] == "Saved the caption of b.png in b.txt."
    assert (folder / "b.txt").read_text() == "a dog, sks\n" and saved["caption-text"]["value"] == "a dog, sks"
    assert saved["caption-gallery"]["selected_index"] == 1

    add, _, outputs = wired(page, "trigger-add", "click")
    added = named_outputs(outputs, add("pets", 1, "b.png", "sks"))
    assert added["caption-message"] == "Added 'sks' to 1 caption." and (folder / "a.txt").read_text() == "sks, a cat\n"
    assert added["tag-counts"][0] == ["sks", 3]

    replace, _, outputs = wired(page, "trigger-replace", "click")
    replaced = named_outputs(outputs, replace("pets", 1, "b.png", "sks", "ohwx"))
    assert replaced["caption-message"] == "Replaced 'sks' with 'ohwx' in 3 captions."
    assert replaced["caption-text"]["value"] == "a dog, ohwx"   # the selected caption, as it now is

    find, _, outputs = wired(page, "replace-all", "click")
    found = named_outputs(outputs, find("pets", 1, None, "dog", "puppy"))
    assert found["caption-message"] == "Replaced 'dog' with 'puppy' in 2 captions."
    assert texts(folder) == {"a.png": "ohwx, a cat", "b.png": "a puppy, ohwx", "c.png": "ohwx, puppy"}

    refused = named_outputs(outputs, find("pets", 1, None, "", "x"))
    assert refused["caption-message"] == "Error: find: type the text to find first"
    assert all(isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1
               for k, v in refused.items() if k != "caption-message")   # nothing else changes
    refused = named_outputs(outputs, find(None, 1, None, "a", "b"))
    assert refused["caption-message"] == "Error: choose a dataset first"
    _, _, outputs = wired(page, "caption-save", "click")
    refused = named_outputs(outputs, save("pets", 1, "../x.png", "y"))
    assert refused["caption-message"].startswith("Error: image '../x.png': refused")


def test_a_caption_that_cannot_be_read_whole_is_refused_by_name_and_nothing_is_written(tmp_path):
    folder = dataset(tmp_path / "set", a="a cat", b=None, c=None)
    (folder / "b.txt").mkdir()
    (folder / "c.txt").write_text("x" * (64 * 2**10 + 1))   # longer than the trainer reads
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="^caption 'b.txt': cannot be read: "):
        captions.add_trigger(folder, "sks")
    (folder / "b.txt").rmdir()
    with pytest.raises(UserError, match="^caption 'c.txt' is longer than the trainer reads"):
        captions.find_replace(folder, "x", "y")
    assert snapshot(tmp_path) == before


def test_an_image_that_cannot_be_read_is_shown_grey_with_why(tmp_path):
    from scal_gui import caption_section

    folder = dataset(tmp_path / "set", a="a cat")
    (folder / "z.png").write_bytes(b"not a png")
    message, gallery, *_ = caption_section.show(tmp_path, "set")
    (_, good), (grey, bad) = gallery["value"]
    assert message == "set: 2 images, 1 captioned." and good == "a.png: a cat"
    assert bad == "z.png cannot be read (UnidentifiedImageError): no caption" and grey.getpixel((0, 0)) == (128,) * 3
