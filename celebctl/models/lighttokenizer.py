"""The CLIP tokenizer without transformers: the same pipeline on the `tokenizers` library alone.

Planning a prompt (`render --dry-run`, the token counts every render checks first) needs only a
tokenizer, and importing transformers costs seconds. :class:`PlanTokenizer` builds what
transformers' ``CLIPTokenizer`` builds (BPE with the ``</w>`` suffix, NFC + whitespace +
lowercase normalisation, CLIP's split pattern, byte-level pre-tokenisation, the start and end
tokens as special tokens) and answers the few calls the planner makes. ``tests/
test_startup.py`` checks that both give the same ids and the same hash.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from .tokenizers import BOS_TOKEN, EOS_TOKEN, clip_vocab_and_merges

_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
          r"""|[^\s\p{L}\p{N}]+""")


class PlanTokenizer:
    """A CLIP tokenizer for counting and planning: ``tokenizer(text, add_special_tokens=False)
    ["input_ids"]``, the special token ids, ``get_vocab()`` and ``backend_tokenizer``."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
                 pad_token: str = EOS_TOKEN):
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        backend = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), dropout=None,
                                continuing_subword_prefix="", end_of_word_suffix="</w>",
                                fuse_unk=False, unk_token=EOS_TOKEN))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        specials = list(dict.fromkeys([BOS_TOKEN, EOS_TOKEN, pad_token]))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in specials])
        self.backend_tokenizer = backend
        self.bos_token_id = backend.token_to_id(BOS_TOKEN)
        self.eos_token_id = backend.token_to_id(EOS_TOKEN)
        self.pad_token_id = backend.token_to_id(pad_token)

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list]:
        ids = self.backend_tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            ids = [self.bos_token_id, *ids, self.eos_token_id]
        return {"input_ids": ids}

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included (as transformers gives it)."""
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)


# tokenizer_sha256 of the packaged vocabulary (any pad token: "!" is in the vocabulary). Hashing
# 49,408 entries takes a second a process; tests/test_startup.py recomputes it from the file.
PACKAGED_TOKENIZER_SHA256 = "a585be00c916322bebaca97b7c2bd151e7c79dff4954df7c5b7eb20bc5328173"


@lru_cache(maxsize=1)
def packaged_plan_tokenizer() -> PlanTokenizer:
    """The packaged CLIP vocabulary as a :class:`PlanTokenizer` (built once per process)."""
    vocab, merges = clip_vocab_and_merges()
    return PlanTokenizer(vocab, [tuple(m) for m in merges])


def folder_plan_tokenizer(folder: Path) -> PlanTokenizer | None:
    """A diffusers folder's ``tokenizer/`` (vocab.json, merges.txt, its pad token) as a
    :class:`PlanTokenizer`; None when it is not a CLIP BPE tokenizer read this way."""
    try:
        vocab = json.loads((folder / "vocab.json").read_text("utf-8"))
        lines = (folder / "merges.txt").read_text("utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines
                  if line.strip() and not line.startswith("#version")]
        pad = EOS_TOKEN
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = folder / name
            if path.is_file():
                value = json.loads(path.read_text("utf-8")).get("pad_token")
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    pad = value
                    break
        if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges) or pad not in vocab:
            return None
        return PlanTokenizer(vocab, merges, pad_token=pad)
    except Exception:  # noqa: BLE001 - any unreadable or odd file
        return None  # the caller falls back to transformers' own reading
