"""A LLaVA-style decoder VQA model over packed groups (docs/vlm.md).

Every question is one sequence: its image's regions, each a token through the multi-modal
projector, then the question's tokens and an answer prompt token. The decoder's hidden state at
the answer prompt, after decoder layer ``gradcam_layer`` (the last by default), is ``joint``,
where Grad-CAM vectors are taken; ``scores`` are the logits of the answers' tokens there, the
answer rows of the LM head only (:class:`~sort_fast.heads.AnswerTokenHead`).

The decoder is ``transformers``' ``LlavaForConditionalGeneration`` (a Llama language model),
random-initialised from a small in-code configuration or loaded from a local
``save_pretrained`` folder. The data's region features enter as the vision tower's output: the
projector alone maps them into the decoder; the vision tower is kept (and saved) but not run.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data.group import PackedBatch
from ..heads import AnswerTokenHead

__all__ = ["LlavaVQAConfig", "LlavaOutput", "LlavaVQA", "SPECIAL_TOKENS", "load_hf_config",
           "check_llava_config", "closed_form_norm", "causal_region_mask", "DecoderInputs"]

#: tokens after the benchmark's vocabulary: the image placeholder and the answer prompt, then
#: one token per answer
SPECIAL_TOKENS = ("<image>", "<answer>")

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: the folders :meth:`LlavaVQA.save_pretrained` writes
MERGED_DIR, ADAPTER_DIR = "hf_model", "adapter"


@dataclass
class LlavaVQAConfig:
    """Sizes of :class:`LlavaVQA`. Token ids: ``0 .. vocab_size - 1`` the benchmark's question
    vocabulary (0 pads), then :data:`SPECIAL_TOKENS`, then the ``num_answers`` answers.

    ``hf_config``: the ``config.json`` of a ``save_pretrained`` Llava folder (a dict), which
    then fixes the decoder's sizes (``hidden_size`` .. ``text_vocab_size`` are ignored);
    ``None`` builds a small random Llava from those sizes. ``gradcam_layer``: the decoder
    layer whose output is ``joint`` (``-1``, the last, has the closed-form Grad-CAM; another
    layer takes autograd through the layers above it). ``lora_rank > 0`` wraps the decoder in
    ``peft`` LoRA adapters on ``lora_targets`` and trains only those.
    """

    vocab_size: int
    num_answers: int
    feature_dim: int
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    text_vocab_size: int = 0  # 0: just the tokens above
    attention_dropout: float = 0.0
    gradcam_layer: int = -1
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: Tuple[str, ...] = LORA_TARGETS
    hf_config: Optional[Dict[str, Any]] = None

    @property
    def tokens_needed(self) -> int:
        """The smallest token vocabulary that holds every id the model feeds the decoder."""
        return self.vocab_size + len(SPECIAL_TOKENS) + self.num_answers

    def build(self) -> "LlavaVQA":
        """The model this configuration describes (:class:`~sort_fast.models.ModelSpec`),
        random-initialised."""
        return LlavaVQA(self)


def load_hf_config(folder: str) -> Dict[str, Any]:
    """The configuration of a local ``save_pretrained`` Llava folder as a dict (``ValueError``
    naming the folder if it is not one)."""
    from transformers import LlavaConfig

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder}: no config.json (not a save_pretrained folder)")
    try:
        config = LlavaConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: not a Llava configuration ({str(e).splitlines()[0]})"
                         ) from None
    if config.model_type != "llava":
        raise ValueError(f"{folder}: model_type {config.model_type!r}, expected 'llava'")
    return config.to_dict()


class DecoderInputs(NamedTuple):
    """What :meth:`LlavaVQA.decoder_inputs` gives the decoder. Without image sharing: one
    sequence per question, ``embeds [T, S, D]`` (``S = R + L + 1``), the additive ``mask
    [T, 1, S, S]`` (:func:`causal_region_mask`), the rotary ``positions [T, S]``, ``rows =
    arange(T)``, the answer prompt's ``position [T]`` in ``embeds``, ``region_tokens
    [T, R, D]`` (the start of ``embeds``) and ``prefix`` ``None``. With image sharing the
    region tokens run once per image first: ``prefix`` is ``(region_tokens [I, R, D], mask
    [I, 1, R, R], positions [I, R])``, ``region_tokens`` is that ``[I, R, D]`` tensor, and
    ``embeds [T, L + 1, D]`` are the question tokens alone, their ``mask [T, 1, L + 1,
    R + L + 1]`` over their image's regions and themselves."""

    embeds: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    position: torch.Tensor
    region_tokens: torch.Tensor
    prefix: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None


