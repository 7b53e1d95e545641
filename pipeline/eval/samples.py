"""The eval samples and their prompts: the eval split's first question of each sample, as
`Sample`s, and their model inputs prompted and tokenised as pipeline/eval/answers.py does
(shared by the evaluation, the adaptivity oracle and the export stage's budget calibration)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

from pipeline.eval.answers import encode_prompt, model_inputs, prompt_for, split_processor


@dataclass
class Sample:
    key: str
    image: object  # PIL image
    question: str
    answer: str
    qtype: str
    family: str
    scene: dict | None = None  # synthetic shards: the shapes' boxes (pipeline/eval/diagnostics.py)
    _maps: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_shapes(self) -> int | None:
        """Small shapes in the image (None without a scene)."""
        return None if self.scene is None else len(self.scene.get("small", []))

    def object_map(self, grid: int):
        """Which of a grid x grid tower's tokens cover a shape (`shards.objects`), None without a
        scene; made once per grid, then shared by every method an evaluation runs."""
        if self.scene is None:
            return None
        if grid not in self._maps:
            from shards.objects import object_map

            self._maps[grid] = object_map(self.scene, self.image.size[0], grid)
        return self._maps[grid]


def load_samples(shards: str, limit: int | None = None) -> list[Sample]:
    """The eval split's first question of each sample, in shard order."""
    import webdataset as wds
    from PIL import Image

    from pipeline.data.loader import list_shards

    out = []
    for sample in wds.DataPipeline(wds.SimpleShardList(list_shards(shards)), wds.tarfile_to_samples()):
        meta = json.loads(sample["json"])
        image_key = next(k for k in ("png", "jpg", "jpeg") if k in sample)
        conv = meta["conversations"]
        out.append(
            Sample(
                key=sample["__key__"],
                image=Image.open(io.BytesIO(sample[image_key])).convert("RGB"),
                question=conv[0]["value"].replace("<image>", "").strip(),
                answer=conv[1]["value"],
                qtype=meta["qtype"],
                family=meta["family"],
                scene=meta.get("scene"),
            )
        )
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no eval samples in {shards}")
    return out


def prompt_inputs(model, processor, samples: list[Sample]) -> dict:
    """Model inputs of the samples' questions, prompted and tokenised as pipeline/eval/answers.py does."""

    tokenizer, image_processor = split_processor(processor)
    cfg = model.config
    rows = [
        encode_prompt(
            prompt_for(s.question), tokenizer, image_token_id=cfg.image_token_id, num_image_tokens=cfg.num_visual_tokens
        )
        for s in samples
    ]
    return model_inputs(model, tokenizer, image_processor, rows, [s.image for s in samples])
