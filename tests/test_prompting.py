"""Prompt parsing, tokenising and encoding (pure functions; no registry, no diffusion model)."""

from __future__ import annotations

import copy

import pytest

from celebctl import models
from celebctl.errors import IdentityNotFound, PromptError
from celebctl.prompting import (
    IdentityMention,
    build_slot_tensors,
    encode_prompts,
    encode_tokens,
    identity_vectors,
    parse_prompt,
    tokenize_prompt,
)

KNOWN = ["alice", "bob", "mary-jane", "al_2"]


@pytest.fixture
def tokenizer():
    # Function scope (see test_models.py); building it from the packaged BPE takes ~1 s.
    return _cached_tokenizer()


_TOKENIZER = []


def _cached_tokenizer():
    if not _TOKENIZER:
        _TOKENIZER.append(models.build_clip_tokenizer())
    return _TOKENIZER[0]


def _mentions(text, known=KNOWN):
    parsed = parse_prompt(text, known)
    return [(s.name, text_at(parsed, s)) for s in parsed.segments
            if isinstance(s, IdentityMention)]


def text_at(parsed, mention):
    return parsed.text[mention.start:mention.end]


# --------------------------------------------------------------------------------------------
# parsing


def test_bare_names_match_case_insensitively_at_word_boundaries():
    parsed = parse_prompt("Alice shaking hands with BOB", KNOWN)
    assert parsed.identities == ["alice", "bob"]
    assert parsed.expanded() == "<alice> shaking hands with <bob>"


@pytest.mark.parametrize("text", [
    "malice in the garden", "alicent", "a palace for bobby", "kebob", "alice2", "bob_",
    "Ñalice", "alice\u0332 underlined", "thealice", "alice-like smile", "bob-o-link",
])
def test_names_inside_other_words_are_untouched(text):
    parsed = parse_prompt(text, KNOWN)
    assert parsed.identities == []
    assert parsed.expanded() == parsed.text


@pytest.mark.parametrize("text, found", [
    ("alice's dog", ["alice"]),
    ("Alice\u2019s dog", ["alice"]),
    ("(alice), bob. alice!", ["alice", "bob", "alice"]),
    ("alice,bob;alice:bob", ["alice", "bob", "alice", "bob"]),
    ('"alice" and [bob]', ["alice", "bob"]),
    ("mary-jane and mary", ["mary-jane"]),
    ("al_2 at work", ["al_2"]),
    ("a photo of alice-", []),
    ("alice - bob", ["alice", "bob"]),
])
def test_punctuation_possessives_and_hyphens(text, found):
    assert [name for name, _ in _mentions(text)] == found


def test_explicit_form():
    parsed = parse_prompt("<Alice> next to <bob>'s car", KNOWN)
    assert parsed.identities == ["alice", "bob"]
    assert parsed.expanded() == "<alice> next to <bob>'s car"
    assert all(s.explicit for s in parsed.segments if isinstance(s, IdentityMention))


def test_unknown_explicit_name_suggests_the_closest():
    with pytest.raises(IdentityNotFound) as info:
        parse_prompt("a photo of <alise>", KNOWN)
    assert str(info.value) == "No identity 'alise'. Did you mean 'alice'? See `celebctl list`."
    with pytest.raises(IdentityNotFound) as info:
        parse_prompt("<zzzzzz>", KNOWN)
    assert "Did you mean" not in str(info.value)


def test_unknown_bare_word_is_plain_text():
    assert parse_prompt("alise in wonderland", KNOWN).identities == []


def test_whitespace_is_normalised():
    parsed = parse_prompt("  alice \n\t at   the beach  ", KNOWN)
    assert parsed.text == "alice at the beach"


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_prompt(text):
    with pytest.raises(PromptError, match="The prompt is empty"):
        parse_prompt(text, KNOWN)
    assert parse_prompt(text, KNOWN, allow_empty=True).segments == []


def test_huge_prompt_is_refused_early():
    with pytest.raises(PromptError, match=r"10,000 characters long.*Shorten it"):
        parse_prompt("a" * 10_000, KNOWN)


