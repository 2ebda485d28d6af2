"""Word-level tokenizers for small SD3-style models, wrapped as transformers tokenizers.

ShapesWorld captions use a closed vocabulary, so the embedded model's text encoders read whole words rather than BPE
pieces. `build_word_tokenizers` builds two tokenizers over one vocabulary with the `tokenizers` library:

- CLIP-style: ``<|startoftext|> w1 … wn <|endoftext|>``, padded with ``<|endoftext|>`` (pad = EOS, as CLIP-L in SD3).
  Ids: ``<|startoftext|>`` 0, ``<|endoftext|>`` 1, ``<|unk|>`` 2, then the vocabulary in the order given.
- T5-style: ``w1 … wn </s>``, padded with ``<pad>``. Ids as in T5: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then the
  vocabulary in the order given.

Both lower-case their input and split it on whitespace and punctuation; every punctuation character is its own token
and, like any word outside the vocabulary, maps to the unknown token unless the vocabulary lists it. They are
`transformers.PreTrainedTokenizerFast` objects: `save_pretrained` writes ``tokenizer.json`` and
``tokenizer_config.json``, and `AutoTokenizer.from_pretrained(folder)` (or diffusers' pipeline loader) gives back the
same ids.

CLIPTextModel finds the EOS position from ``config.eos_token_id``; the value 2 selects a legacy path that takes the
argmax of the ids instead. The CLIP EOS id here is 1, and `tiny_clip_config` writes it into the config, so the pooled
output is read at the first ``<|endoftext|>`` of each row.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPTextConfig, PreTrainedTokenizerFast, T5Config

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_UNK = "<|unk|>"
T5_PAD = "<pad>"
T5_EOS = "</s>"
T5_UNK = "<unk>"


@dataclass(frozen=True)
class TokenizerInfo:
    """Ids and sizes a text-encoder config needs to match its tokenizer.

    `bos_token_id` is None for the T5-style tokenizer, which adds no start token; `max_length` is the tokenizer's
    `model_max_length`.
    """

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int
    unk_token_id: int
    max_length: int


@dataclass
class WordTokenizers:
    """The pair built by `build_word_tokenizers` and the ids that configure their encoders."""

    clip: PreTrainedTokenizerFast
    t5: PreTrainedTokenizerFast
    clip_info: TokenizerInfo
    t5_info: TokenizerInfo


def _normalised_vocabulary(vocabulary: list[str]) -> list[str]:
    pre = _pre_tokenizer()
    words: list[str] = []
    seen: set[str] = set()
    for entry in vocabulary:
        word = entry.strip().lower()
        if not word:
            continue
        pieces = [piece for piece, _ in pre.pre_tokenize_str(word)]
        if pieces != [word]:
            raise ValueError(f"vocabulary entry {entry!r} is not a single token: it splits into {pieces}")
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def _backend(vocab: dict[str, int], unk: str, post_processor: processors.PostProcessor) -> Tokenizer:
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.post_processor = post_processor
    return tokenizer


def build_word_tokenizers(vocabulary: list[str], clip_max_length: int = 24, t5_max_length: int = 32) -> WordTokenizers:
    """Build the CLIP-style and T5-style word tokenizers over `vocabulary`.

    Entries are lower-cased and de-duplicated, keeping their first position, so the same list always gives the same
    ids. Each entry must be one token under the pre-tokeniser (a word or a single punctuation character).
    `clip_max_length` / `t5_max_length` become the tokenizers' `model_max_length` (the CLIP one counts BOS and EOS).
    """
    words = _normalised_vocabulary(vocabulary)
    clip_specials = [CLIP_BOS, CLIP_EOS, CLIP_UNK]
    t5_specials = [T5_PAD, T5_EOS, T5_UNK]

    clip_vocab = {token: i for i, token in enumerate(clip_specials + words)}
    clip_post = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}",
        pair=f"{CLIP_BOS} $A {CLIP_EOS} $B {CLIP_EOS}",
        special_tokens=[(CLIP_BOS, clip_vocab[CLIP_BOS]), (CLIP_EOS, clip_vocab[CLIP_EOS])],
    )
    clip = PreTrainedTokenizerFast(
        tokenizer_object=_backend(clip_vocab, CLIP_UNK, clip_post),
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_UNK,
        model_max_length=clip_max_length,
        padding_side="right",
        truncation_side="right",
    )

    t5_vocab = {token: i for i, token in enumerate(t5_specials + words)}
    t5_post = processors.TemplateProcessing(
        single=f"$A {T5_EOS}",
        pair=f"$A {T5_EOS} $B {T5_EOS}",
        special_tokens=[(T5_EOS, t5_vocab[T5_EOS])],
    )
    t5 = PreTrainedTokenizerFast(
        tokenizer_object=_backend(t5_vocab, T5_UNK, t5_post),
        eos_token=T5_EOS,
        pad_token=T5_PAD,
        unk_token=T5_UNK,
        model_max_length=t5_max_length,
        padding_side="right",
        truncation_side="right",
    )

    clip_info = TokenizerInfo(
        vocab_size=len(clip_vocab),
        bos_token_id=clip_vocab[CLIP_BOS],
        eos_token_id=clip_vocab[CLIP_EOS],
        pad_token_id=clip_vocab[CLIP_EOS],
        unk_token_id=clip_vocab[CLIP_UNK],
        max_length=clip_max_length,
    )
    t5_info = TokenizerInfo(
        vocab_size=len(t5_vocab),
        bos_token_id=None,
        eos_token_id=t5_vocab[T5_EOS],
        pad_token_id=t5_vocab[T5_PAD],
        unk_token_id=t5_vocab[T5_UNK],
        max_length=t5_max_length,
    )
    return WordTokenizers(clip=clip, t5=t5, clip_info=clip_info, t5_info=t5_info)


def tiny_clip_config(
    tokenizer_info: TokenizerInfo,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    projection_dim: int = 32,
    max_positions: int | None = None,
    intermediate_size: int | None = None,
    hidden_act: str = "gelu",
) -> CLIPTextConfig:
    """A CLIPTextConfig (for CLIPTextModelWithProjection) matching a word tokenizer.

    `max_positions` defaults to the tokenizer's max length and may not be smaller; `intermediate_size` defaults to
    4 × hidden. The config's eos_token_id is the tokenizer's, so the pooled output is taken at the first EOS.
    """
    max_positions = tokenizer_info.max_length if max_positions is None else max_positions
    if max_positions < tokenizer_info.max_length:
        raise ValueError(
            f"max_positions {max_positions} is smaller than the tokenizer's max length {tokenizer_info.max_length}"
        )
    if tokenizer_info.eos_token_id == 2:
        raise ValueError("eos_token_id 2 selects CLIPTextModel's legacy argmax pooling; give EOS another id")
    return CLIPTextConfig(
        vocab_size=tokenizer_info.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size if intermediate_size is None else intermediate_size,
        projection_dim=projection_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        hidden_act=hidden_act,
        bos_token_id=tokenizer_info.bos_token_id,
        eos_token_id=tokenizer_info.eos_token_id,
        pad_token_id=tokenizer_info.pad_token_id,
    )


def tiny_t5_config(
    tokenizer_info: TokenizerInfo,
    d_model: int = 32,
    layers: int = 2,
    heads: int = 4,
    d_kv: int | None = None,
    d_ff: int | None = None,
    relative_attention_num_buckets: int = 8,
    relative_attention_max_distance: int = 32,
    feed_forward_proj: str = "gated-gelu",
) -> T5Config:
    """A T5Config (for T5EncoderModel) matching a word tokenizer: pad / eos / decoder_start ids from the tokenizer.

    `d_kv` defaults to d_model / heads and `d_ff` to 2 × d_model; the feed-forward is gated-GELU as in T5 v1.1.
    """
    config = T5Config(
        vocab_size=tokenizer_info.vocab_size,
        d_model=d_model,
        d_kv=d_model // heads if d_kv is None else d_kv,
        d_ff=2 * d_model if d_ff is None else d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=relative_attention_num_buckets,
        relative_attention_max_distance=relative_attention_max_distance,
        feed_forward_proj=feed_forward_proj,
        dropout_rate=0.0,
        pad_token_id=tokenizer_info.pad_token_id,
        eos_token_id=tokenizer_info.eos_token_id,
        use_cache=False,
    )
    config.decoder_start_token_id = tokenizer_info.pad_token_id
    return config
