"""WD14-style taggers (SmilingWolf's layout): `model.onnx` run by onnxruntime and `selected_tags.csv`.

The graph takes a batch of square images NHWC, BGR, 0-255 floats, at the side its input shape states (448 for
the v2 and v3 taggers), and gives one sigmoid probability per row of selected_tags.csv. As in SmilingWolf's
own tagger app: the image is composited on white, padded to a square with white, resized bicubic; category 9
rows are ratings (never written), 4 characters, 0 general tags. A caption is the characters at or above the
character threshold, then the general tags at or above the general threshold, each by falling probability,
underscores turned to spaces (except in kaomoji such as `^_^`), joined by ", ".
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
GENERAL, CHARACTER = 0, 4
# Tags whose underscores are part of the face they draw (SmilingWolf's wd-tagger app keeps them).
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
           "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}


def is_tagger(folder: Path) -> bool:
    return (folder / MODEL_FILE).is_file() and (folder / TAGS_FILE).is_file()


def read_tags(folder: Path) -> tuple[list[str], np.ndarray]:
    """(tag names as written in captions, their categories) in the order of the model's outputs."""
    with open(folder / TAGS_FILE, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    names = [row["name"] if row["name"] in KAOMOJI else row["name"].replace("_", " ") for row in rows]
    return names, np.array([int(row["category"]) for row in rows])


def preprocess(image, side: int) -> np.ndarray:
    """One image as the tagger's input row: (side, side, 3) float32, BGR, 0-255."""
    from PIL import Image

    rgba = image.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    width, height = flat.size
    square = Image.new("RGB", (max(width, height),) * 2, (255, 255, 255))
    square.paste(flat.convert("RGB"), ((square.width - width) // 2, (square.height - height) // 2))
    if square.width != side:
        square = square.resize((side, side), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


class Tagger:
    kind = "wd14"

    def __init__(self, folder: Path, general_threshold: float, character_threshold: float, use_gpu: bool):
        import onnxruntime

        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider",) if use_gpu and p in available] + ["CPUExecutionProvider"]
        self.session = onnxruntime.InferenceSession(str(folder / MODEL_FILE), providers=providers)
        model_input = self.session.get_inputs()[0]
        self.input_name, self.side = model_input.name, int(model_input.shape[1])
        self.names, self.categories = read_tags(folder)
        self.thresholds = {GENERAL: general_threshold, CHARACTER: character_threshold}

    def probabilities(self, images: list) -> np.ndarray:
        batch = np.stack([preprocess(image, self.side) for image in images])
        return self.session.run(None, {self.input_name: batch})[0]

    def caption(self, images: list) -> list[str]:
        captions = []
        for row in self.probabilities(images):
            tags = []
            for category in (CHARACTER, GENERAL):
                chosen = np.flatnonzero((self.categories == category) & (row >= self.thresholds[category]))
                tags += [self.names[i] for i in chosen[np.argsort(-row[chosen], kind="stable")]]
            captions.append(", ".join(tags))
        return captions
