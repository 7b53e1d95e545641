"""ATP-LLaVA: transformers' LLaVA with Adaptive Token Pruning modules between decoder layers.

The vision tower, projector, Llama decoder layers, rotary embedding and LM head are the stock
transformers modules; the only forward owned here is the decoder loop that calls them and the
ATP modules (docs/METHOD.md is the contract for every formula):

- train mode (soft): the sequence keeps its length; module k multiplies a cumulative mask
  C_k [B, Lv] that enters every later layer's attention as `log C` on the visual keys, so the
  loss reaches the thresholds (sec 3-4);
- eval mode (hard): at each ATP layer the kept visual tokens are gathered, the rest leave the
  hidden states and the KV cache of every later layer; positions stay the original ones and
  decoding continues from the unpruned length (sec 5).

`model.pruning_policy` (eval only; `baselines.py`) replaces the ATP modules by a training-free
policy on the same hard path: before each of `policy.layers` (0 = before the first decoder layer)
it returns a keep mask over the original Lv positions (and optionally new features for the kept
tokens), optionally from the attention of the layer before (`policy.attention_compute`).

Both speak one interface (`pruning.py`: pruning points, a score request for the layer before
each, the masks), and what follows every pruning point is one method here (`_prune`).

This file is copied into exported checkpoints (trust_remote_code): relative imports only.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.utils import ModelOutput

from .atp_module import AtpModule, hard_keep, keep_margin
from .attention import ATTN_IMPLEMENTATION, ScoreRequest
from .budget import group_spans, keep_share_per_module, module_counts, tokens_per_layer
from .configuration_atp_llava import AtpLlavaConfig
from .kernels import KeyMask, check_requested
from .packed import DecodeCache, PackedKeys, Packing, decode_groups
from .pruning import AtpPruning, PolicyPruning, timed
from .scores import minmax, spatial_scores

# transformers 5.24 renamed `past_key_values` to `cache` (forward keyword and model outputs) and
# keeps the old name as a deprecated alias until 5.40: speak whichever name the installed
# version declares, so neither side warns or breaks. forward() takes both.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


@dataclass
class AtpLlavaOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_KW == "cache":
        cache: object | None = None
    else:
        past_key_values: object | None = None
    visual_tokens: torch.FloatTensor | None = None  # [B, num_hidden_layers]
    atp_losses: dict | None = None  # detached scalars for logging
    atp_info: dict | None = None  # thresholds [B, K, 2], keep [B, K, Lv]
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class _Seq:
    """Per-token metadata that travels with the hidden states (and is gathered with them)."""

    live: torch.Tensor  # [B, L] bool: a real token (not padding, not pruned)
    pos: torch.Tensor  # [2, B, L] rotary positions (row, column); equal for 1-D positions
    vis: torch.Tensor  # [B, L] original visual index n, -1 for text / padding
    orig: torch.Tensor  # [B, L] index in the caller's input_ids

    def take(self, idx, valid):
        def g(t):
            return t.gather(-1, idx if t.dim() == 2 else idx.expand(t.shape[0], *idx.shape))

        return _Seq(
            live=g(self.live) & valid, pos=g(self.pos), vis=torch.where(valid, g(self.vis), -1), orig=g(self.orig)
        )


@dataclass
class _Flow:
    """What the decoder loop carries from layer to layer; a pruning point changes it (`_prune`)."""

    hidden: torch.Tensor  # [B, L, D]
    seq: _Seq
    qmask: torch.Tensor  # [B, L] bool: the query tokens (METHOD sec 1)
    n_query: int  # most query tokens in a sample (read once: text is never pruned), the score requests' rows
    C: torch.Tensor  # [B, Lv] cumulative keep mask at the original visual positions
    keys: KeyMask  # what the next layers attend over
    rope: tuple  # (cos, sin) of seq.pos
    counts: list  # [B] visual tokens seen by each group of layers
    group_live: list  # each group's KV cache: its key-padding mask (padded) or its `Packing` (packed)
    keeps: list = field(default_factory=list)  # C after each pruning point
    pack: Packing | None = None  # hard_layout packed: hidden is [1, N, D], the live tokens of seq in order
    q_rows: tuple | None = None  # ([B, n_query] positions of the query tokens in seq, [B, n_query] valid):
    # found by the first score request, then moved by each gather (text is never pruned)

    def padded_hidden(self):
        """[B, L, D] hidden states in seq's layout (zeros where not live on the packed path)."""
        return self.hidden if self.pack is None else self.pack.unpack(self.hidden[0])


class AtpLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = AtpLlavaConfig

    def __init__(self, config: AtpLlavaConfig):
        config.text_config._attn_implementation = ATTN_IMPLEMENTATION
        check_requested(config.attn_kernel)  # a missing flash-attn fails here, naming the extra
        super().__init__(config)
        lv = config.num_visual_tokens
        self.atp_modules = nn.ModuleList(
            AtpModule(
                lv,
                config.threshold_hidden,
                config.threshold_features,
                config.text_config.hidden_size,
                mix=config.score_mix == "question",
            )
            for _ in config.atp_layers
        )
        self._spatial = None  # S_spatial, fixed per image size; built on first use (not a buffer:
        # a non-persistent buffer is left uninitialised when transformers loads on the meta device)
        self.pruning_policy = None  # a training-free baseline (baselines.py); eval mode only, not in config
        self.pruning_clock = None  # a pruning.PruningClock: the pruning work's wall time (benchmarks)
        self._compiled_layers = None  # the decoder layers under torch.compile (`compile_layers`), made once
        self._layer_calls = None  # what the decoder loop calls: the compiled layers, or None for the layers
        self._compiled_steps = None  # the pruning steps under torch.compile (`compile_pruning`), made once
        self._step_calls = None  # what the decoder loop calls for them: the compiled steps, or None
        self.post_init()

    # -- construction -------------------------------------------------------------
    def _init_weights(self, module):
        if isinstance(module, AtpModule):
            c = self.config
            q = keep_share_per_module(
                c.atp_layers, c.text_config.num_hidden_layers, c.num_visual_tokens, c.target_tokens
            )
            # Scores are min-max normalised to [0, 1], so theta_r = 1 - q keeps about a share q of
            # roughly uniform scores; theta_s starts just under the sparsest grid's score, keeping
            # that grid only, with its masks inside the sigmoid's slope so theta_s gets gradient.
            top = float(self._spatial_for(c).max())
            module.init_thresholds(theta_r=1.0 - q, theta_s=min(max(top - 1.0 / c.mask_temperature, 0.02), 0.98))
        else:
            super()._init_weights(module)

    @classmethod
    def from_llava(cls, llava, **atp_fields):
        """Wrap an HF LLaVA (a LlavaForConditionalGeneration or a path to one) with ATP modules."""
        if not isinstance(llava, LlavaForConditionalGeneration):
            llava = LlavaForConditionalGeneration.from_pretrained(llava)
        src = llava.config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            src.pop(key, None)
        config = AtpLlavaConfig(**{**src, **atp_fields})
        model = cls(config).to(llava.dtype)
        missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False)
        missing = [k for k in missing if not k.startswith("atp_modules.")]
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the LLaVA layout: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model

    @classmethod
    def from_parts(cls, llama_dir, clip_dir, mm_projector, tokenizer=None, **fields):
        """Build from LLaVA-1.5's original parts: a Vicuna/Llama dir, a CLIP dir, mm_projector.bin."""
        from .loading import build_from_parts

        return build_from_parts(cls, llama_dir, clip_dir, mm_projector, tokenizer=tokenizer, **fields)

    def compile_layers(self, enable: bool = True, **kwargs):
        """Run every decoder layer through `torch.compile(layer, dynamic=True, **kwargs)` (enable=False:
        eager again; the compiled ones are kept). The decoder loop, the pruning steps between the layers
        and their one host read stay eager: each layer is one graph whose token count is symbolic, so the
        kept counts of a new batch reuse it (prefill, decode and the layer before a pruning point, which
        also fills the score request, are a few graphs in all, shared by the layers). With a KV cache
        (generate) each layer is its own graph (`_compiled_loop` raises dynamo's limit to cover them)."""
        if enable and self._compiled_layers is None:
            kwargs.setdefault("dynamic", True)
            self._compiled_layers = [torch.compile(layer, **kwargs) for layer in self.model.language_model.layers]
        self._layer_calls = self._compiled_layers if enable else None
        return self

    def compile_pruning(self, enable: bool = True, **kwargs):
        """Run the hard path's ATP pruning steps through `torch.compile(step, dynamic=True, **kwargs)`
        (enable=False: eager again; the compiled ones are kept). A pruning point is two graphs split at
        its one host read, the kept lengths (`_steps`): the thresholds, masks and kept tokens before
        it, the gather and the new keys after it; the next point's score request is a third. So the
        few dozen small ops of a step become a few fused kernels: on a GPU at batch 1 a step is
        launch-bound. Graphs are per module (its index picks its weights), shared by other lengths and
        kept counts. Training-free policies (`pruning_policy`) and the soft path stay eager. With or
        without `compile_layers`."""
        if enable and self._compiled_steps is None:
            kwargs.setdefault("dynamic", True)
            steps = (self._select_and_prune, self._cut, self._request)
            self._compiled_steps = tuple(torch.compile(f, **kwargs) for f in steps)
        self._step_calls = self._compiled_steps if enable else None
        return self

    def _layers(self):
        layers = self.model.language_model.layers
        return layers if self._layer_calls is None else self._layer_calls

    def _steps(self, pruning, hard, like):
        """(point(k, flow, request), request(k, flow)): what the decoder loop calls at pruning point k
        and to build point k's score request. A point: whoever prunes selects, the loop prunes
        (`_prune`), and on the hard path cuts the kept tokens out (`_cut`) after the point's one host
        read, their lengths. Compiled (`compile_pruning`, ATP's hard path), the read splits a point into
        two graphs."""
        compiled = self._step_calls is not None and hard and isinstance(pruning, AtpPruning)
        if compiled:
            self.spatial_score(like)  # S_spatial built (once) outside the graphs: it reads its grids' sizes
        select_and_prune, cut, request = (
            self._step_calls if compiled else (self._select_and_prune, self._cut, self._request)
        )

        def point(k, flow, scores):
            kept = select_and_prune(pruning, k, flow, scores, hard)
            if kept is not None:
                lens = kept[1].tolist()
                cut(flow, *kept, lens, max(lens))  # the longest outside the graph: no guard on their order

        return point, functools.partial(request, pruning)

    def _select_and_prune(self, pruning, k, flow, request, hard):
        """What `_prune` returns: None (soft), or the tokens that stay [B, L] and their count [B]."""
        return self._prune(flow, *pruning.select(k, flow, request), hard)

    @staticmethod
    def _request(pruning, k, flow):
        return pruning.request(k, flow)

    def _compiled_loop(self):
        """Around a decoder loop with compiled layers or steps: dynamo's recompile limit raised to a few
        graphs per layer. With a KV cache each layer reads its own cache layer by its index, so each
        layer is its own graph, and a second one once its cache holds keys (decode): the default limit of
        8 graphs in all sent the later layers of a 12-layer model back to eager (docs/RESULTS.md, #20).
        A compiled pruning step is a few graphs per module (its index picks its weights)."""
        if self._layer_calls is None and self._step_calls is None:
            return contextlib.nullcontext()
        limit = max(torch._dynamo.config.recompile_limit, 8 * self.config.text_config.num_hidden_layers)
        return torch._dynamo.config.patch(recompile_limit=limit)

    @staticmethod
    def _spatial_for(c):
        """S_spatial [Lv] of this config's grid ("full" strategy: CLS is in no grid)."""
        spa = spatial_scores(c.grid_size, c.spatial_strides, c.lambda_sample)
        return torch.cat([spa.new_zeros(1), spa]) if c.num_visual_tokens != c.grid_size**2 else spa

    def spatial_score(self, like):
        if self._spatial is None or self._spatial.device != like.device:
            self._spatial = self._spatial_for(self.config).to(like.device)
        return self._spatial.to(like.dtype)

    def atp_parameters(self):
        return list(self.atp_modules.parameters())

    @property
    def pruning_active(self) -> bool:
        return self.config.pruning != "none" and len(self.config.atp_layers) > 0

    # -- inputs -> sequence metadata ----------------------------------------------
    def _embed(self, input_ids, pixel_values, inputs_embeds, vis_mask, qmask, live=None):
        """Input embeddings with the image features scattered in, the features, the most query tokens
        in a sample and (given `live`) each sample's length: one host read for the checks and those
        counts (a sync on a GPU)."""
        cfg = self.config
        embeds = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        counts = vis_mask.sum(1)
        has_img = counts > 0
        lv = cfg.num_visual_tokens
        bad = has_img & (counts != lv)
        read = torch.stack([has_img.sum(), bad.sum(), qmask.sum(1).amax()])
        n_img, n_bad, n_query, *lens = (read if live is None else torch.cat([read, live.sum(1)])).tolist()
        if n_bad:
            b = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"sample {b} holds {counts[b].item()} image tokens, but the vision tower gives "
                f"{lv} per image ({cfg.grid_size}x{cfg.grid_size} grid); expand <image> to exactly {lv} tokens"
            )
        n_pix = 0 if pixel_values is None else pixel_values.shape[0]
        if n_pix != n_img:
            raise ValueError(
                f"{n_img} sample(s) hold image tokens but {n_pix} image(s) were given in pixel_values "
                "(one image per sample with image tokens, none for text-only samples)"
            )
        image_features = None
        if n_img:
            out = self.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                return_dict=True,
            )
            image_features = torch.cat(list(out.pooler_output), dim=0).to(embeds.dtype)
            embeds = embeds.masked_scatter(vis_mask[..., None], image_features)
        return embeds, image_features, n_query, lens

    def _positions(self, pos1, vis, has_img):
        """[2, B, L] rotary positions: (p, p) for 1-D `preserve`; (start + r, start + c) for visual
        tokens under `rope2d`, text after the image continuing from start + g (METHOD sec 6)."""
        if self.config.position_mode == "preserve":
            return torch.stack([pos1, pos1])
        g, lv = self.config.grid_size, self.config.num_visual_tokens
        is_vis = vis >= 0
        start = torch.where(is_vis, pos1, pos1.new_full((), 1 << 30)).amin(1, keepdim=True)
        after = has_img[:, None] & (pos1 >= start + lv)
        text = torch.where(after, pos1 - lv + g, pos1)
        row = torch.where(is_vis, start + vis // g, text)
        col = torch.where(is_vis, start + vis % g, text)
        return torch.stack([row, col])

    def _rope(self, hidden, pos):
        rotary = self.model.language_model.rotary_emb
        cos, sin = rotary(hidden, pos[0])
        if self.config.position_mode == "rope2d":
            cos_c, sin_c = rotary(hidden, pos[1])
            # interleave the rotary pairs: even pairs turn with the row, odd pairs with the column,
            # so each axis gets the whole frequency range
            half = cos.shape[-1] // 2
            odd = (torch.arange(cos.shape[-1], device=cos.device) % half) % 2 == 1
            cos, sin = torch.where(odd, cos_c, cos), torch.where(odd, sin_c, sin)
        return cos, sin

    def _keys(self, live, key_log_mask, dtype, q_len=None):
        """The keys a group of layers sees (`kernels.KeyMask`); the kernel and what it needs are chosen there."""
        return KeyMask.build(live, key_log_mask, dtype, self.config.attn_kernel, self.training, q_len)

    def _key_log_mask(self, seq, C):
        """log C at each visual position (exact zeros -> the dtype's minimum, i.e. truly off)."""
        c = C.gather(1, seq.vis.clamp_min(0))
        logc = torch.where(c > 0, torch.log(c.clamp_min(self.config.mask_eps)), torch.finfo(c.dtype).min)
        return torch.where(seq.vis >= 0, logc, torch.zeros_like(logc))

    def _query_mask(self, seq, has_img, labels, query_mask):
        """METHOD sec 1: the instruction after the image, never the answer. Default: text after the
        image up to the first supervised (answer) token; at inference all text after the image."""
        if query_mask is not None:
            return query_mask.bool() & seq.live
        B, L = seq.live.shape
        idx = torch.arange(L, device=seq.live.device).expand(B, L)
        last_img = torch.where(seq.vis >= 0, idx, -1).amax(1, keepdim=True)
        q = seq.live & (seq.vis < 0) & (idx > last_img) & has_img[:, None]
        if labels is not None:
            first_ans = torch.where(labels != -100, idx, L).amin(1, keepdim=True)
            q = q & (idx < first_ans)
        return q

    # -- the decoder loop -----------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        query_mask=None,
        atp_masks=None,
        use_cache=None,
        logits_to_keep=0,
        past_key_values=None,  # the name before transformers 5.24 (CACHE_KW)
        **kwargs,
    ):
        cache = past_key_values if cache is None else cache
        if cache is not None and getattr(cache, "atp_state", None) is not None:
            return self._decode_step(input_ids, inputs_embeds, cache, logits_to_keep)
        if input_ids is None:
            raise ValueError("AtpLlava needs input_ids: the image token positions come from them")
        hard = not self.training
        cache = cache if hard else None
        policy = getattr(self, "pruning_policy", None) if hard else None
        if policy is not None and atp_masks is not None:
            raise ValueError("atp_masks and model.pruning_policy both choose the kept tokens: set one of them")
        packed = hard and self.config.hard_layout == "packed"
        seq, qmask, has_img = self._sequence(input_ids, attention_mask, position_ids, labels, query_mask)
        with policy.vision_tap(self) if policy is not None else contextlib.nullcontext():
            embeds, image_features, n_query, lens = self._embed(
                input_ids, pixel_values, inputs_embeds, seq.vis >= 0, qmask, seq.live if packed else None
            )
        flow = self._start(embeds, seq, qmask, has_img, n_query, lens if packed else None)
        pruning = self._pruning(policy, flow, embeds, has_img, atp_masks, hard)
        points = {} if pruning is None else {i: k for k, i in enumerate(pruning.layers)}

        point, make_request = self._steps(pruning, hard, flow.C)
        with self._compiled_loop():
            # filled by the layer before a pruning point, from its own attention (point 0: by layer 0's q/k)
            request = self._scores_before_layer0(make_request(0, flow), flow) if 0 in points else None
            for i, layer in enumerate(self._layers()):
                if i in points:
                    point(points[i], flow, request)
                request = make_request(points[i + 1], flow) if i + 1 in points else None
                flow.hidden = layer(
                    flow.hidden,
                    attention_mask=flow.keys.dense,
                    position_embeddings=flow.rope,
                    use_cache=cache is not None,
                    **{CACHE_KW: cache},
                    atp_scores=request,
                    atp_keys=flow.keys,
                )
        hidden = self.model.language_model.norm(flow.hidden)
        if flow.pack is not None:
            hidden = flow.pack.unpack(hidden[0])
        logits = self._logits(hidden, flow.seq, *input_ids.shape, hard, logits_to_keep)

        n_layers = self.config.text_config.num_hidden_layers
        prune_layers = list(points)
        visual_tokens = tokens_per_layer(flow.counts, prune_layers, n_layers)
        ntp = values = branch = None
        if labels is not None:
            ntp = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
            marginal_on, branch_on = (False, False) if hard else self._value_terms(has_img)
            if marginal_on or branch_on:
                batch = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
                batch.update(position_ids=position_ids, labels=labels, query_mask=query_mask)
                own = [c.detach() for c in flow.counts[1:]]  # [0]: before any module
                values = self._marginal_values(batch, own) if marginal_on else None
                branch = self._branch_values(batch, own) if branch_on else None
        m_sums = [] if pruning is None else pruning.m_sums
        loss, atp_losses = self._losses(
            ntp,
            visual_tokens,
            m_sums,
            has_img,
            values,
            red_sums=getattr(pruning, "red_sums", None),
            branch=branch,
            thresholds=getattr(pruning, "thresholds", None),
        )
        if cache is not None:
            seq = flow.seq
            cache.atp_state = {
                "group_of_layer": [sum(1 for i in prune_layers if i <= j) for j in range(n_layers)],
                "next_pos": torch.where(seq.live, seq.pos.amax(0), -1).amax(1) + 1,
            }
            if flow.pack is None:
                cache.atp_state["group_live"] = flow.group_live
            else:  # each group's packed segments: (cu_seqlens, host lengths)
                cache.atp_state["group_packed"] = [(p.cu, p.lens) for p in flow.group_live]
        return AtpLlavaOutput(
            loss=loss,
            logits=logits,
            visual_tokens=visual_tokens,
            atp_losses=atp_losses,
            atp_info=pruning.info(flow.keeps) if pruning is not None and flow.keeps else None,
            image_hidden_states=image_features,
            **{CACHE_KW: cache},
        )

    @torch.no_grad()
    def _scores_before_layer0(self, request, flow):
        """A pruning point before layer 0 has no layer before it: layer 0's own attention, run on
        the input embeddings with its output dropped, fills the request from its q/k (METHOD sec 10).
        Calling the modules (not their weights) keeps ZeRO-3's parameter gathering."""
        if request is not None:
            layer = self.model.language_model.layers[0]
            layer.self_attn(
                hidden_states=layer.input_layernorm(flow.hidden),
                position_embeddings=flow.rope,
                attention_mask=flow.keys.dense,
                atp_scores=request,
                atp_keys=flow.keys,
            )
        return request

    def _pruning(self, policy, flow, embeds, has_img, atp_masks, hard):
        """Who selects the kept tokens (`pruning.py`): the policy, the ATP modules, or no one."""
        if policy is not None:
            return PolicyPruning(self, policy, flow, embeds, has_img)
        return AtpPruning(self, has_img, atp_masks, hard) if self.pruning_active else None

    def _sequence(self, input_ids, attention_mask, position_ids, labels, query_mask):
        """Per-token metadata of the caller's layout (no embeddings needed): `_Seq`, the query mask, has_img [B]."""
        B, L = input_ids.shape
        vis_mask = input_ids == self.config.image_token_id
        has_img = vis_mask.any(1)
        live = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos1 = (live.long().cumsum(-1) - 1).clamp_min(0) if position_ids is None else position_ids.expand(B, L)
        vis = torch.where(vis_mask, vis_mask.long().cumsum(-1) - 1, -1)
        orig = torch.arange(L, device=input_ids.device).expand(B, L)
        seq = _Seq(live=live, pos=self._positions(pos1, vis, has_img), vis=vis, orig=orig)
        return seq, self._query_mask(seq, has_img, labels, query_mask), has_img

    def _start(self, embeds, seq, qmask, has_img, n_query, lens=None):
        """The flow entering the first decoder layer: every token, all of C, one KV group; packed
        when given each sample's length (`hard_layout: packed`)."""
        B = seq.live.shape[0]
        C = has_img[:, None].to(embeds.dtype).expand(B, self.config.num_visual_tokens).clone()
        pack = None if lens is None else Packing.build(seq.live, lens)
        flow = _Flow(
            hidden=embeds if pack is None else pack.pack(embeds)[None],
            seq=seq,
            qmask=qmask,
            n_query=max(n_query, 1),
            C=C,
            keys=None,
            rope=None,
            counts=[C.sum(-1)],
            group_live=[],
            pack=pack,
        )
        self._new_group(flow)
        return flow

    def _new_group(self, flow, rope=None):
        """Keys, rope (given: the kept tokens' own, gathered) and KV group of the layers from here on
        (hard path: after each gather)."""
        if flow.pack is None:
            flow.keys = self._keys(flow.seq.live, None, flow.hidden.dtype)
            flow.rope = self._rope(flow.hidden, flow.seq.pos) if rope is None else rope
            flow.group_live.append(flow.seq.live)
        else:
            flow.keys = PackedKeys.prefill(flow.pack, flow.hidden.dtype)
            pos = flow.seq.pos.flatten(1).index_select(1, flow.pack.index)[:, None]
            flow.rope = self._rope(flow.hidden, pos) if rope is None else rope
            flow.group_live.append(flow.pack)

    def _prune(self, flow, M, features, hard):
        """After a pruning point, whoever chose M: the cumulative mask C, merged features if any, then
        (soft) log C on the visual keys, or (hard) the tokens that stay ([B, L] bool) and their count
        [B], returned: `_cut` keeps them alone, with their rope and a new KV group."""
        flow.C = flow.C * M
        flow.keeps.append(flow.C)
        flow.counts.append(flow.C.sum(-1))
        keep = flow.C > 0.5
        if features is not None:  # merging: new features for the kept tokens (soft: for every visual token)
            at = flow.seq.vis.clamp_min(0)
            on = (flow.seq.vis >= 0) & (keep.gather(1, at) if hard else True)
            features = features.to(flow.hidden.dtype)
            if flow.pack is None:
                new = features.gather(1, at[..., None].expand(-1, -1, flow.hidden.shape[-1]))
            else:  # the packed tokens' rows of features [B * Lv, D]
                flat = at + torch.arange(at.shape[0], device=at.device)[:, None] * features.shape[1]
                new, on = features.flatten(0, 1).index_select(0, flow.pack.pack(flat))[None], flow.pack.pack(on)[None]
            flow.hidden = torch.where(on[..., None], new, flow.hidden)
        if not hard:
            flow.keys = self._keys(flow.seq.live, self._key_log_mask(flow.seq, flow.C), flow.hidden.dtype)
            return None
        seq = flow.seq
        kept = seq.live & ((seq.vis < 0) | keep.gather(1, seq.vis.clamp_min(0)))
        return kept, kept.sum(1)

    def _cut(self, flow, kept, n, lens, new_len):
        """Hard pruning: only the tokens `kept` [B, L] stay, n [B] of them per sample (lens: the same
        as host ints, the point's one read; new_len their max), with their rope, and the next layers
        are a new KV group."""
        flow.hidden, flow.seq, flow.qmask, flow.pack, take = self._gather(flow, kept, n, lens, new_len)
        self._new_group(flow, rope=tuple(take(t) for t in flow.rope))

    @staticmethod
    def _visual_slots(seq, lv):
        """[B, Lv] index of each original visual token in the current sequence (0 if it is gone), and
        [B, Lv] whether it is still there."""
        B, L = seq.live.shape
        idx = torch.arange(L, device=seq.live.device).expand(B, L)
        slot = torch.where(seq.vis >= 0, seq.vis, lv)  # text and padding go to a spare slot lv
        vis_index = torch.zeros(B, lv + 1, dtype=torch.long, device=idx.device).scatter_(1, slot, idx)[:, :lv]
        present = torch.zeros(B, lv + 1, dtype=torch.bool, device=idx.device).scatter_(1, slot, seq.live)
        return vis_index, present[:, :lv]

    @timed
    def _score_request(self, flow, compute=None):
        seq, C, qmask = flow.seq, flow.C.detach(), flow.qmask
        vis_index, present = self._visual_slots(seq, C.shape[1])
        on = seq.live & (seq.vis >= 0)
        if flow.q_rows is None:  # the query rows first; their count was read once (`_embed`)
            order = torch.sort((~qmask).to(torch.int8), dim=1, stable=True).indices[:, : flow.n_query]
            flow.q_rows = order, qmask.gather(1, order)
        return ScoreRequest(
            vis_index=vis_index,
            vis_weight=C * present,
            seq_weight=torch.where(on, C.gather(1, seq.vis.clamp_min(0)), 0.0),
            q_index=flow.q_rows[0],
            q_valid=flow.q_rows[1],
            compute=compute,
            clock=self.pruning_clock,
        )

    @timed
    def _atp_step(self, k, scores, C, has_img, override, hard, query=None):
        """Masks of module k at the original Lv positions, its thresholds [B, 2] and, on the hard ATP
        path, whether each token is above each threshold ([B, Lv, 2] bool, redundancy and spatial; the
        keep mask is their `or`), on the soft path with `marginal_share: redundancy` the two branches'
        soft masks ([B, Lv, 2]), else None.
        query: [B, D] the question's pooled hidden state (`threshold_features: [query]`)."""
        cfg = self.config
        live = C > 0.5  # C is 0 for text-only samples (`_start`)
        s_self, s_cross = scores
        if cfg.score_norm == "minmax":  # both scores in one pass: a pruning step's launches add up
            s_self, s_cross = minmax(torch.stack([s_self, s_cross]), live)
        share = self.atp_modules[k].cross_share(query) if cfg.score_mix == "question" else None
        s_mix = (
            (s_self + s_cross) / 2 if share is None else s_self + share[:, None].to(s_self.dtype) * (s_cross - s_self)
        )
        s_red = torch.where(live, s_mix, 0.0)
        s_spa = torch.where(live, self.spatial_score(s_red), 0.0)
        if cfg.spatial_modules is not None and k not in cfg.spatial_modules:  # no grid keeps here (sec 2)
            s_spa = torch.zeros_like(s_spa)
        theta_r, theta_s = self.atp_modules[k](s_red, s_spa, query=query)
        theta = torch.stack([theta_r, theta_s], -1)
        if override is not None:
            return override.to(C.dtype) * live, theta, None
        if cfg.pruning == "fixed":
            by = getattr(self, "_sample_rank", None)
            if by == "spatial":  # sec 18's passes: the spatial branch's grids first (coarsest first), S_red within one
                key = s_spa + 1e-3 * s_red
            elif by == "own":  # sec 16's marginal_rank own: the model's own keep rule
                key = keep_margin(s_red, s_spa, theta_r[:, None], theta_s[:, None])
            else:
                key = s_red
            rank = torch.where(live, key, -3.0).argsort(-1, descending=True).argsort(-1)
            own = getattr(self, "_sample_counts", None)  # [K] of [B]: the marginal passes' own budgets
            count = cfg.fixed_counts[k] if own is None else own[k].reshape(-1, 1)
            return ((rank < count) & live).to(C.dtype), theta, None
        if hard:  # METHOD sec 5's rule (atp_module.hard_keep); the branches for the diagnostics
            red, spa = hard_keep(s_red, s_spa, theta_r[:, None], theta_s[:, None], live)
            return (red | spa).to(C.dtype), theta, torch.stack([red, spa], -1)
        T = cfg.mask_temperature
        m_r = torch.sigmoid((s_red - theta_r[:, None].to(s_red.dtype)) * T)
        # a token in no grid (S_spatial 0) is never kept by theta_s on the hard path: nor softly
        m_s = torch.sigmoid((s_spa - theta_s[:, None].to(s_spa.dtype)) * T) * (s_spa > 0)
        keep = has_img[:, None].to(C.dtype)
        branches = None  # only L_marginal with marginal_share redundancy reads them (AtpPruning.red_sums)
        if cfg.marginal_share == "redundancy" and cfg.marginal_weight > 0:
            branches = torch.stack([m_r, m_s], -1).to(C.dtype) * keep[..., None]
        M = torch.maximum(m_r, m_s).to(C.dtype) * keep
        if cfg.straight_through:  # METHOD sec 20: forward the hard rule's 0 / 1, backward the soft mask's gradient
            red, spa = hard_keep(s_red, s_spa, theta_r[:, None], theta_s[:, None], live)
            M = M + ((red | spa).to(M.dtype) - M).detach()  # text-only rows: live is all False
        return M, theta, branches

    @timed
    def _gather(self, flow, keep_tok, n, lens, new_len):
        """The tokens keep_tok [B, L] (text and kept visual tokens), n [B] of them per sample (lens:
        host ints; new_len: the most), in order, right-aligned (left padding) in seq's layout; the
        packed path packs that layout's live tokens. Returns hidden, seq, qmask, the packing and
        `take`, the same selection for any per-token tensor of the old layout (the rotary cos / sin).
        Moves the query rows of the score requests (`flow.q_rows`) to their new positions."""
        hidden, seq, qmask = flow.hidden, flow.seq, flow.qmask
        B, L = seq.live.shape
        rank = keep_tok.long().cumsum(1) - 1
        dest = torch.where(keep_tok, rank + (new_len - n)[:, None], new_len)
        idx = torch.zeros(B, new_len + 1, dtype=torch.long, device=hidden.device)
        idx.scatter_(1, dest, torch.arange(L, device=hidden.device).expand(B, L))
        idx = idx[:, :new_len]
        valid = torch.arange(new_len, device=hidden.device)[None] >= (new_len - n)[:, None]
        seq, qmask = seq.take(idx, valid), qmask.gather(1, idx) & valid
        if flow.q_rows is not None:  # the query tokens all stay: each moves to its destination
            rows, q_valid = flow.q_rows
            flow.q_rows = torch.where(q_valid, dest.gather(1, rows), 0), q_valid
        if flow.pack is None:

            def take(t):
                return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

            return take(hidden), seq, qmask, None, take
        pack = Packing.build(seq.live, lens)
        src = pack.pack(flow.pack.rows().gather(1, idx))  # each kept token's packed row before the gather
        return hidden.index_select(1, src), seq, qmask, pack, lambda t: t.index_select(1, src)

    def _logits(self, hidden, seq, B, L, hard, logits_to_keep):
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            return self.lm_head(hidden[:, -logits_to_keep:])
        logits = self.lm_head(hidden)
        if not hard or hidden.shape[1] == L and bool((seq.orig == torch.arange(L, device=hidden.device)).all()):
            return logits
        # back to the caller's layout; pruned visual positions hold zeros
        full = logits.new_zeros(B, L + 1, logits.shape[-1])  # slot L takes the padding rows
        full.scatter_(1, torch.where(seq.live, seq.orig, L)[..., None].expand_as(logits), logits)
        return full[:, :L].contiguous()

    def _losses(self, ntp, visual_tokens, m_sums, has_img, values=None, red_sums=None, branch=None, thresholds=None):
        """L = L_ntp + lambda_ATP L_ATP + lambda_target L_target (METHOD sec 7), over image samples;
        plus marginal_weight L_marginal when given each sample's marginal value of tokens `values` [B]
        (sec 16; `red_sums`: per module the tokens theta_r keeps, for marginal_share redundancy), and
        branch_weight L_branch when given each sample's branch value `branch` [B] and the modules'
        `thresholds` (K of [B, 2]) (sec 18)."""
        cfg = self.config
        lv = cfg.num_visual_tokens
        n_img = has_img.sum().clamp_min(1)
        n_bar = (visual_tokens.mean(1) * has_img).sum() / n_img
        logs = {"n_bar": n_bar.detach()}
        loss = ntp
        if ntp is not None:
            logs["ntp"] = ntp.detach()
        if m_sums and cfg.pruning == "atp" and ntp is not None:  # no labels (inference): nothing to add them to
            l_atp = sum(i * (m * has_img).sum() / n_img / lv for i, m in zip(cfg.atp_layers, m_sums))
            if cfg.budget_loss in ("per_module", "dual"):  # each module to its count of the schedule
                n = visual_tokens.shape[1]
                counts = module_counts(cfg)
                kept_sums = (visual_tokens[:, cfg.atp_layers] * has_img[:, None]).sum(0)
                kept = kept_sums / n_img
                spans = group_spans(cfg.atp_layers, n)[1:]
                err = [s / n * (k - c) / lv for s, k, c in zip(spans, kept, counts)]
                if cfg.budget_loss == "dual":  # a price per token (METHOD sec 15): samples trade tokens
                    if self.training:  # the prices follow the global batch's counts: one price on every rank
                        total = _data_parallel_sum(torch.cat([kept_sums.detach().float(), has_img.sum().float()[None]]))
                        kept = total[:-1] / total[-1].clamp_min(1)
                    l_target = sum(p * e for p, e in zip(self._dual_prices(kept, counts), err))
                else:
                    l_target = sum(e.abs() for e in err)
            else:
                l_target = (n_bar - cfg.target_tokens).abs() / lv
            logs.update(atp=l_atp.detach(), target=l_target.detach())
            if loss is not None and has_img.any():
                loss = loss + cfg.lambda_atp * l_atp + cfg.lambda_target * l_target
            if values is not None and loss is not None:
                advantage, weight = _advantages(values[has_img])
                share = visual_tokens.mean(1)[has_img] / lv  # each sample's N_bar share, through its soft masks
                if cfg.marginal_share == "redundancy":  # the tokens theta_r keeps, each over the layers it serves
                    n = visual_tokens.shape[1]
                    spans = group_spans(cfg.atp_layers, n)[1:]
                    share = sum(s / n * r for s, r in zip(spans, red_sums))[has_img] / lv
                l_marginal = -(advantage.to(share.dtype) * share).sum() * weight.to(share.dtype)
                logs["marginal"] = l_marginal.detach()
                loss = loss + cfg.marginal_weight * l_marginal
            if branch is not None and loss is not None:  # the branch that serves a sample better opens
                advantage, weight = _advantages(branch[has_img])
                theta = torch.stack(thresholds, 1)[has_img]
                gap = (theta[..., 1] - theta[..., 0]).mean(1)  # theta_s - theta_r, over the modules
                l_branch = (advantage.to(gap.dtype) * gap).sum() * weight.to(gap.dtype)
                logs["branch"] = l_branch.detach()
                loss = loss + cfg.branch_weight * l_branch
        if loss is not None:
            logs["total"] = loss.detach()
        return loss, logs

    def _value_terms(self, has_img) -> tuple[bool, bool]:
        """Whether this training forward computes L_marginal (sec 16) and L_branch (sec 18): both need
        ATP pruning and two image samples in the global batch to compare, counted over the data-parallel
        ranks so that every rank runs the same extra forwards (ZeRO-3 gathers the weights in each one);
        the one host read only when a weight is set."""
        cfg = self.config
        marginal, branch = cfg.marginal_weight > 0, cfg.branch_weight > 0
        if cfg.pruning != "atp" or not (marginal or branch):
            return False, False
        if int(_data_parallel_sum(has_img.sum().float())) < 2:
            return False, False
        return marginal, branch

    @torch.no_grad()
    def _branch_values(self, batch, own_counts):
        """METHOD sec 18: [B] each sample's answer score with its own counts kept by the spatial branch's
        ranking (coarsest grid first) minus by the redundancy ranking (S_red). Two gradient-free forwards
        under the fixed rule at each sample's own kept count after each module (own_counts: [K] of [B])."""
        cfg = self.config
        counts = [c.float().round().clamp(1, cfg.num_visual_tokens) for c in own_counts]
        spatial, redundancy = (
            answer_score(self._fixed_pass(batch, counts, rank).logits, batch["labels"], cfg.marginal_signal)
            for rank in ("spatial", "redundancy")
        )
        return spatial - redundancy

    def _marginal_values(self, batch, own_counts):
        """METHOD sec 16: [B] each sample's answer score at the high budget minus at the low one, per
        unit of its N_bar share between the two (`_marginal_budget_logits`). The score is minus the
        answer loss (`marginal_signal` loss) or the probability of the whole answer (answer: saturates,
        so a sample already answered with fewer tokens has no value). own_counts: [K] of [B], each
        sample's kept count after each module in this forward (used with `marginal_center` own)."""
        signal, labels = self.config.marginal_signal, batch["labels"]
        own = own_counts if self.config.marginal_center == "own" else None
        (low, s_low), (high, s_high) = (
            (answer_score(logits, labels, signal), share) for logits, share in self._marginal_budget_logits(batch, own)
        )
        return (high - low) / (s_high - s_low).clamp_min(1.0 / self.config.num_visual_tokens)

    @torch.no_grad()
    def _marginal_budget_logits(self, batch, counts=None):
        """The logits and each sample's N_bar share [B] at two budgets, under the fixed ranking (or,
        with `marginal_rank` own, the model's own keep rule's): the schedule's counts (or, given counts
        [K] of [B], each sample's own) x (1 - marginal_span), then x (1 + marginal_span). Two
        gradient-free forwards (with pruning='fixed', so they neither recurse nor move the dual prices),
        yielded one at a time."""
        cfg = self.config
        lv, span = cfg.num_visual_tokens, cfg.marginal_span
        schedule = module_counts(cfg)
        rank = "own" if cfg.marginal_rank == "own" else "redundancy"
        for scale in (1 - span, 1 + span):
            if counts is None:
                out = self._fixed_pass(batch, [min(lv, max(1, round(c * scale))) for c in schedule], rank)
            else:  # around where each sample's own thresholds stand now
                out = self._fixed_pass(batch, [(c.float() * scale).round().clamp(1, lv) for c in counts], rank)
            yield out.logits, out.visual_tokens.mean(1) / lv

    @torch.no_grad()
    def _fixed_pass(self, batch, counts, rank="redundancy"):
        """One gradient-free forward under the fixed rule (pruning='fixed', so it neither recurses into
        the value terms nor moves the dual prices) at `counts` per module: ints, or tensors [B] (each
        sample its own), ranked by S_red, (`spatial`, sec 18) by the grids first or (`own`, sec 16) by
        the model's margin above its thresholds. Per-sample counts and
        the ranking ride on the model for the pass: the strict config holds no tensors."""
        per_sample = torch.is_tensor(counts[0])
        try:
            self._sample_counts, self._sample_rank = (counts if per_sample else None), rank
            with _config_set(self.config, pruning="fixed", fixed_counts=[1] * len(counts) if per_sample else counts):
                return self.forward(**batch)
        finally:
            self._sample_counts = self._sample_rank = None

    @torch.no_grad()
    def _dual_prices(self, kept, counts):
        """budget_loss=dual (METHOD sec 15): the per-module token prices, raised while a module keeps
        more than its count and lowered (to 0 at most) while it keeps fewer; updated in training only.
        Kept on the model, not in the state dict: a resumed run starts again from 1."""
        price = getattr(self, "_price", None)
        if price is None or price.shape[0] != len(counts):
            price = torch.ones(len(counts), device=kept.device)
        if self.training:
            c = kept.new_tensor(counts, dtype=torch.float32)
            price = (price.to(kept.device) + self.config.dual_lr * (kept.float() - c) / c).clamp_min(0.0)
        self._price = price
        return price

    # -- decoding with a pruned cache -----------------------------------------------
    def _decode_step(self, input_ids, inputs_embeds, cache, logits_to_keep):
        state = cache.atp_state
        hidden = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        B, q = hidden.shape[:2]
        pos1 = state["next_pos"][:, None] + torch.arange(q, device=hidden.device)
        packed = "group_packed" in state
        if packed:  # the B x q new tokens packed, sample by sample; each group's cache grows per sample
            hidden, pos1 = hidden.reshape(1, B * q, -1), pos1.reshape(1, B * q)
            keys, dests, state["group_packed"] = decode_groups(state["group_packed"], q)
            layer_cache = DecodeCache(cache, state["group_of_layer"], dests)
        else:
            keys, layer_cache = [], cache
            for g, live in enumerate(state["group_live"]):
                live = torch.cat([live, live.new_ones(B, q)], 1)
                state["group_live"][g] = live
                keys.append(self._keys(live, None, hidden.dtype, q_len=q))  # the q new tokens are the last keys
        rope = self._rope(hidden, torch.stack([pos1, pos1]))
        with self._compiled_loop():
            for j, layer in enumerate(self._layers()):
                g = state["group_of_layer"][j]
                hidden = layer(
                    hidden,
                    attention_mask=keys[g].dense,
                    position_embeddings=rope,
                    use_cache=True,
                    **{CACHE_KW: layer_cache},
                    atp_keys=keys[g],
                )
        state["next_pos"] = state["next_pos"] + q
        hidden = self.model.language_model.norm(hidden).reshape(B, q, -1)
        keep = logits_to_keep if isinstance(logits_to_keep, int) and logits_to_keep > 0 else q
        return AtpLlavaOutput(logits=self.lm_head(hidden[:, -keep:]), **{CACHE_KW: cache})

    def generate(self, *args, **kwargs):
        if self.training:
            raise RuntimeError("generate() discards tokens for real (METHOD sec 5): call model.eval() first")
        return super().generate(*args, **kwargs)


