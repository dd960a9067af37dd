"""Data formats: every format from JSONL and from a `datasets` folder, plain and conversational;
each kind of bad input with its exact `path:line: field: problem` message; rankings to pairs;
and the chat rendering that turns prompts/responses into the tokens a model sees."""

from __future__ import annotations

import json

import datasets
import pytest

from rlhfkit.cli import main
from rlhfkit.data.chat import encode_example, render_prompt, render_response
from rlhfkit.data.formats import (
    FORMATS,
    Completions,
    Ranking,
    check_ranks,
    detect_kind,
    read_records,
    write_records,
)
from rlhfkit.errors import UserError
from rlhfkit.labels.pairs import rankings_to_pairs
from rlhfkit.models.loading import load_tokenizer

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café? ☕"}]
REPLY = [{"role": "assistant", "content": "Yes, please."}]

# Two records per format and variant; every optional key present so that to_json() is the input.
SAMPLES = {
    ("prompts", "plain"): [{"id": "p1", "prompt": "How do I brew coffee?"}, {"id": "p2", "prompt": "Café ☕?"}],
    ("prompts", "chat"): [{"id": "p1", "prompt": CONV}, {"id": "p2", "prompt": CONV[1:]}],
    ("demonstrations", "plain"): [
        {"prompt": "Say hi", "response": "Hi!"},
        {"prompt": "Count to two", "response": "One, two."},
    ],
    ("demonstrations", "chat"): [{"prompt": CONV, "response": REPLY}, {"prompt": CONV[1:], "response": REPLY}],
    ("completions", "plain"): [
        {"prompt_id": "p1", "prompt": "Say hi", "completions": ["Hi!", "Hello.", ""]},
        {"prompt_id": "p2", "prompt": "Say bye", "completions": ["Bye.", "See you."]},
    ],
    ("completions", "chat"): [
        {"prompt_id": "p1", "prompt": CONV, "completions": [REPLY, [{"role": "assistant", "content": "No."}]]},
        {"prompt_id": "p2", "prompt": CONV[1:], "completions": [REPLY, [{"role": "assistant", "content": "?"}]]},
    ],
    ("rankings", "plain"): [
        {"prompt_id": "p1", "labeler": "ann", "ranking": [2, 1, 1], "unusable": False, "comment": "close call"},
        {"prompt_id": "p1", "labeler": "bob", "ranking": [1, 2, 3], "unusable": True, "comment": "off topic"},
    ],
    ("pairs", "plain"): [
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away.", "margin": 0.5},
        {"prompt": "Say bye", "chosen": "Bye.", "rejected": "", "margin": 1.0},
    ],
    ("pairs", "chat"): [
        {"prompt": CONV, "chosen": REPLY, "rejected": [{"role": "assistant", "content": "No."}], "margin": 0.5},
        {"prompt": CONV[1:], "chosen": REPLY, "rejected": [{"role": "assistant", "content": "?"}], "margin": 2.0},
    ],
    ("ratings", "plain"): [
        {"prompt": "Say hi", "completion": "Hi!", "score": 0.9},
        {"prompt": "Say hi", "completion": "", "score": -1.0},
    ],
    ("ratings", "chat"): [
        {"prompt": CONV, "completion": REPLY, "score": 0.25},
        {"prompt": CONV, "completion": [{"role": "assistant", "content": ""}], "score": 0.0},
    ],
}


def write_jsonl(path, rows, blank_lines=False):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_lines:
        lines = ["", *sum(([line, "   "] for line in lines), [])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def error_of(path, kind):
    with pytest.raises(UserError) as info:
        read_records(path, kind)
    return str(info.value)


def test_samples_cover_every_format():
    assert {kind for kind, _ in SAMPLES} == set(FORMATS)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize(("kind", "variant"), list(SAMPLES))
def test_every_format_loads_from_jsonl_and_datasets_folder(tmp_path, kind, variant):
    rows = SAMPLES[(kind, variant)]
    from_jsonl = read_records(write_jsonl(tmp_path / "data.jsonl", rows), kind)
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    from_folder = read_records(folder, kind)
    assert all(isinstance(r, FORMATS[kind]) for r in from_jsonl + from_folder)
    assert [r.to_json() for r in from_jsonl] == rows
    assert [r.to_json() for r in from_folder] == rows
    assert detect_kind(rows[0]) == kind


@pytest.mark.parametrize(("kind", "variant"), list(SAMPLES))
def test_write_then_read_round_trips(tmp_path, kind, variant):
    records = read_records(write_jsonl(tmp_path / "in.jsonl", SAMPLES[(kind, variant)]), kind)
    out = write_records(tmp_path / "sub" / "out.jsonl", records)
    assert [r.to_json() for r in read_records(out, kind)] == SAMPLES[(kind, variant)]
    # One object per line, UTF-8 as is (not \\u escapes), keys in the documented order.
    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SAMPLES[(kind, variant)])
    assert out.read_text(encoding="utf-8") == expected


