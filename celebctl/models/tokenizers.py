"""The CLIP tokenizer built from the packaged BPE vocabulary, and token-embedding tables.

Both SD families' text encoders (OpenAI CLIP ViT-L/14, OpenCLIP ViT-H and ViT-bigG) use the
same BPE vocabulary; they differ only in the padding token. Hashes of the tokenizer and of the
embedding table identify a basis's model.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..errors import ModelUnavailable

if TYPE_CHECKING:  # pragma: no cover
    import torch

# OpenAI CLIP's BPE file: 1 header line, then merges; CLIP uses the first 49152-256-2 of them.
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77



def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map, in its order (the first 256 vocab entries)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary and merges, rebuilt from the packaged BPE file."""
    raw = resources.files("celebctl").joinpath("data", _BPE_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:_NUM_MERGES + 1])
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    vocab_list += ["".join(pair) for pair in merges]
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    if len(vocab) != CLIP_VOCAB_SIZE:  # pragma: no cover - a damaged package
        raise ModelUnavailable(f"The packaged CLIP vocabulary has {len(vocab)} entries, "
                               f"not {CLIP_VOCAB_SIZE}; reinstall celebctl.")
    return vocab, merges  # type: ignore[return-value]


# OpenCLIP's text towers (SD 2.x's ViT-H, SDXL's second encoder ViT-bigG) use the same BPE
# vocabulary as OpenAI's CLIP but pad with "!" (token 0) instead of the end token.
OPENCLIP_PAD_TOKEN = "!"


def build_clip_tokenizer(pad_token: str = EOS_TOKEN) -> Any:
    """The real CLIP tokenizer, built offline from the packaged BPE merges.

    ``pad_token`` is the end token for OpenAI CLIP ViT-L/14 (SD 1.x, SDXL's first encoder) and
    :data:`OPENCLIP_PAD_TOKEN` for OpenCLIP (SD 2.x, SDXL's second encoder).
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    # transformers 5's tokenizers-backed CLIPTokenizer takes the vocab and merges in memory.
    return CLIPTokenizer(
        vocab=dict(vocab), merges=[tuple(m) for m in merges], bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )


def _tokenizer_merges(tokenizer: Any) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = model.get("merges", [])
        return [m if isinstance(m, str) else " ".join(m) for m in merges]
    ranks = getattr(tokenizer, "bpe_ranks", None)  # slow tokenizers
    if ranks:
        return [" ".join(pair) for pair, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    return []


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (sorted JSON) and its merges list."""
    digest = hashlib.sha256()
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True, ensure_ascii=False)
                  .encode("utf-8"))
    digest.update(b"\0")
    digest.update("\n".join(_tokenizer_merges(tokenizer)).encode("utf-8"))
    return digest.hexdigest()


# ---- embedding tables


def embedding_table(text_encoder: Any) -> torch.Tensor:
    """The input token-embedding table (vocab, hidden) of a text encoder, without a copy; of
    several encoders (SDXL's two), their tables side by side (vocab, hidden_1 + hidden_2)."""
    if isinstance(text_encoder, (list, tuple)):
        import torch

        tables = [embedding_table(encoder) for encoder in text_encoder]
        if len(tables) == 1:
            return tables[0]
        return torch.cat([t.detach().float() for t in tables], dim=1)
    return text_encoder.get_input_embeddings().weight


def embedding_table_sha256(table: Any) -> str:
    """sha256 of the table's shape and its fp32 contiguous CPU bytes."""
    import torch

    data = table.detach().to(device="cpu", dtype=torch.float32).contiguous()
    digest = hashlib.sha256()
    digest.update(("fp32:" + "x".join(str(n) for n in data.shape) + ";").encode("ascii"))
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()
