"""The WebUI's prompt syntax: weights, escapes, BREAK and 75-token chunks, checked against
token ids computed by hand from the CLIP vocabulary, and the encodings they lead to."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from celebctl import basis, emphasis, models, rendering
from celebctl.cli import app
from celebctl.emphasis import BREAK, Fragment
from celebctl.errors import PromptError
from celebctl.models.tokenizers import BOS_TOKEN, EOS_TOKEN, clip_vocab_and_merges
from celebctl.prompting import (
    IdentityMention,
    parse_prompt,
    tokenize_chunks,
    with_person_nouns,
)

runner = CliRunner()
VOCAB = clip_vocab_and_merges()[0]
BOS, EOS = VOCAB[BOS_TOKEN], VOCAB[EOS_TOKEN]


def tok(word: str) -> int:
    """A whole word's id, read straight from the vocabulary."""
    return VOCAB[word + "</w>"]


@pytest.fixture(scope="module")
def tokenizer():
    return models.build_clip_tokenizer()


# ---- parsing


@pytest.mark.parametrize(("text", "expected"), [
    ("a photo", [Fragment("a photo")]),
    ("(red) hat", [Fragment("red", 1.1), Fragment(" hat")]),
    ("((red))", [Fragment("red", 1.21)]),
    ("[red]", [Fragment("red", round(1 / 1.1, 6))]),
    ("[[red]]", [Fragment("red", round(1 / 1.21, 6))]),
    ("(red:1.3)", [Fragment("red", 1.3)]),
    ("(a (b:2) c:0.5)", [Fragment("a ", 0.5), Fragment("b", 1.0), Fragment(" c", 0.5)]),
    ("(red:1.3", [Fragment("red:1.3", 1.1)]),  # unclosed: the rest gets 1.1, ":1.3" is text
    ("red)", [Fragment("red)")]),  # a stray closing bracket is text
    ("\\(red\\) \\[x\\] \\\\", [Fragment("(red) [x] \\")]),
    ("16:9 ratio", [Fragment("16:9 ratio")]),
    ("a BREAK b", [Fragment("a"), BREAK, Fragment("b")]),
    ("aBREAK b", [Fragment("aBREAK b")]),  # only the word on its own
    ("a break b", [Fragment("a break b")]),  # and only in capitals
    ("(a BREAK b:1.2)", [Fragment("a", 1.2), BREAK, Fragment("b", 1.2)]),
])
def test_weight_rules(text, expected):
    assert emphasis.parse(text) == expected


@pytest.mark.parametrize("text", [
    "a (b:1.2) c", "\\(literal\\) and (weighted)", "x BREAK y", "[soft] ((strong))",
    "(a (b:2) c:0.5)",
])
def test_render_is_parsed_back_to_the_same_weights(text):
    fragments = emphasis.parse(text)
    again = emphasis.parse(emphasis.render(fragments))
    assert [(f.text.strip(), round(f.weight, 2)) if f is not BREAK else f for f in again] == [
        (f.text.strip(), round(f.weight, 2)) if f is not BREAK else f for f in fragments]


# The examples in the docstring of the WebUI's own parser (AUTOMATIC1111 stable-diffusion-webui,
# modules/prompt_parser.py, parse_prompt_attention), with the weights rounded as celebctl keeps
# them (6 decimals: the WebUI's 1.5730000000000004 is 1.573 here).
WEBUI_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
]


@pytest.mark.parametrize(("text", "expected"), WEBUI_EXAMPLES)
def test_the_webui_parsers_documented_examples(text, expected):
    assert emphasis.parse(text) == [Fragment(t, w) for t, w in expected]


@pytest.mark.parametrize(("text", "expected"), [
    # A backslash that escapes nothing is dropped, as the WebUI drops it.
    ("cat \\: dog", "cat : dog"),
    ("a \\hat", "a hat"),
    ("the end \\", "the end "),
    ("\\\\hat", "\\hat"),  # an escaped backslash stays one backslash
])
def test_a_backslash_before_an_ordinary_character_is_dropped(text, expected):
    assert emphasis.parse(text) == [Fragment(expected)]


def test_a_dropped_backslash_is_not_sent_to_the_text_encoder(tokenizer):
    # "cat \: dog" is 3 tokens in the WebUI; the backslash was a 4th here.
    [window] = tokenize_chunks(parse_prompt("cat \\: dog", []), tokenizer)
    assert ids_of(window) == [BOS, tok("cat"), tok(":"), tok("dog"), EOS]
    [window] = tokenize_chunks(parse_prompt("a \\hat \\", []), tokenizer)
    assert ids_of(window) == [BOS, tok("a"), tok("hat"), EOS]