def test_conversations_are_typed_messages(tmp_path):
    (rec,) = read_records(write_jsonl(tmp_path / "d.jsonl", SAMPLES[("demonstrations", "chat")][:1]), "demonstrations")
    assert [m.role for m in rec.prompt] == ["system", "user"]
    assert rec.response[0].content == "Yes, please."


def test_datasets_dict_folder_uses_the_split(tmp_path):
    rows = SAMPLES[("prompts", "plain")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert [r.id for r in read_records(tmp_path / "dd", "prompts")] == ["p1", "p2"]
    with pytest.raises(UserError, match=r"no split 'test'; splits are train"):
        read_records(tmp_path / "dd", "prompts", split="test")


def test_dataset_rows_are_named_in_errors(tmp_path):
    datasets.Dataset.from_list([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": " "}]).save_to_disk(
        str(tmp_path / "ds")
    )
    assert error_of(tmp_path / "ds", "prompts") == f"{tmp_path / 'ds'}[row 1]: prompt: prompt is empty"


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    rows = SAMPLES[("prompts", "plain")] + [{"id": "p3", "prompt": ""}]
    path = write_jsonl(tmp_path / "p.jsonl", rows, blank_lines=True)
    # Lines: 1 blank, 2 p1, 3 blank, 4 p2, 5 blank, 6 p3 (empty prompt).
    assert error_of(path, "prompts") == f"{path}:6: prompt: prompt is empty"
    path = write_jsonl(tmp_path / "ok.jsonl", rows[:2], blank_lines=True)
    assert [r.id for r in read_records(path, "prompts")] == ["p1", "p2"]


# ----------------------------------------------------------------------------- bad input


def test_empty_prompt(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "ok"}, {"id": "b", "prompt": " \n "}])
    assert error_of(path, "prompts") == f"{path}:2: prompt: prompt is empty"


def test_empty_conversation_and_empty_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": []}])
    assert error_of(path, "prompts") == f"{path}:1: prompt: prompt is an empty conversation"
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": [{"role": "user", "content": " "}]}])
    assert error_of(path, "prompts") == f"{path}:1: prompt: prompt has only empty messages"