def test_the_length_limit_message_says_the_real_limit_and_names_the_negative():
    # The limit is 12 chunks of 75 tokens, not one 77-token window: 2,000 characters render.
    with pytest.raises(PromptError) as caught:
        parse_prompt("a" * 6_005, KNOWN)
    message = str(caught.value)
    assert message.startswith("The prompt is 6,005 characters long; celebctl takes at most 4,000")
    assert "12 chunks of 75 tokens (900 tokens" in message and "77 tokens" not in message
    with pytest.raises(PromptError, match="^The negative prompt is 6,005 characters long"):
        parse_prompt("a" * 6_005, KNOWN, allow_empty=True, label="negative prompt")
    with pytest.raises(PromptError, match="^The negative prompt contains control characters"):
        parse_prompt("a\x00", KNOWN, allow_empty=True, label="negative prompt")


@pytest.mark.parametrize("bad", ["\x00", "\x1b[31m", "\x07", "\x7f"])
def test_control_characters_are_refused(bad):
    with pytest.raises(PromptError, match="control characters"):
        parse_prompt(f"alice {bad} bob", KNOWN)


def test_rtl_and_combining_text(tokenizer):
    text = "\u0635\u0648\u0631\u0629 alice \u05e9\u05dc\u05d5\u05dd \u202ebob\u202c"
    parsed = parse_prompt(text, KNOWN)
    assert parsed.identities == ["alice", "bob"]
    tokens = tokenize_prompt(parsed, tokenizer)
    assert len(tokens.slots) == 4
    # e + combining acute composes to é under NFC: "alicé" is another word.
    assert parse_prompt("alice\u0301 smiles", KNOWN).identities == []


def test_non_string_prompt():
    with pytest.raises(PromptError, match="must be text"):
        parse_prompt(None, KNOWN)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# tokenising


def test_tokenize_puts_two_slots_per_mention(tokenizer):
    parsed = parse_prompt("a photo of alice at the beach with bob", KNOWN)
    tokens = tokenize_prompt(parsed, tokenizer)
    plain = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = ([tokenizer.bos_token_id] + plain("a photo of") + [0, 0] + plain("at the beach with")
                + [0, 0] + [tokenizer.eos_token_id])
    assert tokens.input_ids[:tokens.length] == expected
    assert len(tokens.input_ids) == 77
    assert tokens.input_ids[tokens.length:] == [tokenizer.pad_token_id] * (77 - tokens.length)
    assert [(name, k) for _, name, k in tokens.slots] == [("alice", 0), ("alice", 1),
                                                          ("bob", 0), ("bob", 1)]
    assert [p for p, _, _ in tokens.slots] == [4, 5, 10, 11]


def test_tokenize_text_equals_whole_text_tokenisation(tokenizer):
    # Segments are tokenised apart; for CLIP this equals tokenising the text as a whole.
    # (Escaped brackets: plain parentheses are the WebUI's weighting syntax.)
    text = "alice's portrait, oil on canvas; bob \\(smiling\\) in 1920s style!"
    parsed = parse_prompt(text, KNOWN)
    tokens = tokenize_prompt(parsed, tokenizer)
    body = [i for i in tokens.input_ids[1:tokens.length - 1] if i != 0]
    without = text.replace("\\", "").replace("alice", " ").replace("bob", " ")
    assert body == tokenizer(without, add_special_tokens=False)["input_ids"]


def test_token_window_limit_says_by_how_much(tokenizer):
    ok = parse_prompt(" ".join(["cat"] * 75), KNOWN)
    assert tokenize_prompt(ok, tokenizer).length == 77
    over_one = parse_prompt(" ".join(["cat"] * 76), KNOWN)
    with pytest.raises(PromptError) as info:
        tokenize_prompt(over_one, tokenizer)
    assert str(info.value) == ("The prompt is 76 tokens long; the model reads at most 75 (each "
                               "identity counts 2). Shorten it by 1 token.")