def test_the_backslash_before_an_identity_name_still_writes_the_plain_word():
    assert emphasis.parse("with \\grace", keep_escaped={"grace"}) == [Fragment("with \\grace")]
    assert emphasis.parse("with \\graceful", keep_escaped={"grace"}) == [
        Fragment("with graceful")]
    parsed = parse_prompt("(dancing with \\Grace:1.2) \\hat", ["grace"])
    assert parsed.identities == [] and parsed.segments == ["dancing with Grace", " hat"]


def test_neighbours_of_equal_weight_are_one_fragment_whatever_the_weight(tokenizer):
    # 1.1 * 1.1 is 1.2100000000000002: the stored weight is rounded, the comparison must be too.
    assert emphasis.parse("((red)(dress))") == [Fragment("reddress", 1.21)]
    assert emphasis.parse("(red)(dress)") == [Fragment("reddress", 1.1)]
    assert emphasis.parse("[[red][dress]]") == [Fragment("reddress", round(1 / 1.21, 6))]
    [window] = tokenize_chunks(parse_prompt("((red)(dress))", []), tokenizer)
    [same] = tokenize_chunks(parse_prompt("((reddress))", []), tokenizer)
    assert ids_of(window) == ids_of(same)


def test_equal_rounded_weights_of_different_floats_stay_apart_as_in_the_webui(tokenizer):
    """((a))(b:1.21): 1.1 * 1.1 is 1.2100000000000002 and the WebUI, merging on exact equality,
    keeps two fragments, so the words are tokenized apart (#24 point 16)."""
    assert emphasis.parse("((red))(dress:1.21)") == [Fragment("red", 1.21),
                                                      Fragment("dress", 1.21)]
    assert emphasis.parse("(red:1.21)(dress:1.21)") == [Fragment("reddress", 1.21)]
    [window] = tokenize_chunks(parse_prompt("((red))(dress:1.21)", []), tokenizer)
    [split] = tokenize_chunks(parse_prompt("(red:1.21) BREAK", []), tokenizer)
    assert ids_of(window)[:2] == ids_of(split)[:2]  # "red" on its own, then "dress"
    [merged] = tokenize_chunks(parse_prompt("((reddress))", []), tokenizer)
    assert ids_of(window) != ids_of(merged)


def test_break_inside_a_weighted_group_is_a_break():
    # The WebUI sends the word "BREAK" to the encoder there; celebctl keeps the break.
    assert emphasis.parse("((a BREAK b))") == [Fragment("a", 1.21), BREAK, Fragment("b", 1.21)]


@pytest.mark.parametrize(("fragments", "text"), [
    ([Fragment("sharp", 1.4641)], "(sharp:1.4641)"),
    ([Fragment("soft", round(1 / 1.1, 6))], "(soft:0.9091)"),
    ([Fragment("a", 1.1), Fragment(" b", 1.21)], "(a:1.1)( b:1.21)"),
    ([Fragment("x", 2.0), Fragment(" y", -0.5)], "(x:2)( y:-0.5)"),
])
def test_weights_are_written_with_four_decimals(fragments, text):
    assert emphasis.render(fragments) == text


@pytest.mark.parametrize("text", [
    "(" * 1990 + "x",  # past float32: the image was all black
    "(x:101)",
    "(x:-101)",
    "(x:" + "9" * 400 + ")",  # a number too large to hold
    "(((x:99)))",  # 131.8
])
def test_weights_past_the_limit_are_refused(text):
    assert emphasis.parse("((((((((((x:10))))))))))") == [Fragment("x", round(10 * 1.1**9, 6))]
    with pytest.raises(PromptError, match=r"^The prompt gives 'x' a weight of .* -100 to 100"):
        emphasis.parse(text)


def test_the_weight_limit_names_the_negative_prompt_and_spares_plain_spaces():
    with pytest.raises(PromptError, match="^The negative prompt gives 'blurry'"):
        parse_prompt("(blurry:500)", [], allow_empty=True, label="negative prompt")
    assert emphasis.parse("(x:100) (y:-100)") == [Fragment("x", 100.0), Fragment(" "),
                                                  Fragment("y", -100.0)]
    assert emphasis.parse("a (  :1000) b") == [Fragment("a "), Fragment("  ", 1000.0),
                                               Fragment(" b")]


