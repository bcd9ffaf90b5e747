"""Captioning: each captioner kind gives what its library gives when driven by hand; skipping, overwrite,
prefix/suffix, which files are captioned, progress, stop, option ranges and the CLI."""
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

from engine import events
from engine.captioning import CaptionJob, CaptionOptions
from engine.captioning import models as caption_models
from engine.captioning import tagger
from engine.cli import main
from engine.config import ConfigError
from engine.models.tiny_captioners import make_tiny_captioner

# Three sizes, so that a batch holds images of different token counts.
SIZES = [(64, 48), (40, 72), (56, 56)]


class Captioners(dict):
    """The tiny captioners, each built on first use."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, arch):
        self[arch] = make_tiny_captioner(self.root / arch, arch)
        return self[arch]


@pytest.fixture(scope="module")
def captioners(tmp_path_factory, one_torch_thread):
    return Captioners(tmp_path_factory.mktemp("captioners"))


@pytest.fixture
def folder(tmp_path, sample_data):
    """Three images of different sizes and colours, a loss mask and a note beside them."""
    source = Image.open(sorted((sample_data / "instance").glob("*.png"))[0]).convert("RGB")
    pictures = [source, ImageOps.invert(source), Image.new("RGB", source.size, (200, 40, 20))]
    for index, (picture, size) in enumerate(zip(pictures, SIZES)):
        picture.resize(size).save(tmp_path / f"img{index}.png")
    Image.new("L", SIZES[0], 255).save(tmp_path / "img0.mask.png")
    (tmp_path / "notes.md").write_text("not an image", encoding="utf-8")
    return tmp_path


def images(folder):
    return [Image.open(folder / f"img{i}.png").convert("RGB") for i in range(len(SIZES))]


def caption_folder(model, folder, **options):
    seen = []
    result = CaptionJob(CaptionOptions(model=str(model), path=str(folder), **options), on_event=seen.append).run()
    assert isinstance(result, events.Finished), result
    return result, seen


def written(folder):
    return [(folder / f"img{i}.txt").read_text(encoding="utf-8").strip() for i in range(len(SIZES))]


def test_wd14_captions_are_the_onnx_session_tags(captioners, folder):
    import onnxruntime

    caption_folder(captioners["wd14"], folder, batch_size=3, general_threshold=0.3, character_threshold=0.6)
    session = onnxruntime.InferenceSession(str(captioners["wd14"] / "model.onnx"))
    names, categories = tagger.read_tags(captioners["wd14"])
    expected = []
    for image in images(folder):  # one at a time
        (row,) = session.run(None, {"input": tagger.preprocess(image, 448)[None]})[0]
        assert row.shape == (len(names),) and ((row >= 0) & (row <= 1)).all()
        tags = []
        for category, threshold in ((4, 0.6), (0, 0.3)):
            chosen = [i for i in np.argsort(-row, kind="stable") if categories[i] == category and row[i] >= threshold]
            tags += [names[i] for i in chosen]
        expected.append(", ".join(tags))
    assert written(folder) == expected
    assert len(set(expected)) > 1  # the images are told apart
    assert all("_" not in tag or tag == "^_^" for caption in expected for tag in caption.split(", "))


def test_tagger_input_is_bgr_on_white_square(captioners):
    red = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    row = tagger.preprocess(red, 40)
    assert row.shape == (40, 40, 3) and row.dtype == np.float32
    assert row[20, 20].tolist() == [0, 0, 255]  # BGR
    assert row[2, 20].tolist() == [255, 255, 255]  # padded with white


USER_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
CHAT_MODELS = {  # arch: (model class, processor class, the conversation, its image token and id)
    "qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", USER_TURN, "<|image_pad|>", 151655),
    "qwen3-vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", USER_TURN, "<|image_pad|>", 151655),
    "joycaption": ("LlavaForConditionalGeneration", "LlavaProcessor",
                   [{"role": "system", "content": "You are a helpful image captioner."}] + USER_TURN,
                   "<|reserved_special_token_69|>", 128077),
}


@pytest.mark.parametrize("arch", CHAT_MODELS)
def test_chat_model_captions_are_greedy_generate(captioners, folder, arch):
    import torch
    import transformers

    model_class, processor_class, turns, image_token, image_token_id = CHAT_MODELS[arch]
    model_dir = captioners[arch]
    caption_folder(model_dir, folder, batch_size=2, max_new_tokens=8, prompt="Describe it.")
    processor = caption_models.processor(model_dir, processor_class)
    model = getattr(transformers, model_class).from_pretrained(model_dir, dtype=torch.float32)
    text = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert text.count(image_token) == 1 and text.rstrip().endswith("assistant" if arch != "joycaption" else
                                                                   "assistant<|end_header_id|>")
    assert processor.tokenizer.convert_tokens_to_ids(image_token) == image_token_id
    expected = []
    for image in images(folder):  # one at a time, unpadded
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        expected.append(" ".join(answer.split()))  # a caption is one line
    assert written(folder) == expected
    assert len(set(expected)) > 1 and all(expected)


def test_florence2_captions_are_the_task_generate(captioners, folder):
    import torch
    import transformers

    model_dir = captioners["florence2"]
    caption_folder(model_dir, folder, batch_size=2, max_new_tokens=12)
    processor = caption_models.processor(model_dir, "Florence2Processor")
    model = transformers.Florence2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    expected = []
    for image in images(folder):
        inputs = processor(text="<MORE_DETAILED_CAPTION>", images=image, return_tensors="pt")
        assert (inputs["input_ids"] == 51289).sum() == 577  # the image's tokens, as Florence-2-base has them
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False, num_beams=1)
        expected.append(" ".join(processor.batch_decode(output, skip_special_tokens=True)[0].split()))
    assert written(folder) == expected
    assert len(set(expected)) > 1 and all(expected)


def test_kept_captions_prefix_suffix_and_what_is_captioned(captioners, folder):
    (folder / "img0.txt").write_text("kept caption\n", encoding="utf-8")
    (folder / "img1.txt").write_text("  \n", encoding="utf-8")  # empty: captioned
    result, seen = caption_folder(captioners["wd14"], folder, batch_size=1, prefix="ohwx", suffix="photo ")
    assert result.summary == {"captioned": 2, "kept": 1, "unreadable": 0}
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "kept caption\n"
    for text in written(folder)[1:]:
        assert text.startswith("ohwx, ") and text.endswith(", photo")
    assert sorted(p.name for p in folder.glob("*.txt")) == ["img0.txt", "img1.txt", "img2.txt"]  # no mask, no note
    assert not list(folder.glob(".*"))  # no temporary file left
    progress = [(e.done, e.total) for e in seen if isinstance(e, events.Progress)]
    assert progress == [(0, 2), (1, 2), (2, 2)]

    caption_folder(captioners["wd14"], folder, overwrite=True)
    assert written(folder)[0] != "kept caption" and not written(folder)[0].startswith("ohwx")


def test_stop_ends_after_the_current_batch(captioners, folder):
    job = CaptionJob(CaptionOptions(model=str(captioners["wd14"]), path=str(folder), batch_size=2))
    job.on_event = lambda event: job.stop() if isinstance(event, events.Progress) and event.done else None
    result = job.run()
    assert isinstance(result, events.Finished) and result.stopped and result.step == 2
    assert [(folder / f"img{i}.txt").is_file() for i in range(3)] == [True, True, False]


@pytest.mark.parametrize("option, value, words", [("batch_size", 0, "at least 1"),
                                                  ("max_new_tokens", 5000, "within [1, 4096]"),
                                                  ("general_threshold", 1.5, "within [0, 1]")])
def test_an_out_of_range_option_is_refused(option, value, words):
    with pytest.raises(ConfigError, match=rf"^config key 'caption\.{option}': must be {re.escape(words)}, got"):
        CaptionOptions(**{option: value})


def test_an_unknown_model_folder_is_refused_in_one_line(tmp_path, folder):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    result = CaptionJob(CaptionOptions(model=str(tmp_path / "other"), path=str(folder))).run()
    assert isinstance(result, events.Failed) and result.user_error
    assert result.error.startswith("caption option 'model': ") and "'bert'" in result.error
    assert "\n" not in result.error


def test_cli_writes_the_captions(captioners, folder, capsys):
    assert main(["caption", "--model", str(captioners["wd14"]), "--path", str(folder), "--prefix", "ohwx"]) == 0
    assert all(text.startswith("ohwx, ") for text in written(folder))
    assert "3 captions written" in capsys.readouterr().out
    assert main(["caption", "--model", str(captioners["wd14"]), "--path", str(folder), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: config key 'caption.batch_size': must be at least 1, got 0"


def test_the_qwen_stand_ins_tokenize_with_qwen2s_real_vocabulary(captioners):
    tokenizer = caption_models.processor(captioners["qwen2.5-vl"], "Qwen2_5_VLProcessor").tokenizer
    assert tokenizer("Hello world, a photo").input_ids == [9707, 1879, 11, 264, 6548]
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                            "<|image_pad|>", "<|file_sep|>"]) == [151643, 151644, 151645, 151652,
                                                                                  151655, 151664]