@dataclass
class LlavaOutput:
    """``scores [T, A]`` answer logits (``None`` when not asked for), ``joint [T, D]`` the
    decoder's hidden state at the answer prompt after layer ``gradcam_layer``,
    ``region_tokens`` the image regions as decoder inputs (through the projector),
    ``[I, R, D]`` once per image when the forward shared them, else ``[T, R, D]`` per question;
    ``attention`` is ``None`` (no region attention for SQuINT)."""

    scores: Optional[torch.Tensor]
    joint: torch.Tensor
    region_tokens: torch.Tensor
    attention: Optional[torch.Tensor] = None


def _hf_config(cfg: LlavaVQAConfig) -> Any:
    """The ``transformers.LlavaConfig`` of ``cfg``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if cfg.hf_config is not None:
        config = LlavaConfig.from_dict(dict(cfg.hf_config))
    else:
        heads = cfg.num_heads
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=cfg.feature_dim, intermediate_size=cfg.feature_dim,
                num_hidden_layers=1, num_attention_heads=1, image_size=32, patch_size=16),
            text_config=LlamaConfig(
                vocab_size=max(cfg.text_vocab_size, cfg.tokens_needed),
                hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=heads,
                num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=4096,
                attention_dropout=cfg.attention_dropout, tie_word_embeddings=False),
            image_token_index=cfg.vocab_size, projector_hidden_act="gelu")
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


def check_llava_config(cfg: LlavaVQAConfig, config: Any = None) -> None:
    """``ValueError`` if ``cfg`` (with ``config``, its ``transformers`` configuration, built
    when not given) cannot build a model for its data."""
    config = _hf_config(cfg) if config is None else config
    text = config.text_config
    if text.vocab_size < cfg.tokens_needed:
        raise ValueError(f"the decoder has {text.vocab_size} tokens, the data needs "
                         f"{cfg.tokens_needed} (questions, {len(SPECIAL_TOKENS)} special "
                         f"tokens, answers)")
    layers = config.text_config.num_hidden_layers
    if not -layers <= cfg.gradcam_layer < layers:
        raise ValueError(f"gradcam_layer {cfg.gradcam_layer} is not a layer of the "
                         f"{layers}-layer decoder")
    features = config.vision_config.hidden_size
    if features != cfg.feature_dim:
        raise ValueError(f"the projector takes {features}-d vision features, the data has "
                         f"{cfg.feature_dim}-d region features")


def closed_form_norm(norm: nn.Module) -> nn.Module:
    """``torch.nn.RMSNorm`` with the weights of a ``transformers`` Llama-family RMSNorm (same
    math, computed in the input's dtype, which is what
    :func:`~sort_fast.ops.head_gradcam.head_gradcam` has a closed form for); other norms are
    returned as they are. The weight keeps its name, so ``save_pretrained`` folders load
    back."""
    eps = getattr(norm, "variance_epsilon", None)
    weight = getattr(norm, "weight", None)
    if eps is None or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return norm
    out = nn.RMSNorm(weight.shape[0], eps=eps, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
    out.weight.requires_grad_(weight.requires_grad)
    return out


def _image_cache(decoder: nn.Module, regions: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor, image_index: torch.Tensor) -> Any:
    """Every layer's keys and values of the images' region tokens ``[I, R, D]``, one copy per
    question (``image_index [T]``), as a ``transformers`` cache the questions' pass extends."""
    from transformers import DynamicCache

    prefix = decoder(inputs_embeds=regions, attention_mask=mask, position_ids=positions,
                     cache=DynamicCache(), use_cache=True).cache
    return DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, image_index),
                                         layer.values.index_select(0, image_index))
                                        for layer in prefix.layers])