@pytest.mark.parametrize(("text", "found"), [
    ("a [cat:dog:0.5] photo", ["prompt editing [from:to:when]"]),
    ("a [dog:10] photo", ["prompt editing [from:to:when]"]),
    ("a [cat|dog] photo", ["alternation [a|b]"]),
    ("a cat AND a dog", ["composable prompts (AND)"]),
    ("a cat <lyco:film_grain:0.8>", ["extra networks (<hypernet:...>, <lyco:...>)"]),
    ("a cat <lora:film_grain:0.8>", []),  # a LoRA: celebctl loads it (tests/test_lora.py)
    ("[a|b] AND <hypernet:x:1>", ["alternation [a|b]", "composable prompts (AND)",
                                  "extra networks (<hypernet:...>, <lyco:...>)"]),
    ("a cat <addnet:film:0.8>", ["extension tags (<addnet:...> and other <word:...>)"]),
    ("<hypernet:b:1> <Addnet_2 : x>", [
        "extra networks (<hypernet:...>, <lyco:...>)",
        "extension tags (<addnet:...> and other <word:...>)"]),
    ("a cat and a dog, [soft], 16:9, <alice>, <3, a <b>", []),
    ("\\[cat:dog:0.5\\] \\[a|b\\]", []),  # escaped brackets: text in the WebUI too
])
def test_unsupported_webui_syntax_is_named(text, found):
    assert emphasis.unsupported_syntax(text) == found


def test_unsupported_webui_syntax_is_a_note_of_the_render_plan():
    plan = rendering.plan_render("a [cat:dog:0.5] photo <hypernet:x:1>", "blurry AND ugly",
                                 model="tiny")
    notes = [n for n in plan.notes if "celebctl does not support" in n]
    assert notes == [
        "The prompt uses the WebUI's prompt editing [from:to:when], which celebctl does not "
        "support: it is read as plain text (brackets still weight it), so the image differs "
        "from the WebUI's.",
        "The prompt uses the WebUI's extra networks (<hypernet:...>, <lyco:...>), which "
        "celebctl does not support: it is read as plain text (brackets still weight it), so "
        "the image differs from the WebUI's.",
        "The negative prompt uses the WebUI's composable prompts (AND), which celebctl does "
        "not support: it is read as plain text (brackets still weight it), so the image "
        "differs from the WebUI's.",
    ]
    assert not [n for n in rendering.plan_render("a (cat:1.2)", model="tiny").notes
                if "does not support" in n]


def test_an_identity_inside_a_weighted_group_gets_its_weight():
    parsed = parse_prompt("(a photo of alice:1.3), bob", ["alice", "bob"])
    assert parsed.segments == ["a photo of ", IdentityMention("alice", 11, 16, False), ", ",
                               IdentityMention("bob", 2, 5, False)]
    assert parsed.weights == [1.3, 1.3, 1.0, 1.0]
    person = with_person_nouns(parsed)  # the added "person" shares the identity's weight
    assert person.segments[2] == " person" and person.weights[2] == 1.3
    assert person.expanded() == "(a photo of <alice> person:1.3), <bob> person"


def test_escapes_and_the_plain_word_form():
    parsed = parse_prompt("dancing with \\grace", ["grace"])
    assert parsed.identities == [] and parsed.segments == ["dancing with grace"]
    # Escaped brackets are literal brackets; the name inside them still names the identity.
    parsed = parse_prompt("\\(grace\\)", ["grace"])
    assert parsed.segments == ["(", IdentityMention("grace", 1, 6, False), ")"]
    assert parsed.weights == []
    assert parse_prompt("dancing with grace", ["grace"]).identities == ["grace"]
    assert parse_prompt("dancing with <grace>", ["grace"], explicit_only=True).identities == [
        "grace"]
    assert parse_prompt("dancing with grace", ["grace"], explicit_only=True).identities == []


def test_the_prompt_for_each_tool():
    parsed = with_person_nouns(parse_prompt("(alice's hat:1.2), bob \\(x\\)", ["alice", "bob"]))
    assert parsed.expanded("angle") == "(<alice> person's hat:1.2), <bob> person \\(x\\)"
    assert parsed.expanded("webui") == "(alice person's hat:1.2), bob person \\(x\\)"
    assert parsed.expanded("comfyui") == (
        "(embedding:alice person's hat:1.2), embedding:bob person \\(x\\)")
    bare = parse_prompt("alice's hat", ["alice"])  # --no-person
    assert bare.expanded("comfyui") == "embedding:alice 's hat"  # ComfyUI reads up to a space
    with pytest.raises(ValueError, match="unknown style"):
        bare.expanded("html")


# ---- chunks, against ids computed by hand


def ids_of(window):
    return window.input_ids[:window.length]


