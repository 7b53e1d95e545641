"""Helpers for the offline task YAMLs beside this file (lmms-eval loads it by file path).

`data/` beside this file holds (or links to) the local copies; `python -m pipeline.eval.lmms
eval --data-root DIR` makes that link in its own copy of this folder.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data"
_gqa = {}  # "images": the images parquet as a Dataset, "row": imageId -> row


def gqa_doc_to_visual(doc):
    """GQA's questions name an imageId; the images are a second local parquet (id, image),
    indexed once on first use (the built-in task joins them in from the hub)."""
    if not _gqa:
        from datasets import load_dataset

        images = load_dataset(
            "parquet", data_files=str(DATA / "gqa" / "testdev_balanced_images.parquet"), split="train"
        )
        _gqa["images"] = images
        _gqa["row"] = {image_id: i for i, image_id in enumerate(images["id"])}
    return [_gqa["images"][_gqa["row"][doc["imageId"]]]["image"].convert("RGB")]
