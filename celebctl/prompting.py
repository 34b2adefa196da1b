"""Prompt text -> identities found -> token ids with slots -> prompt embeddings.

Pure functions: nothing here mutates a tokenizer or a text encoder. An identity named in a
prompt expands in place to its two token vectors; the text encoder's own embedding table is
used for every other token, and the identity's vectors are put into the slots on the way in.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from . import emphasis
from .emphasis import BREAK
from .errors import IdentityNotFound, PromptError, did_you_mean

TOKENS_PER_IDENTITY = 2
MAX_PROMPT_CHARS = 4000
# A name occurrence: an optional "<...>" explicit form, or a bare word at word boundaries.
# Word characters are Unicode-aware (\w) plus '-', since names may contain hyphens: "malice",
# "Ñalice" and "alice-like" do not name alice.
_NOT_BEFORE = r"[\w\-<]"
_NOT_AFTER = r"[\w\->]"
# Apostrophes inside a word ("don't", "it's", "o'brien") join it: a name never starts right after
# one that follows a letter, and a name followed by one only counts when what follows is the
# possessive "s" ("alice's") or nothing ("james'"). A quoted name ('alice') still counts.
_APOSTROPHES = "'\u2019\u02bc"
_IN_WORD_BEFORE = rf"(?<!\w[{_APOSTROPHES}])"
_IN_WORD_AFTER = rf"(?![{_APOSTROPHES}](?!s(?![\w\-]))\w)"
_EXPLICIT = re.compile(r"<([A-Za-z][A-Za-z0-9_\-]{0,31})>")


@dataclass(frozen=True)
class IdentityMention:
    """One place in the prompt where an identity is named."""

    name: str
    start: int
    end: int
    explicit: bool


@dataclass
class ParsedPrompt:
    """A prompt split into plain text, identity mentions and BREAK markers.

    ``weights`` gives each segment's attention weight (the WebUI syntax, :mod:`.emphasis`);
    an empty list means every weight is 1.
    """

    text: str
    segments: list[str | IdentityMention | Any] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def weight_of(self, index: int) -> float:
        return self.weights[index] if self.weights else 1.0

    @property
    def weighted(self) -> bool:
        """True when some segment has a weight other than 1 or the prompt has a BREAK."""
        return any(w != 1.0 for w in self.weights) or any(s is BREAK for s in self.segments)

    @property
    def identities(self) -> list[str]:
        """Distinct identity names in order of first mention."""
        seen: list[str] = []
        for seg in self.segments:
            if isinstance(seg, IdentityMention) and seg.name not in seen:
                seen.append(seg.name)
        return seen

    def plain(self) -> str:
        """The prompt as typed, without the weighting syntax."""
        return " ".join(" ".join(item.text for item in emphasis.parse(self.text)
                                 if item is not BREAK).split())

    def expanded(self, style: str = "angle") -> str:
        """The prompt with weights and BREAKs written back in the WebUI syntax and each identity
        as another tool names its embedding: ``angle`` `<name>` (diffusers, and celebctl's own
        explicit form), ``webui`` the bare name (the WebUI matches an embedding by its file
        name), ``comfyui`` `embedding:name` followed by a space or comma (ComfyUI reads the
        name up to the next space, so "embedding:alice's" would name no file)."""
        if style not in ("angle", "webui", "comfyui"):
            raise ValueError(f"unknown style {style!r}")
        fragments: list[Any] = []
        for index, seg in enumerate(self.segments):
            if seg is BREAK:
                fragments.append(BREAK)
                continue
            if isinstance(seg, IdentityMention):
                text = {"angle": f"<{seg.name}>", "webui": seg.name,
                        "comfyui": f"embedding:{seg.name}"}[style]
                following = self.segments[index + 1] if index + 1 < len(self.segments) else ""
                if style == "comfyui" and isinstance(following, str) and following[:1] not in (
                        "", " ", ","):
                    text += " "
            else:
                text = seg
            weight = self.weight_of(index)
            last = fragments[-1] if fragments else None
            if isinstance(last, emphasis.Fragment) and last.weight == weight:
                fragments[-1] = emphasis.Fragment(last.text + text, weight)
            else:
                fragments.append(emphasis.Fragment(text, weight))
        return emphasis.render(fragments).strip()


# After an identity, a prompt says what it is, as every training caption did ("face of <alice>
# person") and as the reference's prompts do ("a sks person riding a bike"). These words already
# do that, so no "person" is added before them.
PERSON_NOUNS = frozenset(
    """person persons people man men woman women boy boys girl girls child children kid kids
    baby babies guy guys lady ladies gentleman gentlemen human humans teenager teenagers teen
    teens adult adults""".split()
)
PERSON_WORD = "person"
_POSSESSIVE = re.compile(rf"[{_APOSTROPHES}]s?(?![\w\-])")
_NEXT_WORD = re.compile(r"\s*([A-Za-z]+)")


def with_person_nouns(parsed: ParsedPrompt) -> ParsedPrompt:
    """``parsed`` with " person" after each identity that is not directly followed by a person
    noun ("alice riding a bike" -> "<alice> person riding a bike"; "alice woman" stays).

    A possessive keeps its place after the added word: "alice's hat" -> "<alice> person's hat",
    which is how "the person's hat" reads to the text encoder. The inserted word is a plain text
    segment, so it is tokenised, counted and shown like any other word.
    """
    segments: list[Any] = []
    weights: list[float] = []
    items = parsed.segments
    for index, seg in enumerate(items):
        segments.append(seg)
        weights.append(parsed.weight_of(index))
        if not isinstance(seg, IdentityMention):
            continue
        following = items[index + 1] if index + 1 < len(items) else ""
        following = following if isinstance(following, str) else ""
        possessive = _POSSESSIVE.match(following)
        rest = following[possessive.end():] if possessive else following
        word = _NEXT_WORD.match(rest)
        if not possessive and word and word.group(1).lower() in PERSON_NOUNS:
            continue
        segments.append(f" {PERSON_WORD}")
        weights.append(parsed.weight_of(index))  # the identity's weight
    return ParsedPrompt(text=parsed.text, segments=segments,
                        weights=weights if parsed.weights else [])


def clean_prompt(text: str, allow_empty: bool = False, label: str = "prompt") -> str:
    """Normalise a prompt: NFC, whitespace runs to one space; refuse what cannot be rendered.

    An empty prompt is an error unless ``allow_empty`` (negative prompts may be empty).
    ``label`` names the text in messages ("negative prompt").
    """
    if not isinstance(text, str):
        raise PromptError(f"The {label} must be text.")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(
            f"The {label} is {len(text):,} characters long; celebctl takes at most "
            f"{MAX_PROMPT_CHARS:,}. It encodes at most {MAX_CHUNKS} chunks of {CHUNK_TOKENS} "
            f"tokens ({MAX_CHUNKS * CHUNK_TOKENS} tokens, about {MAX_PROMPT_CHARS:,} characters "
            "of English): the text encoder reads 75 tokens at a time, and each chunk is one more "
            "pass of it and a longer cross-attention in every denoising step. Shorten it."
        )
    text = unicodedata.normalize("NFC", text)
    bad = [c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r"]
    if bad:
        raise PromptError(
            f"The {label} contains control characters "
            f"({', '.join(sorted({repr(c) for c in bad})[:8])}); remove them."
        )
    text = " ".join(text.split())
    if not text and not allow_empty:
        raise PromptError("The prompt is empty. Describe the picture, e.g. \"a photo of alice\".")
    return text


def word_name_note(name: str) -> str | None:
    """A warning when ``name`` is also a word prompts commonly use, else None.

    Only names in ``data/word_names.txt`` (grace, will, rose, mark, hope, ...) warn: such a name
    takes over that word in every prompt ("dancing with grace" draws the identity grace).
    ``\\grace`` writes the plain word. Most given names (alice, bob) are in CLIP's vocabulary
    too but rarely appear in a prompt as anything else, so they do not warn.
    """
    if name.lower() not in common_word_names():
        return None
    return (f"'{name}' is also an ordinary word that prompts use: every '{name}' in a prompt "
            f"draws this identity, \"dancing with {name}\" too. "
            f"Write \\{name} for the plain word, or pick a name that is not a word.")


@lru_cache(maxsize=1)
def common_word_names() -> frozenset[str]:
    """The given names that prompts commonly use as words (``data/word_names.txt``)."""
    from importlib import resources

    text = resources.files("celebctl").joinpath("data", "word_names.txt").read_text("utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines()
                     if line.strip() and not line.startswith("#"))


def parse_prompt(text: str, known: Iterable[str], allow_empty: bool = False,
                 explicit_only: bool = False, label: str = "prompt") -> ParsedPrompt:
    """Find registered identities in ``text``, which may use the WebUI's weighting syntax.

    Bare words match case-insensitively at word boundaries ("Alice's" finds alice, "malice"
    does not); `<name>` is the explicit form and must name a registered identity. ``\\grace``
    is the plain word "grace" even when an identity has that name, and with ``explicit_only``
    only `<name>` names identities. An identity inside a weighted group gets its weight. An
    empty ``text`` raises PromptError unless ``allow_empty`` (for negative prompts); ``label``
    names the text in messages ("negative prompt").
    """
    text = clean_prompt(text, allow_empty=allow_empty, label=label)
    known_set = {k.lower() for k in known}
    parsed = ParsedPrompt(text=text)
    for item in emphasis.parse(text, keep_escaped=known_set, label=label):
        if item is BREAK:
            parsed.segments.append(BREAK)
            parsed.weights.append(1.0)
            continue
        for seg in _find_identities(item.text, known_set, explicit_only):
            parsed.segments.append(seg)
            parsed.weights.append(item.weight)
    if all(w == 1.0 for w in parsed.weights):
        parsed.weights = []
    return parsed


def _find_identities(text: str, known_set: set[str], explicit_only: bool = False
                     ) -> list[str | IdentityMention]:
    """``text`` (one weighted fragment) split into plain text and identity mentions."""
    mentions: list[IdentityMention] = []
    for match in _EXPLICIT.finditer(text):
        name = match.group(1).lower()
        if name not in known_set:
            raise IdentityNotFound(name, sorted(known_set))
        mentions.append(IdentityMention(name, match.start(), match.end(), True))
    if known_set and not explicit_only:
        names = sorted(known_set, key=len, reverse=True)
        bare = re.compile(
            rf"(?<!{_NOT_BEFORE}){_IN_WORD_BEFORE}(?<!\\)"
            rf"({'|'.join(re.escape(n) for n in names)})(?!{_NOT_AFTER}){_IN_WORD_AFTER}",
            re.IGNORECASE,
        )
        taken = [(m.start, m.end) for m in mentions]
        for match in bare.finditer(text):
            name = match.group(1).lower()
            if any(s <= match.start() < e for s, e in taken):
                continue
            # Unicode case folding can match a look-alike ("alİce"), and a combining mark after
            # the name makes it part of another word.
            if name not in known_set or (
                match.end() < len(text) and unicodedata.category(text[match.end()]).startswith("M")
            ):
                continue
            mentions.append(IdentityMention(name, match.start(), match.end(), False))
    mentions.sort(key=lambda m: m.start)
    segments: list[str | IdentityMention] = []
    cursor = 0

    def plain(piece: str) -> str:
        # "\grace" writes the plain word: drop the backslash before a registered name.
        if not known_set:
            return piece
        pattern = "|".join(re.escape(n) for n in sorted(known_set, key=len, reverse=True))
        return re.sub(rf"\\(?=(?:{pattern})(?![\w\-]))", "", piece, flags=re.IGNORECASE)

    for mention in mentions:
        if mention.start > cursor:
            segments.append(plain(text[cursor:mention.start]))
        segments.append(mention)
        cursor = mention.end
    if cursor < len(text):
        segments.append(plain(text[cursor:]))
    return segments


@dataclass
class TokenizedPrompt:
    """Token ids padded to the model window, and where each identity's vectors go."""

    input_ids: list[int]
    slots: list[tuple[int, str, int]]  # (position, identity name, vector index 0/1)
    length: int  # tokens used, including start and end
    weights: list[float] = field(default_factory=list)  # per position; empty: all 1