def test_a_weighted_prompt_is_one_chunk_of_its_words(tokenizer):
    parsed = parse_prompt("(a photo of alice:1.3)", ["alice"])
    [window] = tokenize_chunks(parsed, tokenizer)
    assert ids_of(window) == [BOS, tok("a"), tok("photo"), tok("of"), 0, 0, EOS]
    assert window.weights[:7] == [1.0, 1.3, 1.3, 1.3, 1.3, 1.3, 1.0]
    assert window.slots == [(4, "alice", 0), (5, "alice", 1)]
    assert len(window.input_ids) == 77 and window.input_ids[7:] == [EOS] * 70  # SD 1.x pad


def test_escaped_brackets_are_ordinary_tokens(tokenizer):
    [window] = tokenize_chunks(parse_prompt("\\(a\\)", []), tokenizer)
    assert ids_of(window) == [BOS, tok("("), tok("a"), tok(")"), EOS]
    assert set(window.weights) == {1.0}


def test_75_tokens_fill_a_chunk_and_the_76th_starts_the_next(tokenizer):
    [one] = tokenize_chunks(parse_prompt(" ".join(["a"] * 75), []), tokenizer)
    assert ids_of(one) == [BOS] + [tok("a")] * 75 + [EOS]
    first, second = tokenize_chunks(parse_prompt(" ".join(["a"] * 80), []), tokenizer)
    assert ids_of(first) == [BOS] + [tok("a")] * 75 + [EOS]
    assert ids_of(second) == [BOS] + [tok("a")] * 5 + [EOS]


def test_a_full_chunk_breaks_after_a_comma_within_20_tokens(tokenizer):
    # 60 "a", a comma, 20 "b": the chunk is full at the 14th "b", and the comma is 15 tokens
    # back, so everything after it moves to the next chunk.
    text = " ".join(["a"] * 60) + ", " + " ".join(["b"] * 20)
    first, second = tokenize_chunks(parse_prompt(text, []), tokenizer)
    assert ids_of(first) == [BOS] + [tok("a")] * 60 + [tok(",")] + [EOS]
    assert ids_of(second) == [BOS] + [tok("b")] * 20 + [EOS]
    # A comma further back than 20 tokens does not move anything.
    text = " ".join(["a"] * 50) + ", " + " ".join(["b"] * 30)
    first, second = tokenize_chunks(parse_prompt(text, []), tokenizer)
    assert ids_of(first) == [BOS] + [tok("a")] * 50 + [tok(",")] + [tok("b")] * 24 + [EOS]
    assert ids_of(second) == [BOS] + [tok("b")] * 6 + [EOS]


def test_break_starts_a_chunk_and_an_identity_is_never_split(tokenizer):
    first, second = tokenize_chunks(parse_prompt("a BREAK b", []), tokenizer)
    assert ids_of(first) == [BOS, tok("a"), EOS] and ids_of(second) == [BOS, tok("b"), EOS]
    assert len(tokenize_chunks(parse_prompt("a BREAK", []), tokenizer)) == 1
    # 74 tokens, then an identity: its two slots go to the next chunk together.
    first, second = tokenize_chunks(parse_prompt(" ".join(["a"] * 74) + " alice", ["alice"]),
                                    tokenizer)
    assert ids_of(first) == [BOS] + [tok("a")] * 74 + [EOS]
    assert ids_of(second) == [BOS, 0, 0, EOS] and second.slots == [(1, "alice", 0),
                                                                    (2, "alice", 1)]


def test_sd2_chunks_pad_with_the_pad_token():
    tokenizer = models.build_clip_tokenizer(pad_token="!")
    [window] = tokenize_chunks(parse_prompt("a", []), tokenizer)
    assert window.input_ids[:3] == [BOS, tok("a"), EOS] and window.input_ids[3:] == [0] * 74


# ---- encodings


@pytest.fixture(scope="module")
def tiny():
    return models.load_pipeline_components("tiny", "cpu", "fp32")


def _encode(home, components, prompt):
    plan = rendering.plan_render(prompt, model="tiny", person_noun=False)
    info = basis.load_basis(plan.basis_id) if plan.basis_id else None
    vectors = rendering.identity_vectors_for(plan.coefficients, info) if info else {}
    return rendering.encode_prompt_pair(components, plan, vectors)