def test_a_name_repeated_40_times_is_over_the_window(tokenizer):
    parsed = parse_prompt(" ".join(["alice"] * 40), KNOWN)
    assert len(parsed.segments) == 79  # 40 mentions and the 39 spaces between them
    with pytest.raises(PromptError, match=r"80 tokens long.*Shorten it by 5 tokens\."):
        tokenize_prompt(parsed, tokenizer)
    negative = parse_prompt(" ".join(["bob"] * 40), KNOWN)
    with pytest.raises(PromptError, match=r"^The negative prompt is 80 tokens"):
        tokenize_prompt(negative, tokenizer, label="negative prompt")


def test_long_text_segment_logs_nothing(tokenizer, capsys):
    with pytest.raises(PromptError):
        tokenize_prompt(parse_prompt("cat " * 500, KNOWN), tokenizer)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_empty_negative_tokenises_like_the_pipeline(tokenizer):
    tokens = tokenize_prompt(parse_prompt("", KNOWN, allow_empty=True), tokenizer)
    expected = tokenizer("", padding="max_length", max_length=77)["input_ids"]
    assert tokens.input_ids == expected


# --------------------------------------------------------------------------------------------
# encoding


@pytest.fixture(scope="module")
def text_encoder():
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=1)
    return CLIPTextModel(config).eval().requires_grad_(False)


def test_identity_vectors():
    import torch

    mean = torch.randn(2, 8)
    components = torch.randn(2, 3, 8)
    coefficients = torch.randn(2, 3)
    vectors = identity_vectors(coefficients, mean, components)
    expected = torch.stack([mean[i] + coefficients[i] @ components[i] for i in range(2)])
    torch.testing.assert_close(vectors, expected)


def test_encode_equals_writing_the_rows_into_a_copy_of_the_table(tokenizer, text_encoder):
    import torch

    parsed = parse_prompt("alice shaking hands with bob", KNOWN)
    vectors = {"alice": torch.randn(2, 32), "bob": torch.randn(2, 32)}
    table_before = text_encoder.get_input_embeddings().weight.clone()
    ours = encode_prompts(text_encoder, tokenizer, [parsed], vectors)

    # The reference: a copy whose table has the vectors as real rows (what textual inversion
    # loaders do), fed the ids of those rows.
    reference = copy.deepcopy(text_encoder)
    tokens = tokenize_prompt(parsed, tokenizer)
    ids = list(tokens.input_ids)
    for n, (position, name, k) in enumerate(tokens.slots):
        row = 40000 + n
        reference.get_input_embeddings().weight.data[row] = vectors[name][k]
        ids[position] = row
    expected = reference(torch.tensor([ids]))[0]
    assert torch.equal(ours, expected)
    # Nothing stays behind: the table is untouched and the hook is gone.
    assert torch.equal(text_encoder.get_input_embeddings().weight, table_before)
    assert not text_encoder.get_input_embeddings()._forward_hooks
    plain = encode_tokens(text_encoder, torch.tensor([tokens.input_ids]))
    assert not torch.equal(plain, ours)


def test_hook_is_removed_when_encoding_fails(text_encoder):
    import torch

    ids = torch.zeros((1, 77), dtype=torch.long)
    mask = torch.zeros((1, 77), dtype=torch.bool)
    mask[0, 1] = True
    values = torch.zeros((1, 77, 5))  # wrong width: the hook fails inside the forward
    with pytest.raises(RuntimeError):
        encode_tokens(text_encoder, ids, mask, values)
    assert not text_encoder.get_input_embeddings()._forward_hooks


def test_gradients_reach_the_identity_vectors(tokenizer, text_encoder):
    import torch

    parsed = parse_prompt("a photo of alice", KNOWN)
    coefficients = torch.randn(2, 4, requires_grad=True)
    vectors = {"alice": identity_vectors(coefficients, torch.zeros(2, 32), torch.randn(2, 4, 32))}
    tokens = tokenize_prompt(parsed, tokenizer)
    ids, mask, values = build_slot_tensors([tokens], vectors, 32)
    encode_tokens(text_encoder, ids, mask, values).sum().backward()
    assert coefficients.grad is not None and coefficients.grad.abs().sum() > 0
    assert all(p.grad is None for p in text_encoder.parameters())
