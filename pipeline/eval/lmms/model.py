"""The lmms-eval model `atp_llava`: an exported ATP-LLaVA checkpoint, pruning for real.

    lmms-eval --model atp_llava --model_args pretrained=runs/default/export,pruning=atp \\
        --tasks pope_local --batch_size 8 --output_path out/
    (or `python -m pipeline.eval.lmms eval ...`, which also checks the results)

model_args:
- `pretrained`: an export dir (`python -m pipeline stage export`), loaded with
  `AutoModelForImageTextToText.from_pretrained(dir, trust_remote_code=True)` and
  `AutoProcessor.from_pretrained(dir)`.
- `pruning`: a key of `PRUNING_MODES` (default: the checkpoint's own config.pruning):
  `atp` (the learned thresholds), `none` (every visual token, the unpruned baseline),
  `fixed` (keep `fixed_counts` tokens per ATP layer ranked by S_redundant, paper Table 2's
  pre-defined schedule; `fixed_counts=126/88/20`), or a training-free baseline of
  model/baselines.py (fastv, prumerge, prumerge+, sparsevlm, visionzip, uniform, random;
  `share=0.25` sets its budget N_bar = share x Lv, default the checkpoint's target_tokens;
  `policy_<option>=v` goes to the policy). This is the extension point: a further mode is
  one more `@pruning_mode("name")` function setting the loaded model up; one that needs more
  subclasses `AtpLlavaLmms` and overrides `load_model`.
- `device` (default cuda if present, else cpu), `dtype` (auto | float32 | bfloat16 | float16),
  `batch_size` (lmms-eval's `--batch_size` lands here too), `stats_path` (where the token
  statistics go; the wrapper puts them beside lmms-eval's results).

Both request types go through `pipeline.eval.answers` (the eval stage's code): the task's context
becomes LLaVA-1.5's vicuna_v1 prompt `USER: <image>\\n{context} ASSISTANT:` (what the model was
trained on), images are padded to a square (LLaVA-1.5's protocol), `generate_until` decodes
greedily (temperature and sampling options are ignored, as in LLaVA's evaluation) and cuts
at the task's `until` strings; `loglikelihood` scores ` {choice}` after that prompt with the
pruning decided by the prompt alone, and returns the negative log-likelihood (lmms-eval's
multiple-choice scoring takes the argmin; see `_loglikelihood_output`).

Token statistics: the prefill's `visual_tokens` [batch, num_layers] (visual tokens each
decoder layer attended over, METHOD sec 7) are averaged per task over the image requests;
N_bar is their mean over layers. A multiple-choice question counts once per choice (each is
one forward with the same pruning).

One process: rank 0 of 1 (launching under accelerate with several processes would evaluate
everything on each).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from tqdm import tqdm

from model.baselines import make_policy
from pipeline.eval import answers
from pipeline.eval.methods import POLICIES

# ------------------------------------------------------------------ pruning modes

PRUNING_MODES: dict[str, Callable] = {}


def pruning_mode(*names: str):
    """Register `fn(model, name, options: dict)`: sets the loaded model (eval mode) up for
    pruning mode `name`; it pops the model_args it uses from `options` (the rest are errors)."""

    def register(fn):
        for name in names:
            PRUNING_MODES[name] = fn
        return fn

    return register


@pruning_mode("atp", "none")
def _config_mode(model, name, options):
    model.config.pruning = name


@pruning_mode("fixed")
def _fixed(model, name, options):
    counts = options.pop("fixed_counts", None)
    if counts is not None:  # "126/88/20": commas separate model_args
        model.config.fixed_counts = [int(c) for c in str(counts).replace(";", "/").split("/")]
    model.config.pruning = "fixed"


@pruning_mode(*POLICIES)
def _policy(model, name, options):
    """A training-free baseline of model/baselines.py on the hard path, at N_bar = share x Lv
    (default: the checkpoint's target_tokens, i.e. ATP's budget); `policy_<opt>=v` model_args
    go to the policy (e.g. policy_k=2 for fastv)."""
    cfg = model.config
    share = float(options.pop("share", cfg.target_tokens / cfg.num_visual_tokens))
    extra = {k[len("policy_") :]: options.pop(k) for k in list(options) if k.startswith("policy_")}
    model.pruning_policy = make_policy(name, cfg, share, **extra)


# ------------------------------------------------------------------ lmms-eval 0.7.3 workaround


def _loglikelihood_needs_wrapping() -> bool:
    """lmms-eval 0.7.3's evaluator passes every model output through
    `unwrap_generation_output`, which stringifies anything that is not a str, a
    GenerationResult, a (str, meta) pair or a list of str: a loglikelihood's
    `(logprob, is_greedy)` tuple comes back as the string "(-1.0, True)" and the
    multiple-choice metrics then fail on it. True when the installed version does that."""
    probe = (-1.0, True)
    return unwrap_generation_output(probe)[0] != probe


LOGLIKELIHOOD_WRAP = _loglikelihood_needs_wrapping()


def _loglikelihood_output(pair: tuple[float, bool]):
    """What `loglikelihood` returns for one request: (negative log-likelihood, is_greedy).

    The sign: lmms-eval 0.7's multiple_choice scoring picks `np.argmin` of the returned
    values (its LLaVA models return a loss, whatever the base class's docstring says), so
    the plugin returns -sum log P(continuation | prompt); argmin is then the most likely
    choice, as `pipeline.eval.answers.choice_loglikelihoods`' argmax.

    The workaround: the pair goes back inside a GenerationResult; unwrap_generation_output
    returns `GenerationResult.text` untouched (it checks only the wrapper's type), so the
    evaluator stores the original tuple in `req.resps`. A plain tuple where lmms-eval no
    longer stringifies it."""
    ll, greedy = pair
    out = (-float(ll), bool(greedy))
    return GenerationResult(text=out) if LOGLIKELIHOOD_WRAP else out


# ------------------------------------------------------------------ the model


def _pick_image(visuals, context: str):
    """The image for a request: None (text-only), the only one, or the middle one of several
    (video frames: LLaVA-1.5 answers SEED-Bench's video questions from the middle frame)."""
    from PIL import Image

    flat, stack = [], [visuals]
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(reversed(v))
        elif v is not None:
            flat.append(v)
    if not flat:
        return None
    bad = [type(v).__name__ for v in flat if not isinstance(v, Image.Image)]
    if bad:
        raise ValueError(f"atp_llava takes images only, got {bad} for {context[:60]!r}")
    return flat[len(flat) // 2]


class AtpLlavaLmms(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        pruning: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 8,
        stats_path: str | None = None,
        max_new_tokens: int = 128,
        **kwargs,
    ):
        super().__init__()
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.pop("max_batch_size", None)
        self.pretrained = str(pretrained)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
        self.max_new_tokens = int(max_new_tokens)
        self.stats_path = stats_path
        self.model, self.processor = self.load_model(self.pretrained, pruning, dtype, kwargs)
        if kwargs:
            raise ValueError(f"atp_llava: unknown model_args {sorted(kwargs)}")
        self.config = cfg = self.model.config  # kept: clean() drops the model
        policy = getattr(self.model, "pruning_policy", None)
        self.pruning = policy.name if policy is not None else cfg.pruning
        self.policy = policy.describe() if policy is not None else None
        self.stats: dict[str, answers.TokenStats] = defaultdict(answers.TokenStats)
        self.requests_seen: dict[str, int] = defaultdict(int)
        eval_logger.info(
            f"atp_llava: {self.pretrained} pruning={self.pruning} atp_layers={cfg.atp_layers} "
            f"Lv={cfg.num_visual_tokens} on {self._device}"
        )

    def load_model(self, pretrained: str, pruning: str | None, dtype: str, options: dict):
        """(model in eval mode, processor) with the pruning mode applied. Subclass this for a
        baseline that needs more than `PRUNING_MODES` can set up."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=True)
        if not hasattr(config, "validate_atp"):
            raise ValueError(f"{pretrained} is not an ATP-LLaVA export (model_type {config.model_type!r})")
        if pruning is not None and pruning not in PRUNING_MODES:
            raise ValueError(f"pruning={pruning!r}: expected one of {sorted(PRUNING_MODES)}")
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model = AutoModelForImageTextToText.from_pretrained(
            pretrained, config=config, trust_remote_code=True, dtype=torch_dtype
        )
        model = model.to(self._device).eval()  # eval(): hard pruning (METHOD sec 5)
        if pruning is not None:
            PRUNING_MODES[pruning](model, pruning, options)
        model.config.validate_atp()
        return model, AutoProcessor.from_pretrained(pretrained)

    @property
    def device(self):
        return self._device

    # -- requests -> prompts -------------------------------------------------------
    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _prompt_image(self, context: str, doc_to_visual, task, split, doc_id):
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
        image = _pick_image(visuals, context)
        return answers.prompt_for(context, image=image is not None), image

    def _chunks(self, indices: list[int]):
        step = self.batch_size * 4  # progress granularity; answers.* batch inside
        for s in range(0, len(indices), step):
            yield indices[s : s + step]

    # -- lmms API -----------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        groups = defaultdict(list)  # (task, generation options) -> request indices
        for i, req in enumerate(requests):
            gen_kwargs = dict(req.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            groups[(req.args[4], max_new, tuple(until))].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="atp_llava generate", disable=self.rank != 0)
        for (task, max_new, until), indices in groups.items():
            self.requests_seen[task] += len(indices)
            for chunk in self._chunks(indices):
                prompts, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task_, split = requests[i].args
                    prompt, image = self._prompt_image(context, doc_to_visual, task_, split, doc_id)
                    prompts.append(prompt)
                    images.append(image)
                texts = answers.greedy_answers(
                    self.model,
                    self.processor,
                    prompts,
                    images,
                    max_new_tokens=max_new,
                    batch_size=self.batch_size,
                    stats=self.stats[task],
                )
                for i, text in zip(chunk, texts):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out

    def loglikelihood(self, requests):
        groups = defaultdict(list)
        for i, req in enumerate(requests):
            groups[req.args[4]].append(i)
        out = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="atp_llava loglikelihood", disable=self.rank != 0)
        for task, indices in groups.items():
            self.requests_seen[task] += len(indices)
            for chunk in self._chunks(indices):
                prompts, images, conts = [], [], []
                for i in chunk:
                    context, continuation, doc_to_visual, doc_id, task_, split = requests[i].args
                    if callable(continuation):  # output_type: loglikelihood gives doc_to_target
                        continuation = continuation(self._doc(task_, split, doc_id))
                    prompt, image = self._prompt_image(context, doc_to_visual, task_, split, doc_id)
                    prompts.append(prompt)
                    images.append(image)
                    conts.append(str(continuation))
                pairs = answers.choice_loglikelihoods(
                    self.model,
                    self.processor,
                    prompts,
                    images,
                    conts,
                    batch_size=self.batch_size,
                    stats=self.stats[task],
                )
                for i, pair in zip(chunk, pairs):
                    out[i] = _loglikelihood_output(pair)
                bar.update(len(chunk))
        bar.close()
        return out

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("atp_llava answers single-turn tasks (generate_until, loglikelihood)")

    # -- token statistics -----------------------------------------------------------
    def token_stats(self) -> dict:
        """Per task and over all tasks: image requests, N_bar, visual tokens per layer."""
        cfg = self.config
        tasks = {t: {**s.summary(), "requests": self.requests_seen[t]} for t, s in sorted(self.stats.items())}
        n = sum(t["image_samples"] for t in tasks.values())
        per_layer = None
        if n:
            per_layer = [
                sum(t["tokens_per_layer"][j] * t["image_samples"] for t in tasks.values() if t["image_samples"]) / n
                for j in range(cfg.text_config.num_hidden_layers)
            ]
        return dict(
            model=self.pretrained,
            pruning=self.pruning,
            policy=self.policy,
            atp_layers=list(cfg.atp_layers),
            fixed_counts=cfg.fixed_counts,
            target_tokens=cfg.target_tokens,
            num_layers=cfg.text_config.num_hidden_layers,
            num_visual_tokens=cfg.num_visual_tokens,
            overall=dict(
                image_samples=n,
                n_bar=None if per_layer is None else sum(per_layer) / len(per_layer),
                tokens_per_layer=per_layer,
            ),
            tasks=tasks,
        )

    def write_token_stats(self, path: str | os.PathLike) -> dict:
        stats = self.token_stats()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(stats, indent=2))
        tmp.replace(path)
        return stats

    def clean(self):
        # the evaluator calls clean() once every request has run, before scoring: the
        # statistics are complete here, and the model is about to be dropped
        if self.stats_path or self.stats:
            stats = self.token_stats()
            eval_logger.info(
                f"atp_llava token statistics: N_bar {stats['overall']['n_bar']} "
                f"over {stats['overall']['image_samples']} image requests"
            )
            if self.stats_path:
                self.write_token_stats(self.stats_path)
        super().clean()