def test_weights_scale_positions_and_keep_the_mean():
    states = torch.randn(1, 77, 32) + 0.3  # real CLIP outputs have a mean well away from 0
    weights = [1.0] * 77
    weights[4:6] = [1.5, 1.5]
    out = rendering.apply_emphasis(states, weights)
    expected = states.clone()
    expected[:, 4:6] *= 1.5
    expected = expected * (states.mean() / expected.mean())
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.mean(), states.mean())
    assert rendering.apply_emphasis(states, [1.0] * 77) is states


def test_a_zero_mean_is_not_divided_by():
    # A layer norm without bias (the built-in tiny models) gives states of mean ~0: the
    # rescale would divide by ~0, so it is skipped and only the positions are scaled.
    states = torch.randn(1, 77, 32)
    states = states - states.mean()
    weights = [1.0] * 77
    weights[2] = 2.0
    out = rendering.apply_emphasis(states, weights)
    assert torch.isfinite(out).all()
    expected = states.clone()
    expected[:, 2] *= 2
    torch.testing.assert_close(out, expected)


def test_encoding_applies_the_weights_to_each_chunk(home, tiny):
    plain = _encode(home, tiny, "a photo of alice").prompt
    weighted = _encode(home, tiny, "a photo of (alice:1.5)").prompt
    weights = [1.0] * 77
    weights[4:6] = [1.5, 1.5]  # the identity's two slots
    torch.testing.assert_close(weighted, rendering.apply_emphasis(plain, weights))
    assert not torch.equal(weighted, plain)


def test_long_prompts_are_encoded_chunk_by_chunk(home, tiny):
    long_prompt = " ".join(["a"] * 75) + " alice"
    embeds = _encode(home, tiny, long_prompt)
    assert embeds.prompt.shape == (1, 154, 32) and embeds.negative.shape == (1, 154, 32)
    first = _encode(home, tiny, " ".join(["a"] * 75)).prompt
    second = _encode(home, tiny, "alice").prompt
    torch.testing.assert_close(embeds.prompt, torch.cat([first, second], dim=1))
    # The empty negative is padded with empty chunks to the same length.
    empty = _encode(home, tiny, "x").negative
    torch.testing.assert_close(embeds.negative, torch.cat([empty, empty], dim=1))
    broken = _encode(home, tiny, "a photo BREAK of alice").prompt
    assert broken.shape == (1, 154, 32)


def test_sdxl_weights_each_encoder_on_its_own():
    states = torch.randn(1, 77, 80)
    weights = [1.0] * 77
    weights[3] = 2.0
    out = rendering.apply_emphasis(states, weights, [32, 48])
    for part, got in zip(torch.split(states, [32, 48], -1), torch.split(out, [32, 48], -1),
                         strict=True):
        expected = part.clone()
        expected[:, 3] *= 2
        torch.testing.assert_close(got, expected * (part.mean() / expected.mean()))


# ---- the CLI


def test_dry_run_shows_chunks_weights_and_other_tools_prompts(home):
    prompt = " ".join(["a"] * 60) + ", " + " ".join(["b"] * 20) + " (alice:1.2)"
    result = runner.invoke(app, ["render", prompt, "--dry-run"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "Tokens:     84 in 2 chunks of 75 (61 + 23)" in text
    assert "Weights:    <alice> person x1.2" in text
    assert "WebUI:      " in text and "(alice person:1.2)" in text
    assert "(embedding:alice person:1.2)" in text
    result = runner.invoke(app, ["render", prompt, "--dry-run", "--json"])
    import json

    data = json.loads(result.stdout)
    assert data["chunks"] == [61, 23] and data["weighted"] is True
    assert data["webui"].endswith("(alice person:1.2)")


def test_render_prompts_notes_unsupported_syntax_as_render_does(home, tmp_path):
    """`render --prompts` gives `render`'s notes (#24 point 15), once per kind with its lines."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alice [cat:dog:0.5]\na plain line\nbob AND a dog\n"
                       "<addnet:film:1> alice\n[a:b:0.5] castle\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["render", "--prompts", str(prompts), "--model", "tiny",
                                      "--negative", "ugly AND blurry", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    notes = [n for n in json.loads(result.stdout)["notes"] if "does not support" in n]
    single = rendering.plan_render("a [cat:dog:0.5] photo", model="tiny").notes
    editing = next(n for n in single if "prompt editing" in n)
    assert notes[0] == f"Lines 1, 5 of {prompts}: {editing}"
    assert notes[1].startswith(f"Line 3 of {prompts}: The prompt uses the WebUI's composable")
    assert notes[2].startswith(f"Line 4 of {prompts}: The prompt uses the WebUI's extension tags")
    assert notes[3].startswith("The negative prompt uses the WebUI's composable prompts (AND)")
    assert len(notes) == 4