def _data_parallel_world() -> int:
    """The number of data-parallel ranks (with ZeRO every rank of the world is one); 1 without
    torch.distributed."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _data_parallel_sum(t):
    """`t` summed over the data-parallel ranks, so that a statistic of the batch is the global batch's,
    as one process with the whole batch would see it; `t` itself on one rank. Every rank must call it
    at the same point."""
    if _data_parallel_world() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def _advantages(v):
    """The value terms' advantages: this rank's per-sample values [n] standardised over the global
    batch (mean 0, std 1 over every rank's image samples; float32), and the weight that makes the sum
    of a rank's terms, averaged over the ranks as the gradients are, the global batch's mean (a
    0-d tensor: no host read)."""
    v = v.float()
    n, s1, s2 = _data_parallel_sum(torch.stack([v.new_tensor(float(v.numel())), v.sum(), v.square().sum()]).double())
    mean = s1 / n
    std = (s2 / n - mean.square()).clamp_min(0).sqrt()
    return ((v - mean) / (std + 1e-6)).float(), (_data_parallel_world() / n).float()


@contextlib.contextmanager
def _config_set(config, **fields):
    """Set config fields for the duration of a block, restored even if the block raises."""
    before = {k: getattr(config, k) for k in fields}
    try:
        for k, v in fields.items():
            setattr(config, k, v)
        yield config
    finally:
        for k, v in before.items():
            setattr(config, k, v)


def _token_ce(logits, labels):
    """[B, L-1] next-token loss (0 where unsupervised) and the supervised positions."""
    target = labels[:, 1:]
    ce = nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100, reduction="none"
    )
    return ce, target != -100


def per_sample_ntp(logits, labels):
    """[B] mean next-token loss over each sample's supervised tokens (0 where it has none)."""
    ce, sup = _token_ce(logits, labels)
    return ce.sum(1) / sup.sum(1).clamp_min(1)


def answer_score(logits, labels, signal="loss"):
    """[B] how well each sample is answered, higher is better (METHOD sec 16): minus its mean answer
    loss (`loss`), or the teacher-forced probability of its whole answer (`answer`)."""
    if signal == "loss":
        return -per_sample_ntp(logits, labels)
    ce, _ = _token_ce(logits, labels)
    return torch.exp(-ce.sum(1))


AutoConfig.register("atp_llava", AtpLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(AtpLlavaConfig, AtpLlavaForConditionalGeneration, exist_ok=True)
