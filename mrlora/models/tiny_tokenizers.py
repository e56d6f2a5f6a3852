"""Tiny CLIP and T5 tokenizers built in-process, so a tiny model never needs the hub.

Why these exact shapes:

- They are the standard transformers classes (``CLIPTokenizer``, ``T5Tokenizer``), saved in the normal layout,
  so ``from_pretrained``, ``add_tokens`` (RaTE adds one token per reward) and the diffusers pipelines treat
  them exactly like the real ones.
- CLIP: byte-level BPE whose base alphabet is all 256 byte symbols (with and without the ``</w>`` end-of-word
  suffix), so *any* text encodes without an unknown token; a few hundred merges learnt deterministically from
  a built-in list of prompt words keep ordinary prompts short enough for CLIP's 77-token window. The end-of-text
  token has the highest base id, as in the real CLIP vocabulary (older CLIP code finds the pooled position with
  ``argmax(input_ids)``).
- T5: a Unigram model with one piece per built-in word plus every printable ASCII character, so unseen English
  words split into characters and only non-ASCII characters fall back to ``<unk>``.

Everything here is a pure function of the built-in word list: two builds give byte-identical tokenizers.
"""

from __future__ import annotations

from collections import Counter

from transformers import CLIPTokenizer, T5Tokenizer

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_VOCAB_LIMIT = 1000  # rows of the tiny CLIP embedding table; the base vocabulary must fit
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
EOW = "</w>"

# Words that appear in typical text-to-image prompts (GenEval objects, colours, counts, positions, OCR
# phrasing). They only shape the merges / pieces; any other text still encodes.
_PROMPT_WORDS = """
a an the of and with on in at to for from by is are this that photo image picture painting drawing render
one two three four five six seven eight nine ten single pair couple group many several some few
red orange yellow green blue purple pink brown black white gray grey gold silver colorful bright dark
left right above below under over near next behind front top bottom middle center side
person people man woman boy girl child dog cat horse sheep cow elephant bear zebra giraffe bird
bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking meter
bench backpack umbrella handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove
skateboard surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana apple sandwich
broccoli carrot hot dog pizza donut cake chair couch potted plant bed dining table toilet tv laptop mouse
remote keyboard cell phone microwave oven toaster sink refrigerator book clock vase scissors teddy
hair drier toothbrush text says written reads word words letter letters poster banner label shop store
street city house building tree flower flowers garden mountain river lake sea beach sky cloud clouds sun
moon star night day morning evening winter summer spring autumn snow rain forest field road bridge
style realistic detailed beautiful cute small large big tiny huge old new happy sad portrait landscape
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map used by byte-level BPE (GPT-2 / CLIP convention)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _learn_merges(words: list[str], budget: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over ``words`` (each ending in ``</w>``), ties broken lexicographically.

    Runs until the budget is used or every word is a single symbol; the result depends only on the input.
    """
    counts = Counter(words)
    segmented: dict[tuple[str, ...], int] = {}
    for word, n in counts.items():
        symbols = tuple(word[:-1]) + (word[-1] + EOW,)
        segmented[symbols] = segmented.get(symbols, 0) + n
    merges: list[tuple[str, str]] = []
    while len(merges) < budget:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in segmented.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best_count = max(pairs.values())
        best = min(pair for pair, c in pairs.items() if c == best_count)
        merges.append(best)
        merged = best[0] + best[1]
        updated: dict[tuple[str, ...], int] = {}
        for symbols, n in segmented.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            key = tuple(out)
            updated[key] = updated.get(key, 0) + n
        segmented = updated
    return merges


def clip_vocab_and_merges(limit: int = CLIP_VOCAB_LIMIT) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (byte symbols, merges, then BOS and EOS as the two highest ids) and the merge list."""
    alphabet = [_bytes_to_unicode()[b] for b in range(256)]
    base = alphabet + [ch + EOW for ch in alphabet]
    merges = _learn_merges(_PROMPT_WORDS, budget=limit - len(base) - 2)
    tokens = base + [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab, merges


def build_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose base vocabulary fits in ``CLIP_VOCAB_LIMIT`` ids, EOS last, pad = EOS."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=CLIP_EOS,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        model_max_length=CLIP_MAX_LENGTH,
    )


def t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces: specials at T5's fixed ids (pad 0, eos 1, unk 2), words, then single characters."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -6.0)]
    seen = {p for p, _ in pieces}
    for word in _PROMPT_WORDS:
        piece = "\u2581" + word
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -5.0))
    for code in range(ord("!"), ord("~") + 1):
        for piece in (chr(code), "\u2581" + chr(code)):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -9.0))
    return pieces


def build_t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer (no sentinel tokens) over ``t5_vocab()``."""
    return T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=T5_MAX_LENGTH)
