"""Where each transformer family is known by name: its own modules, the registries that recognise and build it
(family, tiny stand-ins, demo names, the estimator's architectures, the converter, the adapter files) and the
help texts that name it, and never the step loop. A new family, or a family named in a new place, changes this
list on purpose."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The names by which code and text refer to each family (matched without regard to case).
NAMES = {
    "chroma": r"chroma",
    "z-image": r"z[-_]?image",
    "qwen-image": r"qwen[-_ ]?image",
    "qwen-image-edit": r"qwen[-_ ]?image[-_ ]?edit|EditPlus",
    "flux2-klein": r"klein|flux\.?2",
}
# The files that know each family's name.
KNOWN_BY = {
    "chroma": {"engine/cli.py", "engine/models/chroma.py", "engine/models/convert.py", "engine/models/family.py",
               "engine/models/keymap_flux.py", "engine/models/kohya.py", "engine/models/single_file.py",
               "engine/models/tiny.py", "engine/paths.py", "engine/vram.py", "scal_gui/fields.py"},
    "z-image": {"engine/block_swap.py", "engine/cli.py", "engine/config.py", "engine/memory_plan.py",
                "engine/models/adapters.py", "engine/models/convert.py", "engine/models/family.py",
                "engine/models/keymap_zimage.py", "engine/models/kohya.py", "engine/models/qwen3_text.py",
                "engine/models/tiny.py",
                "engine/models/zimage.py", "engine/models/zimage_files.py", "engine/paths.py", "engine/vram.py",
                "scal_gui/fields.py", "scal_gui/page.py"},
    "qwen-image": {"engine/block_swap.py", "engine/cli.py", "engine/memory_plan.py", "engine/models/adapters.py",
                   "engine/models/convert.py",
                   "engine/models/family.py", "engine/models/kohya.py", "engine/models/qwen_image.py",
                   "engine/models/qwen_image_edit.py", "engine/models/qwen_image_files.py", "engine/models/tiny.py",
                   "engine/paths.py", "engine/vram.py", "scal_gui/fields.py"},
    "qwen-image-edit": {"engine/cli.py", "engine/models/convert.py", "engine/models/family.py",
                        "engine/models/qwen_image_edit.py",
                        "engine/models/tiny.py", "engine/paths.py", "engine/vram.py"},
    "flux2-klein": {"engine/cli.py", "engine/models/adapters.py", "engine/models/convert.py",
                    "engine/models/family.py", "engine/models/flux2_klein.py", "engine/models/flux2_klein_files.py",
                    "engine/models/keymap_flux2.py", "engine/models/kohya.py", "engine/models/qwen3_text.py",
                    "engine/models/single_file.py", "engine/models/tiny.py", "engine/paths.py", "engine/vram.py",
                    "scal_gui/fields.py"},
}
# The loop and what it calls for every family: a family reaches them only through the family interface.
STEP_LOOP = ("engine/train.py", "engine/step.py", "engine/setup.py", "engine/plan.py", "engine/objectives.py",
             "engine/validation.py", "engine/sampling.py", "engine/checkpoints.py", "engine/data/")


def files_naming(pattern: str) -> set[str]:
    found = set()
    for path in [*ROOT.glob("engine/**/*.py"), *ROOT.glob("scal_gui/**/*.py"), ROOT / "app.py"]:
        if re.search(pattern, path.read_text(encoding="utf-8"), re.IGNORECASE):
            found.add(path.relative_to(ROOT).as_posix())
    return found


@pytest.mark.parametrize("family", list(NAMES))
def test_a_family_is_known_by_its_modules_and_the_registries_only(family):
    found = files_naming(NAMES[family])
    assert found == KNOWN_BY[family], (sorted(found - KNOWN_BY[family]), sorted(KNOWN_BY[family] - found))
    assert not [path for path in found if path.startswith(STEP_LOOP)]