def _replace_dir(target: str, write: Callable[[str], Any]) -> None:
    """``write(folder)`` into a fresh folder beside ``target``, then renamed to ``target``
    (an old ``target`` is moved aside first and removed after)."""
    parent = os.path.dirname(os.path.abspath(target))
    fresh = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        write(fresh)
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(target, os.path.join(old, "x"))
        os.replace(fresh, target)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _token_mask(region_mask: torch.Tensor, text_length: int) -> torch.Tensor:
    """``[T, R + text_length]`` bool: True on the real tokens of each sequence (its real
    regions, then every text token)."""
    return torch.cat([region_mask, region_mask.new_ones(region_mask.shape[0], text_length)], 1)


def _real_positions(token_mask: torch.Tensor) -> torch.Tensor:
    """The rotary position of every token ``[T, S]``: the number of real tokens before it
    (padded regions take their predecessor's, and are never attended to)."""
    return (token_mask.long().cumsum(1) - 1).clamp_min(0)


def causal_region_mask(region_mask: torch.Tensor, text_length: int, dtype: torch.dtype,
                       *, region_queries: bool = True) -> torch.Tensor:
    """The decoder's additive attention mask over ``R`` region tokens then ``text_length``
    text tokens: causal, and no query attends to a padded region (``region_mask [T, R]`` bool,
    True on real regions); 0 where attended, the dtype's lowest value elsewhere.
    ``[T, 1, S, S]`` (``S = R + text_length``), or with ``region_queries=False`` the text
    queries' rows alone, ``[T, 1, text_length, S]`` (the regions are then a shared prefix).
    Built on the device, with no read back."""
    regions = region_mask.shape[1]
    keys = _token_mask(region_mask, text_length)                                     # [T, S]
    pos = torch.arange(regions + text_length, device=region_mask.device)
    queries = pos if region_queries else pos[regions:]
    allowed = (pos[None, :] <= queries[:, None])[None] & keys[:, None, :]          # [T, Q, S]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=region_mask.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class LlavaVQA(nn.Module):
    """A LLaVA-style decoder over a :class:`~sort_fast.data.PackedBatch`, a
    :class:`~sort_fast.models.VQAModel` (docs/vlm.md).

    ``classifier`` (an :class:`~sort_fast.heads.AnswerTokenHead` of the final norm and the LM
    head, sharing their weights) maps ``joint`` to the scores when ``joint`` is taken after the
    last layer; at an earlier layer the scores depend on more than ``joint`` (every position
    above it), so ``classifier`` is ``None`` and the trainer takes the Grad-CAM gradient by
    autograd. ``vlm`` is the ``transformers`` model (wrapped in a ``peft`` model with LoRA).
    """

    def __init__(self, config: LlavaVQAConfig, pretrained: Optional[str] = None) -> None:
        """``pretrained``: a local ``save_pretrained`` Llava folder whose weights the model
        starts from (``config.hf_config`` must be its configuration,
        :func:`load_hf_config`); ``None``: random weights."""
        super().__init__()
        from transformers import LlavaForConditionalGeneration

        self.config = cfg = config
        hf = _hf_config(cfg)
        try:
            check_llava_config(cfg, hf)
        except ValueError as e:
            raise ValueError(f"{pretrained}: {e}" if pretrained else str(e)) from None
        if pretrained is None:
            vlm = LlavaForConditionalGeneration(hf)
        else:
            try:
                vlm = LlavaForConditionalGeneration.from_pretrained(
                    pretrained, config=hf, local_files_only=True)
            except (OSError, ValueError, RuntimeError) as e:
                raise ValueError(f"{pretrained}: cannot load its weights "
                                 f"({str(e).splitlines()[0]})") from None
        self._setup(vlm)

    def _setup(self, vlm: nn.Module) -> None:
        """Adopts ``vlm`` (a ``LlavaForConditionalGeneration``): closed-form final norm, answer
        head, LoRA adapters."""
        cfg = self.config
        decoder = vlm.model.language_model
        decoder.norm = closed_form_norm(decoder.norm)
        vlm.model.vision_tower.requires_grad_(False)  # never run: the data carries features
        self.num_layers = len(decoder.layers)
        self.layer = cfg.gradcam_layer % self.num_layers
        first_answer = cfg.vocab_size + len(SPECIAL_TOKENS)
        tokens = torch.arange(first_answer, first_answer + cfg.num_answers,
                              device=vlm.lm_head.weight.device)
        self.answer_head = AnswerTokenHead(decoder.norm, vlm.lm_head, tokens)
        if cfg.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            vlm = get_peft_model(vlm, LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                target_modules=list(cfg.lora_targets), exclude_modules=r".*vision_tower.*"))
        self.vlm = vlm

    @property
    def llava(self) -> nn.Module:
        """The ``LlavaForConditionalGeneration`` (inside the ``peft`` wrapper with LoRA)."""
        return self.vlm.base_model.model if self.config.lora_rank > 0 else self.vlm

    @property
    def classifier(self) -> Optional[AnswerTokenHead]:
        """``joint [T, D] -> scores [T, A]`` when ``joint`` is after the last layer, else
        ``None``."""
        return self.answer_head if self.layer == self.num_layers - 1 else None

    def save_pretrained(self, folder: str) -> List[str]:
        """Writes the model for ``transformers`` and ``peft`` into ``folder``:
        :data:`MERGED_DIR` (``hf_model/``), a ``save_pretrained`` Llava folder with any LoRA
        adapters merged into the weights, and with LoRA :data:`ADAPTER_DIR` (``adapter/``), the
        adapters alone in ``peft``'s format. Each is written beside its place and renamed into
        it (a crash leaves the old one or the new one). Returns the folders written."""
        written = []
        if self.config.lora_rank > 0:
            _replace_dir(os.path.join(folder, ADAPTER_DIR), self.vlm.save_pretrained)
            written.append(os.path.join(folder, ADAPTER_DIR))
            merged = copy.deepcopy(self.vlm).merge_and_unload()
        else:
            merged = self.vlm
        _replace_dir(os.path.join(folder, MERGED_DIR), merged.save_pretrained)
        written.append(os.path.join(folder, MERGED_DIR))
        return written

    def decoder_inputs(self, batch: PackedBatch, *, share_images: bool = False,
                       track_regions: bool = False) -> DecoderInputs:
        """The decoder's inputs for ``batch`` (:class:`DecoderInputs`): per question its
        image's region tokens through the projector, its question tokens and the answer
        prompt, with the attention mask and the rotary positions, which count real tokens
        only (a question's sequence is the same whatever the padding of the other images of
        its batch). ``share_images``: the region tokens as a prefix run once per image.
        ``track_regions``: ``region_tokens`` requires grad even when nothing below it is
        trained (region Grad-CAM of a LoRA model)."""
        if not isinstance(batch, PackedBatch):
            raise TypeError(f"LlavaVQA takes a PackedBatch, got {type(batch).__name__}")
        feats = batch.image_features
        if feats.shape[-1] != self.config.feature_dim:
            raise ValueError(f"image features have {feats.shape[-1]} dims, the model expects "
                             f"{self.config.feature_dim}")
        llava = self.llava
        index, lengths = batch.image_index, batch.question_lengths
        rows = torch.arange(index.numel(), device=index.device)
        regions = llava.model.multi_modal_projector(feats.to(llava.lm_head.weight.dtype))
        text = torch.cat([batch.question_tokens, batch.question_tokens.new_zeros(rows.numel(), 1)],
                         1)
        text = text.index_put((rows, lengths), text.new_tensor(self.config.vocab_size + 1))
        text_embeds = llava.model.language_model.embed_tokens(text)                # [T, L+1, D]
        region_tokens = regions if share_images else regions[index]
        if track_regions and not region_tokens.requires_grad:
            region_tokens.requires_grad_()
        region_mask = batch.image_mask[index]
        positions = _real_positions(_token_mask(region_mask, text.shape[1]))           # [T, S]
        if share_images:
            image_mask = batch.image_mask
            prefix = (region_tokens, causal_region_mask(image_mask, 0, regions.dtype),
                      _real_positions(image_mask))
            mask = causal_region_mask(region_mask, text.shape[1], regions.dtype,
                                      region_queries=False)
            return DecoderInputs(text_embeds, mask, positions[:, feats.shape[1]:], rows,
                                 lengths, region_tokens, prefix)
        embeds = torch.cat([region_tokens, text_embeds], 1)                            # [T, S, D]
        mask = causal_region_mask(region_mask, text.shape[1], embeds.dtype)
        return DecoderInputs(embeds, mask, positions, rows, feats.shape[1] + lengths,
                             region_tokens)

    def forward(self, batch: PackedBatch, *, scores: bool = True, share_images: bool = True,
                track_regions: bool = False) -> LlavaOutput:
        """``scores=False`` skips the answer head when ``classifier`` can run it on ``joint``
        (the closed-form Grad-CAM does). ``share_images`` (the default): the region tokens of
        each image run through the decoder once, and its questions attend to their keys and
        values (causal attention: the region tokens' states do not depend on the question);
        ``False`` runs every question's whole sequence (the same values up to rounding;
        region Grad-CAM needs it). ``track_regions``: as :meth:`decoder_inputs`."""
        inputs = self.decoder_inputs(batch, share_images=share_images,
                                     track_regions=track_regions)
        rows, position = inputs.rows, inputs.position
        decoder = self.llava.model.language_model
        captured = []
        last = self.classifier is not None

        def take_joint(module: nn.Module, args: Any, output: torch.Tensor
                       ) -> Optional[torch.Tensor]:
            joint = output[rows, position]
            captured.append(joint)
            if last:  # the head runs on joint itself
                return None
            # the layers above read joint itself: d scores / d joint is the full derivative
            return output.index_put((rows, position), joint)

        # above joint, Grad-CAM differentiates the attention twice: only the math kernel can
        with contextlib.ExitStack() as stack:
            if not last:
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            cache = None
            if inputs.prefix is not None:
                cache = _image_cache(decoder, *inputs.prefix, batch.image_index)
            handle = decoder.layers[self.layer].register_forward_hook(take_joint)
            stack.callback(handle.remove)
            hidden = decoder(inputs_embeds=inputs.embeds, attention_mask=inputs.mask,
                             position_ids=inputs.positions, cache=cache,
                             use_cache=cache is not None).last_hidden_state
        joint = captured[0]
        if last:
            out_scores = self.answer_head(joint) if scores else None
        else:
            out_scores = self.answer_head.answer_logits(hidden[rows, position])
        return LlavaOutput(scores=out_scores, joint=joint, region_tokens=inputs.region_tokens)

    def region_gradcam(self, batch: PackedBatch, classes: Optional[torch.Tensor] = None,
                       *, create_graph: bool = False) -> torch.Tensor:
        """Region-level Grad-CAM ``[T, R]``: ``d y_c / d token_r . token_r`` summed over the
        decoder width, for every region token ``r`` of each question's sequence, 0 on padded
        regions. ``classes [T]`` defaults to ``batch.classes``."""
        classes = batch.classes if classes is None else classes
        with torch.enable_grad():
            out = self(batch, share_images=False, track_regions=True)
            y = out.scores.gather(1, classes[:, None]).sum()
            (grad,) = torch.autograd.grad(y, out.region_tokens, create_graph=create_graph)
        cam = (grad * out.region_tokens).sum(-1) * batch.image_mask[batch.image_index]
        return cam if create_graph else cam.detach()
