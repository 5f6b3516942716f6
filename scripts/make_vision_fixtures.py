"""Dev-only: reference pixel values for the Qwen2-VL image path (trainer/src/vision), from LLaMA-Factory's
image regularization and transformers' Qwen2VLImageProcessor (the Pillow one, `use_fast=False`).

    python scripts/make_vision_fixtures.py /path/to/llamafactory-data   # writes tests/fixtures/vision/

Cases: the mllm_demo JPEGs under small pixel budgets (so each array stays small: the regularization
shrinks them with Pillow's bicubic, the processor's smart_resize then resizes again), a synthetic PNG
below 28 pixels a side, and Pillow's bicubic resize of one JPEG to a few sizes (up and down). Arrays are
stored as base64 little-endian float32 / uint8.
"""
import base64
import io
import json
import os
import sys

import numpy as np
from PIL import Image
from llamafactory.data.mm_plugin import get_mm_plugin
from transformers import Qwen2VLImageProcessor

DATA = sys.argv[1]
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "vision")
os.makedirs(OUT, exist_ok=True)

b64 = lambda a: base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()  # noqa: E731

# A synthetic PNG: 20×45 RGB pixels, a gradient (opaque: Pillow resizes RGBA images premultiplied,
# which the regularization here does not reproduce; see trainer/src/vision/decode.rs).
y, x = np.mgrid[0:20, 0:45]
rgb = np.stack([x * 5, y * 12, (x * y) % 256], -1).astype(np.uint8)
Image.fromarray(rgb).save(os.path.join(OUT, "small.png"))

processor = Qwen2VLImageProcessor()  # the class defaults: min 56·56, max 28·28·1280 pixels
with open(os.path.join(OUT, "preprocessor_config.json"), "w") as fh:
    json.dump(processor.to_dict(), fh, indent=1)
plugin = get_mm_plugin(name="qwen2_vl", image_token="<|image_pad|>", video_token="<|video_pad|>")

cases = []
sources = [(f"mllm_demo_data/{i}.jpg", os.path.join(DATA, "mllm_demo_data", f"{i}.jpg")) for i in (1, 2, 3)]
sources.append(("small.png", os.path.join(OUT, "small.png")))
for name, path in sources:
    for max_pixels, min_pixels in [(48 * 48, 32 * 32), (24 * 24, 20 * 20), (96 * 96, 32 * 32), (768 * 768, 32 * 32)]:
        img = plugin._regularize_images([path], image_max_pixels=max_pixels, image_min_pixels=min_pixels)["images"][0]
        out = processor(images=[img], return_tensors="np")
        pv, grid = out["pixel_values"].astype(np.float32), out["image_grid_thw"][0].tolist()
        case = {"image": name, "image_max_pixels": max_pixels, "image_min_pixels": min_pixels,
                "regularized": list(img.size), "grid": grid, "tokens": int(np.prod(grid)) // 4,
                "shape": list(pv.shape),
                # per patch: sum and sum of squares (float64), to keep the fixture small
                "patch_sums": pv.astype(np.float64).sum(1).tolist(),
                "patch_sq_sums": (pv.astype(np.float64) ** 2).sum(1).tolist()}
        if max_pixels == 48 * 48 and name in ("mllm_demo_data/1.jpg", "small.png"):
            case["pixel_values"] = b64(pv)  # every value, for the patch order
        cases.append(case)

resizes = []
src = Image.open(sources[0][1]).convert("RGB")
for w, h in [(150, 84), (77, 40), (320, 180), (300, 90), (13, 168)]:
    resizes.append({"size": [w, h], "pixels": b64(np.asarray(src.resize((w, h), Image.BICUBIC)))})

with open(os.path.join(OUT, "qwen2_vl.json"), "w") as fh:
    json.dump({"cases": cases, "resize_source": sources[0][0], "resizes": resizes}, fh)
print(len(cases), "cases", [c["grid"] for c in cases])

# LLaVA-1.5: LLaMA-Factory's base regularization (`image_max_pixels` / `image_min_pixels` only) and
# transformers' Pillow CLIPImageProcessor as llava-1.5-7b-hf configures it (shortest side 336, 336×336 center
# crop), written to clip.json: per 14×14 patch (row-major, each channel-first) sums and sums of squares.
try:
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor
clip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
llava = get_mm_plugin(name="llava", image_token="<image>")
clip_cases = []
for name, path in sources:
    for max_pixels, min_pixels in [(768 * 768, 32 * 32), (64 * 64, 16 * 16)]:
        img = llava._regularize_images([path], image_max_pixels=max_pixels, image_min_pixels=min_pixels)["images"][0]
        pv = clip(images=[img], return_tensors="np")["pixel_values"][0].astype(np.float64)  # (3, 336, 336)
        patches = pv.reshape(3, 24, 14, 24, 14).transpose(1, 3, 0, 2, 4).reshape(576, -1)
        clip_cases.append({"image": name, "image_max_pixels": max_pixels, "image_min_pixels": min_pixels,
                           "regularized": list(img.size), "patch_sums": patches.sum(1).tolist(),
                           "patch_sq_sums": (patches ** 2).sum(1).tolist()})
with open(os.path.join(OUT, "clip.json"), "w") as fh:
    json.dump({"cases": clip_cases}, fh)
print(len(clip_cases), "clip cases")
