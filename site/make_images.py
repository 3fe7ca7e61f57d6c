"""Regenerate the figures of the documentation site from a real run: the LLaMA copy task of
``examples/transformer_copy_task.py`` (6 blocks, 44 weight matrices, a snapshot every epoch),
then the images the callback wrote to TensorBoard at its last snapshot, read back from the event
file, as ``docs/images/*.png``.

    python docs/make_images.py          # ~1-3 minutes on 2 CPU cores
"""

from __future__ import annotations

import io
import os
import runpy
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "images")
#: TensorBoard image tag -> file written under docs/images (the ESD figure: the first one logged).
FIGURES = {"ww/plots/alpha_heatmap": "alpha_heatmap.png", "ww/plots/alpha_per_layer": "alpha_per_layer.png",
           "ww/plots/phases": "phase_map.png"}


def main() -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    example = runpy.run_path(os.path.join(ROOT, "examples", "transformer_copy_task.py"))
    with tempfile.TemporaryDirectory() as tmp:
        out = example["main"](["--logdir", tmp, "--every-snapshot"])
        acc = EventAccumulator(out["log_dir"], size_guidance={IMAGES: 0})
        acc.Reload()
        tags = acc.Tags()[IMAGES]
        esd = sorted(t for t in tags if t.startswith("ww/plots/esd/"))
        wanted = dict(FIGURES)
        if esd:
            wanted[esd[0]] = "esd_layer.png"
        os.makedirs(OUT, exist_ok=True)
        for tag, name in wanted.items():
            if tag not in tags:
                sys.exit(f"the run wrote no {tag!r} image (tags: {tags})")
            last = acc.Images(tag)[-1]
            with open(os.path.join(OUT, name), "wb") as f:
                f.write(io.BytesIO(last.encoded_image_string).getvalue())
            print(f"{name}: {tag} at step {last.step} ({last.width}x{last.height})")


if __name__ == "__main__":
    main()