# Long prompts are encoded in chunks of 75 tokens, as the WebUI does; a chunk breaks after the
# last comma when that comma is within this many tokens of its end.
CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20
MAX_CHUNKS = 12


def tokenize_chunks(parsed: ParsedPrompt, tokenizer: Any, label: str = "prompt",
                    max_chunks: int = MAX_CHUNKS) -> list[TokenizedPrompt]:
    """``parsed`` as one or more 77-token windows, the WebUI's way: 75 tokens each between
    the start and end tokens, a new chunk at BREAK or when one is full (after the last comma if
    it is near the end), an identity's two slots never split. Each window carries the weight of
    every position. Raises PromptError past ``max_chunks`` chunks."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer(",", add_special_tokens=False, verbose=False)["input_ids"]
    comma_id = comma[0] if len(comma) == 1 else None
    # Groups that stay together: one text token, or an identity's two slots.
    groups: list[Any] = []
    for index, seg in enumerate(parsed.segments):
        weight = parsed.weight_of(index)
        if seg is BREAK:
            groups.append(BREAK)
        elif isinstance(seg, IdentityMention):
            groups.append([(0, weight, (seg.name, k)) for k in range(TOKENS_PER_IDENTITY)])
        elif seg.strip():
            ids = tokenizer(seg, add_special_tokens=False, verbose=False)["input_ids"]
            groups.extend([(token, weight, None)] for token in ids)
    chunks: list[list[tuple[int, float, Any]]] = []
    current: list[tuple[int, float, Any]] = []
    last_comma = -1  # index in ``current`` of its last comma
    # The WebUI's order of rules, token by token: note a comma; at a full chunk, move what
    # follows a comma at most COMMA_BACKTRACK tokens back into the next chunk; start a new
    # chunk when full, or when an identity's two slots would not fit.
    for group in groups:
        if group is BREAK:
            chunks.append(current)
            current, last_comma = [], -1
            continue
        is_comma = comma_id is not None and group[0][0] == comma_id and group[0][2] is None
        if is_comma:
            last_comma = len(current)
        elif (len(current) == CHUNK_TOKENS and last_comma >= 0
              and len(current) - last_comma <= COMMA_BACKTRACK):
            chunks.append(current[:last_comma + 1])
            current, last_comma = current[last_comma + 1:], -1
        if len(current) == CHUNK_TOKENS or len(current) + len(group) > CHUNK_TOKENS:
            chunks.append(current)
            current, last_comma = [], -1
        current.extend(group)
    if current or not chunks:
        chunks.append(current)
    if len(chunks) > max_chunks:
        raise PromptError(
            f"The {label} needs {len(chunks)} chunks of {CHUNK_TOKENS} tokens; celebctl encodes "
            f"at most {max_chunks}. Shorten it.")
    windows = []
    for chunk in chunks:
        ids = [bos] + [token for token, _, _ in chunk] + [eos]
        weights = [1.0] + [weight for _, weight, _ in chunk] + [1.0]
        slots = [(position + 1, slot[0], slot[1])
                 for position, (_, _, slot) in enumerate(chunk) if slot is not None]
        length = len(ids)
        ids += [pad] * (CHUNK_TOKENS + 2 - length)
        weights += [1.0] * (CHUNK_TOKENS + 2 - length)
        windows.append(TokenizedPrompt(input_ids=ids, slots=slots, length=length,
                                       weights=weights))
    return windows


def tokenize_prompt(parsed: ParsedPrompt, tokenizer: Any, placeholder_id: int | None = None,
                    label: str = "prompt") -> TokenizedPrompt:
    """Token ids for ``parsed`` with two slot positions per identity mention.

    Plain text segments are tokenised on their own; CLIP's tokenizer splits at spaces and
    punctuation, so this equals tokenising the whole text with the identities cut out.
    Raises PromptError when the prompt is longer than the model's window; ``label`` names
    the prompt in that message ("negative prompt").
    """
    window = int(getattr(tokenizer, "model_max_length", 77))
    if window > 1024:  # some tokenizers report a huge sentinel when unset
        window = 77
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # The slot id is never seen by the model (its embedding is replaced); it must not be the end
    # token, because CLIP pools at the first/maximal end token.
    slot_id = 0 if placeholder_id is None else placeholder_id
    ids: list[int] = [bos]
    slots: list[tuple[int, str, int]] = []
    for seg in parsed.segments:
        if isinstance(seg, IdentityMention):
            for k in range(TOKENS_PER_IDENTITY):
                slots.append((len(ids), seg.name, k))
                ids.append(slot_id)
        elif seg.strip():
            # verbose=False: a long segment must not make transformers log a warning.
            ids.extend(tokenizer(seg, add_special_tokens=False, verbose=False)["input_ids"])
    ids.append(eos)
    if len(ids) > window:
        over = len(ids) - window
        raise PromptError(
            f"The {label} is {len(ids) - 2} tokens long; the model reads at most {window - 2} "
            f"(each identity counts {TOKENS_PER_IDENTITY}). Shorten it by {over} token"
            f"{'s' if over != 1 else ''}."
        )
    length = len(ids)
    ids.extend([pad] * (window - length))
    return TokenizedPrompt(input_ids=ids, slots=slots, length=length)


def identity_vectors(coefficients, mean, components):
    """The identity's token embeddings: mean[i] + coefficients[i] @ components[i], i = 0, 1.

    ``coefficients`` (2, p), ``mean`` (2, hidden), ``components`` (2, p, hidden); torch tensors.
    Differentiable in ``coefficients`` (the fit uses it too).
    """
    import torch

    return mean + torch.einsum("...tp,tph->...th", coefficients, components)


def encode_tokens(text_encoder, input_ids, slot_mask=None, slot_values=None):
    """Run a frozen CLIP text encoder with some input-token embeddings replaced.

    ``input_ids`` (B, L) long; ``slot_mask`` (B, L) bool; ``slot_values`` (B, L, hidden): at masked
    positions the token embedding is replaced by the value (gradients flow into it). The
    encoder's weights are untouched: a forward hook on the embedding lookup, removed on return,
    swaps the rows. Returns the last hidden state (B, L, hidden).
    """
    import torch

    embedding = text_encoder.get_input_embeddings()
    handle = None
    if slot_mask is not None and bool(slot_mask.any()):

        def swap_rows(module, inputs, output):
            values = slot_values.to(device=output.device, dtype=output.dtype)
            return torch.where(slot_mask.to(output.device)[..., None], values, output)

        handle = embedding.register_forward_hook(swap_rows)
    try:
        output = text_encoder(input_ids.to(embedding.weight.device))
    finally:
        if handle is not None:
            handle.remove()
    return output[0]


def build_slot_tensors(prompts: Sequence[TokenizedPrompt], vectors: dict[str, Any],
                       hidden: int, device=None, dtype=None):
    """Batch token ids, slot mask and slot values for a list of tokenised prompts.

    ``vectors`` maps identity name -> (2, hidden) tensor (may require grad).
    """
    import torch

    ids = torch.tensor([p.input_ids for p in prompts], dtype=torch.long, device=device)
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    rows = []
    for b, prompt in enumerate(prompts):
        for position, name, k in prompt.slots:
            mask[b, position] = True
            rows.append((b, position, vectors[name][k]))
    if not rows:
        return ids, None, None
    values = torch.zeros((*ids.shape, hidden), device=device,
                         dtype=dtype or next(iter(vectors.values())).dtype)
    # index_put keeps the graph to the identity vectors (values starts as a constant).
    b_index = torch.tensor([r[0] for r in rows], device=device)
    p_index = torch.tensor([r[1] for r in rows], device=device)
    # Vectors may live on the CPU while the encoder is on a GPU.
    stacked = torch.stack([r[2] for r in rows]).to(device=values.device, dtype=values.dtype)
    values = values.index_put((b_index, p_index), stacked)
    return ids, mask, values


def encode_prompts(text_encoder, tokenizer, parsed_prompts: Sequence[ParsedPrompt],
                   vectors: dict[str, Any]):
    """Prompt embeddings (B, 77, hidden) for parsed prompts naming identities in ``vectors``."""
    tokenized = [tokenize_prompt(p, tokenizer) for p in parsed_prompts]
    hidden = text_encoder.get_input_embeddings().weight.shape[1]
    device = text_encoder.get_input_embeddings().weight.device
    ids, mask, values = build_slot_tensors(tokenized, vectors, hidden, device=device)
    return encode_tokens(text_encoder, ids, mask, values)


def suggest_identity(word: str, known: Iterable[str]) -> str | None:
    """A close registered name for an unknown word, if any."""
    return did_you_mean(word.lower(), list(known))
