"""The celeb basis computation: celebrity names -> token-embedding rows -> mean + principal
directions (pure tensor code, no files).

For each name, the rows of the text encoder's input token-embedding table at BPE positions 1
and 2 (the two tokens after ``<|startoftext|>``) are gathered. Per position, repeated token ids
are dropped, the rows are centred by their mean and an SVD gives the first ``p`` right singular
vectors. An identity is then ``mean_i + coeffs_i @ components_i`` for i in (1, 2).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BasisMismatch, InvalidOption
from ..storage import special_files

if TYPE_CHECKING:  # pragma: no cover
    import torch

SCHEMA_VERSION = 1
METHOD = "celeb-basis-v1"
DEFAULT_COMPONENTS = 512
POSITIONS = (1, 2)
TENSORS_FILE = "basis.safetensors"
META_FILE = "basis.toml"
PACKAGED_NAMES = "packaged"
ID_LENGTH = 16
CUMULATIVE_AT = (10, 50, 100)
# A fetched basis for SD 1.x is about 3 MB; anything far larger is not a basis.
MAX_TENSORS_BYTES = 64 * 1024 * 1024
MAX_META_BYTES = 4 * 1024 * 1024
MAX_NAMES_BYTES = 16 * 1024 * 1024
# A model whose table was loaded in fp16/bf16 still matches a basis built from its fp32 table:
# the per-position mean of the rows must agree to this relative error (bf16 rounding is ~0.4 %).
MATCH_RTOL = 1e-2
MAX_MEAN_ABS = 1e3
_ID_RE = re.compile(rf"^[0-9a-f]{{{ID_LENGTH}}}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Names


def _note(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def normalize_name(name: str) -> str:
    """Collapse whitespace and NFC-normalise a name (what the tokenizer sees, bar case)."""
    return " ".join(unicodedata.normalize("NFC", name).split())


def _parse_names(text: str, where: str) -> list[str]:
    names = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        names.append(normalize_name(stripped))
    if not names:
        raise InvalidOption(f"{where} has no names: write one name per line "
                            "(blank lines and lines starting with '#' are ignored).")
    return names


def load_names(path: str | Path | None = None) -> list[str]:
    """The names to build a basis from: the packaged list, or one name per line from ``path``.

    Blank lines and lines starting with ``#`` are ignored; duplicates are kept here and dropped
    by :func:`compute_basis`.
    """
    if path is None:
        text = resources.files("celebctl").joinpath("data", "celeb_names.txt").read_text("utf-8")
        return _parse_names(text, "The packaged names list")
    file = Path(path).expanduser()
    try:
        text = special_files.read_regular_file(file, MAX_NAMES_BYTES).decode("utf-8")
    except special_files.FileRefused as exc:
        raise InvalidOption(f"Names file {file} {exc.reason}; pass a text file with one name "
                            "per line.") from None
    except FileNotFoundError as exc:
        raise InvalidOption(f"Names file {file} does not exist.") from exc
    except IsADirectoryError as exc:
        raise InvalidOption(f"Names file {file} is a folder; pass a text file.") from exc
    except UnicodeDecodeError as exc:
        raise InvalidOption(f"Names file {file} is not UTF-8 text.") from exc
    except OSError as exc:
        raise InvalidOption(f"Cannot read names file {file}: {exc.strerror or exc}.") from exc
    return _parse_names(text, f"Names file {file}")


def unique_names(names: Iterable[str]) -> list[str]:
    """Names without repeats; names differing only in case or spacing count as one."""
    seen: dict[str, str] = {}
    for name in names:
        clean = normalize_name(name)
        if clean:
            seen.setdefault(clean.casefold(), clean)
    return list(seen.values())


def names_sha256(names: Iterable[str]) -> str:
    """sha256 of the sorted, case-folded unique names (order and repeats do not matter)."""
    keys = sorted({normalize_name(n).casefold() for n in names if normalize_name(n)})
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


def name_token_ids(names: Sequence[str], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids at BPE positions 1 and 2 for each name.

    Position 1 gets one id per name. A one-token name ("Cher") has no position 2, so it adds
    to position 1 only (the reference code took the end token there, which is not a name part).
    """
    if not names:
        raise InvalidOption("No names to build a basis from.")
    encoded = tokenizer(list(names), add_special_tokens=True, truncation=True).input_ids
    bos = tokenizer.bos_token_id
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    pos1: list[int] = []
    pos2: list[int] = []
    empty = []
    for name, ids in zip(names, encoded, strict=True):
        ids = list(ids)
        if bos is not None and ids and ids[0] == bos:
            ids = ids[1:]
        body = [i for i in ids if i not in specials]
        if not body:
            empty.append(name)
            continue
        pos1.append(body[0])
        if len(body) >= 2:
            pos2.append(body[1])
    if empty:
        shown = ", ".join(repr(n) for n in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise InvalidOption(f"{len(empty)} name(s) give no tokens: {shown}. Each name needs at "
                            "least one word.")
    return pos1, pos2


# --------------------------------------------------------------------------------------------
# The pure computation


@dataclass
class BasisData:
    """A computed basis (tensors on the CPU, fp32) and the counts that describe it."""

    mean: torch.Tensor  # (2, hidden)
    components: torch.Tensor  # (2, p, hidden), orthonormal rows per position
    explained_variance_ratio: torch.Tensor  # (2, p), zero beyond each position's rank
    token_ids: tuple[torch.Tensor, torch.Tensor]  # unique sorted ids per position (int64)
    num_names: int  # unique names used
    single_token_names: int  # names with no position-2 token
    unique_rows: tuple[int, int]
    rank: tuple[int, int]  # directions that carry variance per position
    p: int
    hidden: int


def effective_components(requested: int, hidden: int) -> int:
    """p actually stored: ``min(requested, hidden)``."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise InvalidOption(f"--components must be a positive integer, not {requested!r}.")
    return min(requested, hidden)


def _principal_directions(rows: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                torch.Tensor, int]:
    """(mean, components (p, h), explained variance ratio (p,), rank) of ``rows`` (n, h)."""
    import torch

    rows = rows.to(torch.float64)
    n, hidden = rows.shape
    mean = rows.mean(dim=0)
    centred = rows - mean
    # full_matrices: when n-1 < p the basis is completed with orthonormal zero-variance
    # directions, so every position stores exactly p components (as in the paper, p = 512).
    # One thread: for matrices this small, MKL's threaded SVD gains nothing and, when the
    # cores are busy, its OpenMP spin-waits turn 0.1 s into 10 s or more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, singular, vh = torch.linalg.svd(centred, full_matrices=n - 1 < p)
    finally:
        torch.set_num_threads(threads)
    rank = min(n - 1, hidden)
    variance = torch.zeros(hidden, dtype=torch.float64)
    variance[: singular.shape[0]] = singular**2
    total = variance.sum()
    ratio = variance / total if total > 0 else variance
    ratio[rank:] = 0.0  # beyond n-1 the singular values are rounding noise
    components = vh[:p].clone()
    # Fix the sign freedom: the largest-magnitude entry of each direction is positive.
    idx = components.abs().argmax(dim=1)
    signs = torch.sign(components[torch.arange(p), idx])
    signs[signs == 0] = 1.0
    components *= signs[:, None]
    return mean, components, ratio[:p], rank


def compute_basis(names: Sequence[str], tokenizer: Any, table: Any,
                  components: int = DEFAULT_COMPONENTS) -> BasisData:
    """Compute the celeb basis of ``table`` (vocab, hidden) for ``names`` with ``tokenizer``.

    p = min(components, hidden) for both positions; directions past a position's rank
    (unique rows - 1) carry zero explained variance.
    """
    import torch

    table = table.detach()
    if table.dim() != 2:
        raise InvalidOption(f"The embedding table must be 2-D, not {tuple(table.shape)}.")
    vocab, hidden = table.shape
    p = effective_components(components, hidden)
    names = unique_names(names)
    pos1, pos2 = name_token_ids(names, tokenizer)
    means, comps, ratios, ranks, uniques, ids_out = [], [], [], [], [], []
    for position, ids in zip(POSITIONS, (pos1, pos2), strict=True):
        unique = sorted(set(ids))
        if len(unique) < 2:
            raise InvalidOption(
                f"Position {position} has {len(unique)} distinct token(s); a basis needs names "
                "with at least 2 different tokens there. Add more names."
            )
        if unique[-1] >= vocab:
            raise BasisMismatch(f"The tokenizer gives token id {unique[-1]} but the embedding "
                                f"table has only {vocab} rows: they are not from one model.")
        index = torch.tensor(unique, dtype=torch.long)
        rows = table.index_select(0, index.to(table.device)).to("cpu", torch.float64)
        mean, direction, ratio, rank = _principal_directions(rows, p)
        means.append(mean)
        comps.append(direction)
        ratios.append(ratio)
        ranks.append(rank)
        uniques.append(len(unique))
        ids_out.append(index)
    return BasisData(
        mean=torch.stack(means).to(torch.float32).contiguous(),
        components=torch.stack(comps).to(torch.float32).contiguous(),
        explained_variance_ratio=torch.stack(ratios).to(torch.float32).contiguous(),
        token_ids=(ids_out[0], ids_out[1]),
        num_names=len(names),
        single_token_names=len(pos1) - len(pos2),
        unique_rows=(uniques[0], uniques[1]),
        rank=(ranks[0], ranks[1]),
        p=p,
        hidden=hidden,
    )


def basis_id_for(embedding_sha256: str, tokenizer_sha256: str, names_sha256: str,
                 components: int) -> str:
    """The basis id: 16 hex chars of sha256 over everything the basis depends on (p stored)."""
    text = "\n".join([METHOD, embedding_sha256, tokenizer_sha256, names_sha256, str(components)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_LENGTH]
