"""SD3 text conditioning: CLIP-L, OpenCLIP-G and T5 through transformers' own classes.

Assembly, identical to diffusers' `StableDiffusion3Pipeline.encode_prompt` (B prompts, D = joint_attention_dim,
P = pooled_projection_dim, L_clip = `tokenizer_max_length`, L_t5 = min(max_sequence_length, T5 model_max_length)):

- each CLIP tokenises to L_clip tokens (padding="max_length", truncation) with the CLIP-L tokenizer's length; its
  penultimate hidden states (hidden_states[-2]) give the sequence channels, its projected pooled output (text_embeds)
  the pooled vector;
- the sequence is CLIP-L ‖ CLIP-G along channels, zero-padded to D: (B, L_clip, D);
- T5's last_hidden_state (B, L_t5, D), without attention mask, is appended along the sequence: (B, L_clip + L_t5, D);
- pooled = CLIP-L text_embeds ‖ CLIP-G text_embeds: (B, P).

diffusers pads T5 to max_sequence_length itself; the two agree whenever max_sequence_length does not exceed the T5
tokenizer's model_max_length (always for SD3 / SD3.5, whose T5 tokenizer allows 512 and whose pipelines refuse more).

Absent encoders (models trained without them) contribute zeros in their place, so the layout a model was trained on is
kept:
- no T5: zeros (B, max_sequence_length, D), as diffusers;
- no CLIP-G: zero pooled channels of width P − CLIP-L projection_dim; its sequence channels fall into the zero padding;
- no CLIP-L: zero pooled channels of width P − CLIP-G projection_dim first, then CLIP-G's; in the sequence CLIP-G's
  channels start after `clip_l_hidden_size` zero channels, by default the missing CLIP-L's pooled width (CLIP's hidden
  size equals its projection_dim in CLIP-L 768 and OpenCLIP-G 1280);
- no CLIP at all: zeros (B, L_clip, D) and a zero pooled vector; L_clip = 77 unless `clip_sequence_length` is given.

This module reads no files: :func:`workbench.loading.load_text_encoders` and
:func:`workbench.loading.save_text_encoders` read and write the encoders' diffusers sub-folders.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class _Slot:
    name: str
    encoder_folder: str
    tokenizer_folder: str
    label: str

    @property
    def title(self) -> str:
        return f"{self.encoder_folder} ({self.label})"


SLOTS = {
    "clip_l": _Slot("clip_l", "text_encoder", "tokenizer", "CLIP-L"),
    "clip_g": _Slot("clip_g", "text_encoder_2", "tokenizer_2", "CLIP-G"),
    "t5": _Slot("t5", "text_encoder_3", "tokenizer_3", "T5"),
}

TextPair = tuple[PreTrainedTokenizerBase, nn.Module]


class TextConditioner(nn.Module):
    """SD3 text conditioning from up to three (tokenizer, encoder) pairs; see the module docstring for the layout.

    The encoders are submodules `clip_l`, `clip_g` (CLIPTextModelWithProjection) and `t5` (T5EncoderModel), each
    possibly None; their tokenizers are `clip_l_tokenizer`, `clip_g_tokenizer` and `t5_tokenizer`. The pairs are
    checked against the transformer's `joint_attention_dim` and `pooled_projection_dim` at construction.

    `clip_l_hidden_size` / `clip_g_hidden_size` are the sequence widths the transformer was trained with for each CLIP:
    checked against a present encoder, used as the zero width of an absent one.
    """

    clip_l: nn.Module | None
    clip_g: nn.Module | None
    t5: nn.Module | None

    def __init__(
        self,
        clip_l: TextPair | None = None,
        clip_g: TextPair | None = None,
        t5: TextPair | None = None,
        *,
        joint_attention_dim: int,
        pooled_projection_dim: int,
        clip_l_hidden_size: int | None = None,
        clip_g_hidden_size: int | None = None,
        clip_sequence_length: int | None = None,
    ) -> None:
        super().__init__()
        self.joint_attention_dim = int(joint_attention_dim)
        self.pooled_projection_dim = int(pooled_projection_dim)
        self.expected_clip_l_hidden_size = clip_l_hidden_size
        self.expected_clip_g_hidden_size = clip_g_hidden_size
        self._clip_sequence_length = clip_sequence_length
        for name, pair in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5)):
            tokenizer, encoder = (None, None) if pair is None else pair
            if (tokenizer is None) != (encoder is None):
                raise ValueError(f"{SLOTS[name].title}: give both a tokenizer and an encoder, or neither")
            setattr(self, name, encoder)
            setattr(self, f"{name}_tokenizer", tokenizer)
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        for encoder in self._encoders():
            parameter = next(encoder.parameters(), None)
            if parameter is not None:
                self._device, self._dtype = parameter.device, parameter.dtype
                break
        self.validate()
        self.eval()

    def _encoders(self) -> list[nn.Module]:
        return [encoder for encoder in (self.clip_l, self.clip_g, self.t5) if encoder is not None]

    @property
    def present(self) -> tuple[str, ...]:
        """Names of the encoders present, among "clip_l", "clip_g", "t5"."""
        return tuple(name for name in SLOTS if getattr(self, name) is not None)

    @property
    def components(self) -> tuple[str, ...]:
        """diffusers folder names of the encoders present, among "text_encoder", "text_encoder_2", "text_encoder_3"."""
        return tuple(SLOTS[name].encoder_folder for name in self.present)

    @property
    def device(self) -> torch.device:
        """Device the conditioning tensors are returned on."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the conditioning tensors are returned in."""
        return self._dtype

    @property
    def tokenizer_max_length(self) -> int:
        """L_clip, the CLIP token count: the CLIP-L tokenizer's (else CLIP-G's, else `clip_sequence_length` or 77)."""
        for tokenizer in (self.clip_l_tokenizer, self.clip_g_tokenizer):
            if tokenizer is not None:
                return int(tokenizer.model_max_length)
        return 77 if self._clip_sequence_length is None else int(self._clip_sequence_length)

    def t5_sequence_length(self, max_sequence_length: int = 256) -> int:
        """L_t5 for a requested max_sequence_length, capped by the T5 tokenizer's model_max_length if T5 is present."""
        if self.t5_tokenizer is None:
            return int(max_sequence_length)
        return int(min(max_sequence_length, self.t5_tokenizer.model_max_length))

    @property
    def pooled_widths(self) -> tuple[int, int]:
        """(CLIP-L, CLIP-G) widths in the pooled vector, zero blocks of absent encoders included; they sum to P."""
        p_l = _projection_dim(self.clip_l)
        p_g = _projection_dim(self.clip_g)
        if p_l is None and p_g is None:
            return self.pooled_projection_dim, 0
        if p_l is None:
            return self.pooled_projection_dim - p_g, p_g
        if p_g is None:
            return p_l, self.pooled_projection_dim - p_l
        return p_l, p_g

    @property
    def clip_widths(self) -> tuple[int, int]:
        """(CLIP-L, CLIP-G) channel widths in the sequence before zero padding to joint_attention_dim.

        An absent CLIP-G counts 0 (its channels would be zeros followed by more zeros); an absent CLIP-L counts
        `clip_l_hidden_size` if given, else its pooled width.
        """
        w_l = _hidden_size(self.clip_l)
        w_g = _hidden_size(self.clip_g)
        if w_l is None:
            if w_g is None:
                w_l = 0
            elif self.expected_clip_l_hidden_size is not None:
                w_l = self.expected_clip_l_hidden_size
            else:
                w_l = self.pooled_widths[0]
        return w_l, 0 if w_g is None else w_g

    def validate(self) -> None:
        """Check the encoders against each other, their tokenizers and the transformer's widths.

        Raises ValueError naming the component (diffusers folder name and role), the size found and the size expected.
        """
        for name in ("clip_l", "clip_g"):
            encoder, tokenizer, slot = getattr(self, name), getattr(self, f"{name}_tokenizer"), SLOTS[name]
            if encoder is None:
                continue
            if not hasattr(encoder, "text_projection"):
                raise ValueError(
                    f"{slot.title}: {type(encoder).__name__} has no text_projection; SD3 needs "
                    "CLIPTextModelWithProjection for the pooled vector"
                )
            config = encoder.config
            expected = self.expected_clip_l_hidden_size if name == "clip_l" else self.expected_clip_g_hidden_size
            if expected is not None and config.hidden_size != expected:
                raise ValueError(
                    f"{slot.title}: hidden_size is {config.hidden_size} but the transformer expects {expected}"
                )
            _check_tokenizer(slot, tokenizer, config.vocab_size)
            if self.tokenizer_max_length > config.max_position_embeddings:
                raise ValueError(
                    f"{slot.title}: max_position_embeddings is {config.max_position_embeddings} but the CLIP sequence "
                    f"length (tokenizer model_max_length) is {self.tokenizer_max_length}"
                )
            eos = config.eos_token_id
            if eos != 2 and tokenizer.eos_token_id is not None and tokenizer.eos_token_id != eos:
                raise ValueError(
                    f"{slot.title}: config eos_token_id is {eos} but the tokenizer's EOS id is "
                    f"{tokenizer.eos_token_id}; the pooled output would be read at the wrong token"
                )

        pooled = self.pooled_projection_dim
        p_l, p_g = _projection_dim(self.clip_l), _projection_dim(self.clip_g)
        l_title, g_title = SLOTS["clip_l"].title, SLOTS["clip_g"].title
        l_folder, g_folder = SLOTS["clip_l"].encoder_folder, SLOTS["clip_g"].encoder_folder
        for title, found in ((l_title, p_l), (g_title, p_g)):
            if found is not None and found > pooled:
                raise ValueError(
                    f"{title}: projection_dim is {found} but the transformer's pooled_projection_dim is only {pooled}"
                )
        if p_l is not None and p_g is not None and p_l + p_g != pooled:
            if p_l == pooled:
                raise ValueError(
                    f"{l_title}: projection_dim is {p_l}, the whole of the transformer's pooled_projection_dim "
                    f"{pooled}, leaving nothing for the {p_g} of {g_folder}"
                )
            raise ValueError(
                f"{g_title}: projection_dim is {p_g} but the transformer expects pooled_projection_dim "
                f"{pooled} = {p_l} ({l_folder}) + {pooled - p_l} ({g_folder})"
            )

        w_l, w_g = self.clip_widths
        if w_l + w_g > self.joint_attention_dim:
            hint = "" if self.clip_l is not None else "; CLIP-L is absent: give its width as clip_l_hidden_size"
            raise ValueError(
                f"CLIP hidden sizes {w_l} ({l_title}) + {w_g} ({g_title}) = {w_l + w_g} "
                f"exceed the transformer's joint_attention_dim {self.joint_attention_dim}{hint}"
            )

        if self.t5 is not None:
            slot = SLOTS["t5"]
            d_model = self.t5.config.d_model
            if d_model != self.joint_attention_dim:
                raise ValueError(
                    f"{slot.title}: d_model is {d_model} but the transformer expects joint_attention_dim "
                    f"{self.joint_attention_dim}"
                )
            _check_tokenizer(slot, self.t5_tokenizer, self.t5.config.vocab_size)

    def to(self, *args: Any, **kwargs: Any) -> TextConditioner:
        """nn.Module.to; also sets the device and dtype of the conditioning returned (`.to("cpu", torch.bfloat16)`)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        super().to(*args, **kwargs)
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            self._dtype = dtype
        return self

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str], max_sequence_length: int = 256) -> tuple[Tensor, Tensor]:
        """:meth:`embed` without gradients (inference)."""
        return self.embed(prompts, max_sequence_length)

    def embed(self, prompts: str | Sequence[str], max_sequence_length: int = 256) -> tuple[Tensor, Tensor]:
        """Encode B prompts the way diffusers' SD3 encode_prompt does (with gradients when enabled: training).

        Returns prompt_embeds (B, L_clip + L_t5, joint_attention_dim) and pooled (B, pooled_projection_dim), on
        `self.device` in `self.dtype`. With T5 absent L_t5 = max_sequence_length (zeros), else
        min(max_sequence_length, T5 model_max_length).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = len(prompts)
        length = self.tokenizer_max_length
        w_l, w_g = self.clip_widths
        p_l, p_g = self.pooled_widths

        clip_parts: list[Tensor] = []
        pooled_parts: list[Tensor] = []
        for name, width, pooled_width in (("clip_l", w_l, p_l), ("clip_g", w_g, p_g)):
            encoder = getattr(self, name)
            if encoder is None:
                clip_parts.append(self._zeros(batch, length, width))
                pooled_parts.append(self._zeros(batch, pooled_width))
                continue
            ids = self._tokenize(name, prompts, length, add_special_tokens=True)
            output = encoder(ids.to(_module_device(encoder, self.device)), output_hidden_states=True)
            clip_parts.append(output.hidden_states[-2].to(self.device, self.dtype))
            pooled_parts.append(output[0].to(self.device, self.dtype))

        clip_embeds = torch.cat(clip_parts, dim=-1)
        clip_embeds = F.pad(clip_embeds, (0, self.joint_attention_dim - clip_embeds.shape[-1]))

        if self.t5 is None:
            t5_embeds = self._zeros(batch, max_sequence_length, self.joint_attention_dim)
        else:
            ids = self._tokenize("t5", prompts, self.t5_sequence_length(max_sequence_length), add_special_tokens=True)
            t5_embeds = self.t5(ids.to(_module_device(self.t5, self.device)))[0].to(self.device, self.dtype)

        return torch.cat([clip_embeds, t5_embeds], dim=-2), torch.cat(pooled_parts, dim=-1)

    def encode_with_negative(
        self,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str] | None = None,
        max_sequence_length: int = 256,
    ) -> tuple[Tensor, Tensor]:
        """Encode negatives and prompts in one batch for classifier-free guidance, in diffusers' [negative; positive]
        order.

        `negative_prompts` None means "" for every prompt, a string is used for every prompt, a list must have one per
        prompt. Returns prompt_embeds (2B, L, joint_attention_dim) and pooled (2B, pooled_projection_dim); rows
        0..B-1 are the negatives.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if negative_prompts is None:
            negative_prompts = ""
        if isinstance(negative_prompts, str):
            negatives = [negative_prompts] * len(prompts)
        else:
            negatives = list(negative_prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts given for {len(prompts)} prompts")
        return self.encode(negatives + prompts, max_sequence_length=max_sequence_length)

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    def _tokenize(self, name: str, prompts: list[str], max_length: int, add_special_tokens: bool) -> Tensor:
        """Token ids (B, max_length), padded to ``max_length`` on the tokenizer's padding side; a prompt longer than
        that is truncated the tokenizer's way (special tokens kept), with a warning."""
        tokenizer = getattr(self, f"{name}_tokenizer")
        rows = tokenizer(prompts, add_special_tokens=add_special_tokens).input_ids
        too_long = [prompt for prompt, row in zip(prompts, rows) if len(row) > max_length]
        for prompt in too_long:
            logger.warning("%s keeps %d tokens; the prompt %r was truncated", SLOTS[name].title, max_length, prompt)
        pad = tokenizer.pad_token_id
        if too_long or pad is None:
            return tokenizer(
                prompts,
                padding="max_length",
                max_length=max_length,
                truncation=True,
                add_special_tokens=add_special_tokens,
                return_tensors="pt",
            ).input_ids
        # One tokenizer call padded here: the wrapper's padding and tensor conversion cost more than the tokenizing.
        left = tokenizer.padding_side == "left"
        return torch.tensor(
            [[pad] * (max_length - len(row)) + row if left else row + [pad] * (max_length - len(row)) for row in rows],
            dtype=torch.long,
        )

    def load_weights(self, groups: dict[str, dict[str, Tensor]]) -> None:
        """Replace encoder weights with transformers-named state dicts keyed ``clip_l``, ``clip_g`` or ``t5xxl``
        (the groups of an original single-file checkpoint); a group whose encoder is absent is an error."""
        slots = {"clip_l": "clip_l", "clip_g": "clip_g", "t5xxl": "t5"}
        for group, state in groups.items():
            name = slots[group]
            encoder = getattr(self, name)
            if encoder is None:
                raise ValueError(
                    f"{SLOTS[name].title}: the checkpoint holds {group} weights but no such encoder is set up"
                )
            state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
            missing, unexpected = encoder.load_state_dict(state, strict=False)
            missing = [k for k in missing if k != "encoder.embed_tokens.weight"]
            if missing or unexpected:
                raise ValueError(
                    f"{SLOTS[name].title}: checkpoint weights do not fit the encoder "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )

    def model_index_entries(self) -> dict[str, list[str]]:
        """``model_index.json`` entries (library, class) of the present encoders and tokenizers."""
        entries = {}
        for name in self.present:
            slot = SLOTS[name]
            encoder = getattr(self, name)
            entries[slot.encoder_folder] = ["transformers", type(encoder).__name__]
            entries[slot.tokenizer_folder] = ["transformers", type(getattr(self, f"{name}_tokenizer")).__name__]
        return entries


def _projection_dim(encoder: nn.Module | None) -> int | None:
    return None if encoder is None else int(encoder.config.projection_dim)


def _hidden_size(encoder: nn.Module | None) -> int | None:
    return None if encoder is None else int(encoder.config.hidden_size)


def _module_device(module: nn.Module, default: torch.device) -> torch.device:
    parameter = next(module.parameters(), None)
    return default if parameter is None or parameter.device.type == "meta" else parameter.device


def _check_tokenizer(slot: _Slot, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"{slot.title}: the tokenizer has {len(tokenizer)} tokens but the encoder's vocab_size is {vocab_size}"
        )