def test_bad_message_role(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": [{"role": "bot", "content": "x"}], "response": "y"}])
    assert error_of(path, "demonstrations").startswith(f"{path}:1: prompt: ")
    assert "prompt.0.role: Input should be 'system', 'user' or 'assistant'" in error_of(path, "demonstrations")


def test_missing_key(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hi"}])
    assert error_of(path, "demonstrations") == f"{path}:1: response: missing required key"


def test_unknown_key(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hi", "response": "Hi", "respones": "Hi"}])
    assert error_of(path, "demonstrations") == (
        f"{path}:1: respones: unknown key (check the spelling; see the formats in README)"
    )


def test_wrong_type(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": 5}])
    assert error_of(path, "prompts") == f"{path}:1: prompt: must be text or a list of {{role, content}} messages"


def test_duplicate_ids(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}]
    )
    assert error_of(path, "prompts") == f"{path}:3: id: duplicate 'a' (first at {path}:1)"
    c = SAMPLES[("completions", "plain")][0]
    path = write_jsonl(tmp_path / "c.jsonl", [c, c])
    assert error_of(path, "completions") == f"{path}:2: prompt_id: duplicate 'p1' (first at {path}:1)"


def test_duplicate_ranking_by_the_same_labeler(tmp_path):
    rows = [
        {"prompt_id": "p1", "labeler": "ann", "ranking": [1, 2]},
        {"prompt_id": "p1", "labeler": "bob", "ranking": [1, 2]},  # another labeler: fine
        {"prompt_id": "p1", "labeler": "ann", "ranking": [2, 1]},
    ]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    assert error_of(path, "rankings") == f"{path}:3: prompt_id/labeler: duplicate ('p1', 'ann') (first at {path}:1)"


def test_rank_gaps_and_bad_ranks(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt_id": "p1", "labeler": "ann", "ranking": [1, 3, 1]}])
    assert error_of(path, "rankings") == f"{path}:1: ranking: ranks must be dense (1, 2, 2, 3 - no gaps); got [1, 3, 1]"
    path = write_jsonl(tmp_path / "z.jsonl", [{"prompt_id": "p1", "labeler": "ann", "ranking": [0, 1]}])
    assert error_of(path, "rankings") == f"{path}:1: ranking: ranks start at 1 (best); got [0, 1]"
    path = write_jsonl(tmp_path / "o.jsonl", [{"prompt_id": "p1", "labeler": "ann", "ranking": [1]}])
    assert error_of(path, "rankings") == f"{path}:1: ranking: ranking needs at least 2 candidates, got 1"
    check_ranks([1, 2, 2, 3])  # ties are fine
    check_ranks([1, 1])


def test_too_few_candidates(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt_id": "p1", "prompt": "x", "completions": ["only one"]}])
    assert error_of(path, "completions") == f"{path}:1: completions: need at least 2 candidates to rank, got 1"


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    assert error_of(path, "prompts") == f"{path}:2: not valid UTF-8 (byte 26); re-save it as UTF-8"


def test_huge_line(tmp_path):
    path = tmp_path / "p.jsonl"
    big = json.dumps({"id": "a", "prompt": "x" * 1_000_001})
    path.write_text(big + "\n", encoding="utf-8")
    assert error_of(path, "prompts") == (
        f"{path}:1: line is {len(big) + 1:,} bytes, over the 1,000,000-byte limit "
        "(is this really JSONL, one record per line?)"
    )


def test_invalid_json(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": }\n', encoding="utf-8")
    assert error_of(path, "prompts") == f"{path}:2: invalid JSON: Expecting value (column 23)"


def test_non_object_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('["a", "x"]\n', encoding="utf-8")
    assert error_of(path, "prompts") == f"{path}:1: expected a JSON object, got list"


def test_identical_chosen_and_rejected(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "Same.", "rejected": "Same."}])
    assert error_of(path, "pairs") == f"{path}:1: rejected: identical to chosen: the pair carries no preference"
    conv = [{"role": "assistant", "content": "Same."}]
    path = write_jsonl(tmp_path / "conv.jsonl", [{"prompt": "p", "chosen": conv, "rejected": conv}])
    assert error_of(path, "pairs") == f"{path}:1: rejected: identical to chosen: the pair carries no preference"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_scores_and_margins(tmp_path, literal):
    path = tmp_path / "ratings.jsonl"
    path.write_text(f'{{"prompt": "p", "completion": "c", "score": {literal}}}\n', encoding="utf-8")
    assert error_of(path, "ratings") == f"{path}:1: score: score must be a finite number"
    path = tmp_path / "pairs.jsonl"
    path.write_text(f'{{"prompt": "p", "chosen": "a", "rejected": "b", "margin": {literal}}}\n', encoding="utf-8")
    assert error_of(path, "pairs") == f"{path}:1: margin: margin must be a finite number"


def test_empty_and_missing_files(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n \n", encoding="utf-8")
    assert error_of(path, "prompts") == f"{path}: no records (the file is empty)"
    assert error_of(tmp_path / "nope.jsonl", "prompts") == f"{tmp_path / 'nope.jsonl'}: file not found"
    with pytest.raises(UserError, match="unknown data format 'prompt'; one of: prompts, "):
        read_records(path, "prompt")


def test_detect_kind_rejects_unknown_shapes():
    with pytest.raises(ValueError, match=r"keys \['prompt', 'reply'\] match no known format"):
        detect_kind({"prompt": "x", "reply": "y"})


# ----------------------------------------------------------------------------- rankings -> pairs

COMPLETIONS = [
    {"prompt_id": "p1", "prompt": "Name a colour", "completions": ["A", "B", "C", "D"]},
    {"prompt_id": "p2", "prompt": "Say hi", "completions": ["x", "y"]},
    {"prompt_id": "p3", "prompt": "Echo", "completions": ["same", "same", "other"]},
]


def test_rankings_to_pairs_by_hand(tmp_path):
    rankings = [
        # ann: B and D tie for best, then A, then C.
        {"prompt_id": "p1", "labeler": "ann", "ranking": [2, 1, 3, 1]},
        # bob: A best, the other three tie.
        {"prompt_id": "p1", "labeler": "bob", "ranking": [1, 2, 2, 2]},
        {"prompt_id": "p2", "labeler": "ann", "ranking": [1, 2], "unusable": True},
        # two identical texts at different ranks: that pair says nothing.
        {"prompt_id": "p3", "labeler": "ann", "ranking": [1, 2, 3]},
    ]
    r = read_records(write_jsonl(tmp_path / "r.jsonl", rankings), "rankings")
    c = read_records(write_jsonl(tmp_path / "c.jsonl", COMPLETIONS), "completions")
    got = [(p.prompt, p.chosen, p.rejected) for p in rankings_to_pairs(r, c)]
    assert got == [
        # ann on p1, candidate pairs (0,1) (0,2) (0,3) (1,2) [(1,3) tie] (2,3):
        ("Name a colour", "B", "A"),
        ("Name a colour", "A", "C"),
        ("Name a colour", "D", "A"),
        ("Name a colour", "B", "C"),
        ("Name a colour", "D", "C"),
        # bob on p1: A over each of the tied three; pairs among them dropped.
        ("Name a colour", "A", "B"),
        ("Name a colour", "A", "C"),
        ("Name a colour", "A", "D"),
        # p2 unusable: nothing. p3: (0,1) identical texts skipped.
        ("Echo", "same", "other"),
        ("Echo", "same", "other"),
    ]
    assert all(p.margin is None for p in rankings_to_pairs(r, c))


def test_an_empty_completion_can_lose_or_win_a_pair(tmp_path):
    c = read_records(
        write_jsonl(tmp_path / "c.jsonl", [{"prompt_id": "p1", "prompt": "Say hi", "completions": ["", "Hi!"]}]),
        "completions",
    )
    r = read_records(
        write_jsonl(tmp_path / "r.jsonl", [{"prompt_id": "p1", "labeler": "a", "ranking": [2, 1]}]), "rankings"
    )
    (pair,) = rankings_to_pairs(r, c)
    assert (pair.chosen, pair.rejected) == ("Hi!", "")
    out = write_records(tmp_path / "pairs.jsonl", [pair])
    assert read_records(out, "pairs")[0].rejected == ""


def test_rankings_with_unknown_prompt_id(tmp_path):
    rows = [
        {"prompt_id": "p1", "labeler": "ann", "ranking": [1, 2, 3, 4]},
        {"prompt_id": "p9", "labeler": "ann", "ranking": [1, 2]},
    ]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    c = [Completions.model_validate(x) for x in COMPLETIONS]
    with pytest.raises(UserError) as info:
        rankings_to_pairs(read_records(path, "rankings"), c)
    assert str(info.value) == f"{path}:2: prompt_id: unknown id 'p9' (not in the completions)"


def test_rankings_must_rank_every_candidate(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt_id": "p1", "labeler": "ann", "ranking": [1, 2, 3]}])
    c = [Completions.model_validate(x) for x in COMPLETIONS]
    with pytest.raises(UserError) as info:
        rankings_to_pairs(read_records(path, "rankings"), c)
    assert str(info.value) == (
        f"{path}:1: ranking: ranks 3 candidates but prompt 'p1' has 4; every candidate needs a rank"
    )


def test_rankings_built_in_code_are_named_by_position():
    c = [Completions.model_validate(x) for x in COMPLETIONS]
    with pytest.raises(UserError, match=r"^rankings: record 1: prompt_id: unknown id 'p7'"):
        rankings_to_pairs([Ranking(prompt_id="p7", labeler="ann", ranking=[1, 2])], c)


# ----------------------------------------------------------------------------- chat rendering

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def plain_tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir("gpt2"))


@pytest.fixture(scope="module")
def chat_tok(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir("gpt2"))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_plain_prompt_uses_the_template(plain_tok, chat_tok):
    for tok in (plain_tok, chat_tok):  # a chat template does not change plain prompts unless asked
        assert render_prompt(tok, "How?") == "User: How?\nAssistant:"
        assert render_response(tok, "How?", "  Like this. ") == " Like this."
    assert render_prompt(plain_tok, "How?", "Q: {prompt}\nA:") == "Q: How?\nA:"
    assert render_prompt(plain_tok, "How?", "{prompt}") == "How?"
    with pytest.raises(UserError, match="must contain {prompt}"):
        render_prompt(plain_tok, "How?", "Q:")


def test_conversation_without_chat_template_falls_back_to_plain(plain_tok):
    assert render_prompt(plain_tok, CONV) == "System: Be brief.\nUser: Café? ☕\nAssistant:"
    assert render_response(plain_tok, CONV, REPLY) == " Yes, please."
    assert render_response(plain_tok, CONV, "Sure.") == " Sure."
    with pytest.raises(UserError, match="no chat template"):
        render_prompt(plain_tok, "How?", "chat")


def test_conversation_with_chat_template(chat_tok):
    prompt = render_prompt(chat_tok, CONV)
    assert prompt == "<|system|>Be brief.<|endoftext|><|user|>Café? ☕<|endoftext|><|assistant|>"
    assert render_response(chat_tok, CONV, REPLY) == "Yes, please.<|endoftext|>"
    assert render_response(chat_tok, CONV, "Sure.") == "Sure.<|endoftext|>"
    # template="chat" wraps a plain prompt as one user message.
    assert render_prompt(chat_tok, "How?", "chat") == "<|user|>How?<|endoftext|><|assistant|>"
    assert render_response(chat_tok, "How?", "Sure.", "chat") == "Sure.<|endoftext|>"


@pytest.mark.parametrize(
    ("which", "prompt", "response"),
    [("plain", "How?", "Like this."), ("plain", CONV, REPLY), ("chat", CONV, REPLY), ("chat", "How?", "Like this.")],
)
def test_encode_example_response_start_is_exact(plain_tok, chat_tok, which, prompt, response):
    tok = plain_tok if which == "plain" else chat_tok
    ids, start, truncated = encode_example(tok, prompt, response)
    assert not truncated
    assert ids[:start] == tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    expected = render_response(tok, prompt, response)
    expected += "" if expected.endswith(tok.eos_token) else tok.eos_token
    assert tok.decode(ids[start:]) == expected
    assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id  # exactly one EOS at the end


def test_encode_example_cuts_long_prompts_from_the_left(plain_tok):
    long_prompt = "tea " * 40
    full, full_start = encode_example(plain_tok, long_prompt, "Boil water.")[:2]
    ids, start = encode_example(plain_tok, long_prompt, "Boil water.", max_length=24)[:2]
    assert len(ids) == 24 and ids[start:] == full[full_start:]  # a short response stays whole
    assert ids[:start] == full[:full_start][-start:]


def test_encode_example_keeps_eos_and_prompt_of_a_long_response(plain_tok):
    """Issue 11: a long response used to lose its EOS and push the whole prompt out."""
    long_response = "tea " * 40
    full, full_start = encode_example(plain_tok, "Hi", long_response)[:2]
    ids, start = encode_example(plain_tok, "Hi", long_response, max_length=30)[:2]
    assert len(ids) == 30 and ids[-1] == plain_tok.eos_token_id
    # The prompt (13 tokens) fits its half, so it stays whole; the response keeps its start, then EOS.
    assert start == full_start and ids[:start] == full[:full_start]
    assert ids[start:-1] == full[full_start : full_start + 30 - start - 1]


def test_encode_example_different_prompts_with_one_long_response_stay_different(plain_tok):
    long_response = "Boil the water and steep the leaves. " * 20
    a, start_a = encode_example(plain_tok, "How do I make tea?", long_response, max_length=32)[:2]
    b, start_b = encode_example(plain_tok, "How do I make coffee?", long_response, max_length=32)[:2]
    assert len(a) == len(b) == 32 and a[:start_a] != b[:start_b]
    assert a[-1] == b[-1] == plain_tok.eos_token_id
    # The response starts exactly where the (whole or end of the) prompt stops.
    for ids, start, prompt in ((a, start_a, "How do I make tea?"), (b, start_b, "How do I make coffee?")):
        rendered = plain_tok(render_prompt(plain_tok, prompt), add_special_tokens=False)["input_ids"]
        response = plain_tok(render_response(plain_tok, prompt, long_response), add_special_tokens=False)["input_ids"]
        assert ids[:start] == rendered[len(rendered) - start :]
        assert ids[start:-1] == response[: 32 - start - 1]


@pytest.mark.parametrize(
    ("prompt_words", "response_words", "kept", "cut"),  # " tea" is 2 tokens, the response has 1 more (EOS)
    [(15, 15, (8, 8), True), (2, 15, (4, 12), True), (15, 1, (13, 3), True), (4, 3, (8, 7), False)],
)
def test_encode_example_splits_the_budget_with_a_minimum_prompt_share(
    plain_tok, prompt_words, response_words, kept, cut
):
    """Both long: half each; one short: kept whole, the other gets the rest. EOS always last."""
    prompt, response = " tea" * prompt_words, "tea " * response_words
    p_full = plain_tok(prompt, add_special_tokens=False)["input_ids"]
    r_full = plain_tok(" " + response.strip(), add_special_tokens=False)["input_ids"]
    ids, start, truncated = encode_example(plain_tok, prompt, response, "{prompt}", max_length=16)
    assert (start, len(ids) - start) == kept
    assert truncated is cut
    assert ids[:start] == p_full[len(p_full) - start :]  # the prompt's end
    assert ids[start:] == r_full[: len(ids) - start - 1] + [plain_tok.eos_token_id]  # the response's start, EOS


def test_a_utf8_byte_order_mark_is_ignored(tmp_path, capsys):
    """Windows editors and Excel's "CSV UTF-8" start files with a BOM; it is not part of the first record."""
    path = tmp_path / "c.jsonl"
    line = {"prompt_id": "p1", "prompt": "café?", "completions": ["a", "b"]}
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(line, ensure_ascii=False) + "\n").encode())
    (record,) = read_records(path, "completions")
    assert record.prompt_id == "p1" and record.prompt == "café?"
    assert main(["data", "validate", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "OK: 1 records of completions"


# ----------------------------------------------------------------------------- TRL's dataset types

USER = [{"role": "user", "content": "Café? ☕"}]


@pytest.mark.parametrize(
    ("kind", "row", "expected"),
    [
        ("demonstrations", {"text": "Tea is good."}, {"text": "Tea is good."}),
        ("demonstrations", {"messages": CONV + REPLY}, {"prompt": CONV, "response": REPLY}),
        ("demonstrations", {"prompt": "Say hi", "completion": "Hi!"}, {"prompt": "Say hi", "response": "Hi!"}),
        ("demonstrations", {"prompt": USER, "completion": REPLY}, {"prompt": USER, "response": REPLY}),
        ("prompts", {"prompt": "Say hi"}, {"id": "row1", "prompt": "Say hi"}),
        ("prompts", {"prompt": USER}, {"id": "row1", "prompt": USER}),
        (  # HH-RLHF: the prompt ends at the last "Assistant:", so a shared first word stays in both answers
            "pairs",
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Sure, hot.", "rejected": "\n\nHuman: Hi\n\nAssistant: Sure, no"},
            {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": "Sure, hot.", "rejected": "Sure, no"},
        ),
        ("pairs", {"chosen": "Tea? I like it.", "rejected": "Tea? Never."}, {"prompt": "Tea?", "chosen": "I like it.",
                                                                             "rejected": "Never."}),  # fmt: skip
        (  # UltraFeedback: conversations with the same first messages
            "pairs",
            {"chosen": CONV + REPLY, "rejected": CONV + [{"role": "assistant", "content": "No."}]},
            {"prompt": CONV, "chosen": REPLY, "rejected": [{"role": "assistant", "content": "No."}]},
        ),
    ],
)
def test_trl_shapes_read_as_our_formats(tmp_path, kind, row, expected):
    (record,) = read_records(write_jsonl(tmp_path / "d.jsonl", [row]), kind)
    assert record.to_json() == expected
    assert detect_kind(row) == kind


def test_a_plain_text_is_learned_whole(plain_tok):
    """TRL's language-modeling `text`: no template, every token a target, EOS last."""
    ids, start, cut = encode_example(plain_tok, None, "Tea is good.")
    text_ids = plain_tok("Tea is good.", add_special_tokens=False)["input_ids"]
    assert (ids, start, cut) == ([*text_ids, plain_tok.eos_token_id], 0, False)
    ids, start, cut = encode_example(plain_tok, None, "tea " * 40, max_length=10)
    assert (len(ids), start, cut, ids[-1]) == (10, 0, True, plain_tok.eos_token_id)


def test_unpaired_preference_pairs_each_desirable_with_each_undesirable(tmp_path, caplog):
    rows = [
        {"prompt": "Tea?", "completion": "Yes.", "label": True},
        {"prompt": "Tea?", "completion": "Maybe.", "label": True},
        {"prompt": "Tea?", "completion": "Go away.", "label": False},
        {"prompt": "Coffee?", "completion": "No.", "label": False},  # no desirable one: no pair
    ]
    pairs = read_records(write_jsonl(tmp_path / "kto.jsonl", rows), "pairs")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Tea?", "Yes.", "Go away."),
        ("Tea?", "Maybe.", "Go away."),
    ]
    assert "4 unpaired judgements -> 2 pairs" in caplog.text
    assert "1 prompt(s) with only one kind of label" in caplog.text
    path = write_jsonl(tmp_path / "bad.jsonl", rows[2:])
    assert error_of(path, "pairs") == (
        f"{path}: no pairs: no prompt has both a desirable (label true) and an undesirable (label false) completion"
    )


def test_extra_columns_are_ignored_and_named_once_unless_strict(tmp_path, caplog):
    rows = [{"prompt": "Tea?", "chosen": "Yes.", "rejected": "No.", "score_chosen": 9.0, "score_rejected": 2.0}] * 3
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    pairs = read_records(path, "pairs", strict=False)
    assert [p.to_json() for p in pairs] == [{"prompt": "Tea?", "chosen": "Yes.", "rejected": "No."}] * 3
    (message,) = [r.getMessage() for r in caplog.records]
    assert message == (
        f"{path}: ignored column(s) the pairs format does not use: score_chosen, score_rejected "
        "(strict=true makes them an error)"
    )
    assert error_of(path, "pairs").startswith(f"{path}:1: score_chosen: unknown key (check the spelling;")


@pytest.mark.parametrize(
    ("kind", "row", "message"),
    [
        ("demonstrations", {"messages": USER}, "messages: must be a list of {role, content} messages: a prompt, then"),
        ("demonstrations", {"messages": CONV}, "messages: the last message has role 'user'; it must"),
        ("demonstrations", {"messages": [*USER, {"role": "assistant", "content": ""}]}, "messages: response has only"),
        ("demonstrations", {"text": " "}, "text: response is empty"),
        ("pairs", {"chosen": "Tea.", "rejected": "Coffee."}, "chosen: no prompt: chosen and rejected share no"),
        ("pairs", {"chosen": USER, "rejected": "No."}, "chosen: chosen and rejected must both be texts"),
        ("pairs", {"prompt": "Tea?", "completion": "Yes.", "label": "maybe"}, "label: Input should be a valid boolean"),
    ],
)  # fmt: skip
def test_trl_shape_errors_name_the_users_column(tmp_path, kind, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [SAMPLES[(kind, "plain")][0], row])
    assert error_of(path, kind).startswith(f"{path}:2: {message}")


def test_a_split_is_named_after_a_colon(tmp_path):
    rows = SAMPLES[("prompts", "plain")]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[1:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.id for r in read_records(f"{tmp_path / 'dd'}:test", "prompts")] == ["p2"]
    assert [r.id for r in read_records(f"{tmp_path / 'dd'}:train", "prompts")] == ["p1", "p2"]
    with pytest.raises(UserError, match=r"no split 'valid'; splits are train, test"):
        read_records(f"{tmp_path / 'dd'}:valid", "prompts")
    odd = write_jsonl(tmp_path / "a:b.jsonl", rows)  # a file whose name has a colon is read as it is
    assert len(read_records(odd, "prompts")) == 2
