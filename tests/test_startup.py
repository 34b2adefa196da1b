"""Commands that load no model import no heavy library (issue 24, point 9).

`export`, `import`, `show`, `rename`, `remove`, `doctor`, `render --dry-run` and every `--help`
must not import torch, diffusers or transformers' models: one fresh interpreter runs them all
(benchmarks/bench_startup.py --check-imports) and names the first that does. The planner's
tokenizer, built without transformers, gives transformers' ids and hash.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_startup import LIGHT_COMMANDS
from celebctl.models import OPENCLIP_PAD_TOKEN, build_clip_tokenizer, tokenizer_sha256
from celebctl.models.lighttokenizer import (
    PACKAGED_TOKENIZER_SHA256,
    PlanTokenizer,
    packaged_plan_tokenizer,
)
from celebctl.models.tokenizers import clip_vocab_and_merges

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["a photo of alice, riding a bike!", "  Café   naïve ÉCOLE 16:9 <|startoftext|>x",
         "it's 3.14, don't", "日本語 テスト 🙂", "(red:1.2) [dog] \\grace BREAK", "a\tb\nc",
         "", "a!b wow!! <alice> person's hat"]


@pytest.mark.parametrize("pad", ["<|endoftext|>", OPENCLIP_PAD_TOKEN])
def test_the_plan_tokenizer_is_the_clip_tokenizer(pad):
    vocab, merges = clip_vocab_and_merges()
    light = (packaged_plan_tokenizer() if pad == "<|endoftext|>"
             else PlanTokenizer(vocab, [tuple(m) for m in merges], pad_token=pad))
    real = build_clip_tokenizer(pad)
    for text in TEXTS:
        assert light(text, add_special_tokens=False)["input_ids"] == \
            real(text, add_special_tokens=False, verbose=False)["input_ids"], text
    assert (light.bos_token_id, light.eos_token_id, light.pad_token_id) == \
        (real.bos_token_id, real.eos_token_id, real.pad_token_id)
    assert tokenizer_sha256(light) == tokenizer_sha256(real) == PACKAGED_TOKENIZER_SHA256


def test_light_commands_import_no_heavy_library(home, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_startup.py"), "--check-imports",
         str(home), str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    ran = set(report)
    assert {" ".join(c) for c in LIGHT_COMMANDS} <= ran and "render --help" in ran
    assert "basis build --help" in ran and "add-many --help" in ran
    failed = {command: row["exit"] for command, row in report.items() if row["exit"] != 0}
    assert failed == {}, result.stderr[-2000:]
    heavy = {command: row["heavy"] for command, row in report.items() if row["heavy"]}
    assert heavy == {}, f"the first command that imported a heavy library: {next(iter(heavy))}"
