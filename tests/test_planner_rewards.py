"""Planner rewards against hand-computed cases: format (strict and partial credit) and the component F1s."""

from __future__ import annotations

import pytest

from refiner_rl.agents.plan import MAX_CHARS, extract_components, format_plan, parse_plan
from refiner_rl.agents.rewards import (
    action_f1_reward,
    component_f1,
    goal_f1_reward,
    make_decomposition_reward,
    make_f1_reward,
    plan_format_partial_reward,
    plan_format_reward,
    planner_reward_funcs,
    subject_f1_reward,
)
from refiner_rl.errors import ConfigError, DataError

GOLD = [
    {"action": "recolor", "subject": "her coat", "goal": "scarlet"},
    {"action": "remove", "subject": "the sign", "goal": "background only"},
]
GOOD = format_plan(GOLD)


def rewards(completion, gold=GOLD):
    cols = {"decomposition": [gold], "id": ["r1"]}
    return [
        f([None], [completion], **cols)[0]
        for f in (plan_format_reward, action_f1_reward, subject_f1_reward, goal_f1_reward)
    ]


def test_exact_plan_scores_one_everywhere_and_round_trips():
    assert parse_plan(GOOD) == GOLD
    assert rewards(GOOD) == [1.0, 1.0, 1.0, 1.0]
    # Conversational completions, as TRL passes them for chat prompts, read the same.
    assert rewards([{"role": "assistant", "content": GOOD}]) == [1.0, 1.0, 1.0, 1.0]
    assert rewards([{"role": "assistant", "content": [{"type": "text", "text": GOOD}]}]) == [1.0, 1.0, 1.0, 1.0]


def test_reordered_triples_keep_full_f1():
    swapped = format_plan(GOLD[::-1])
    assert rewards(swapped) == [1.0, 1.0, 1.0, 1.0]


def test_partial_matches_hand_computed():
    pred = format_plan(
        [
            {"action": "recolor", "subject": "the red coat", "goal": "scarlet red"},
            {"action": "delete", "subject": "the sign", "goal": "background"},
        ]
    )
    fmt, action, subject, goal = rewards(pred)
    assert fmt == 1.0
    # action: P = {recolor, delete}, G = {recolor, remove}: overlap 1 -> 2 * 1 / (2 + 2)
    assert action == pytest.approx(0.5)
    # subject: P = {the, red, coat, the, sign}, G = {her, coat, the, sign}: overlap {coat, the, sign} = 3 -> 6 / 9
    assert subject == pytest.approx(6 / 9)
    # goal: P = {scarlet, red, background}, G = {scarlet, background, only}: overlap 2 -> 4 / 6
    assert goal == pytest.approx(4 / 6)


def test_phrase_match_is_stricter_than_token_match():
    assert component_f1(["red coat"], ["coat"], "token") == pytest.approx(2 / 3)
    assert component_f1(["red coat"], ["coat"], "phrase") == 0.0
    assert component_f1(["Her  Coat!"], ["her coat"], "phrase") == 1.0  # case, spacing and punctuation ignored
    phrase_subject = make_f1_reward("subject", "phrase")
    assert phrase_subject.__name__ == "subject_f1_reward_phrase"
    # subject phrases P = {her coat, the sign}, G = same
    assert phrase_subject([None], [format_plan(GOLD[::-1])], decomposition=[GOLD]) == [1.0]


def test_missing_and_unclosed_tags():
    text = "<action>recolor</action><subject>her coat"
    fmt, action, subject, goal = rewards(text)
    assert fmt == 0.0
    assert action == pytest.approx(2 / 3)  # P = {recolor}, G = {recolor, remove}
    assert subject == 0.0 and goal == 0.0  # unclosed subject, no goal
    # A triple without its goal is not a plan.
    assert rewards("<action>remove</action><subject>the sign</subject>")[0] == 0.0
    # An empty field is not a plan either.
    assert rewards("<action>remove</action><subject> </subject><goal>x</goal>")[0] == 0.0


def test_duplicate_tags_count_twice_in_precision():
    text = format_plan([GOLD[1], GOLD[1]])
    fmt, action, subject, goal = rewards(text, gold=[GOLD[1]])
    assert fmt == 1.0  # well formed, just redundant
    assert action == pytest.approx(2 / 3)  # P = {remove, remove}, G = {remove}: 2 * 1 / (2 + 1)
    assert subject == pytest.approx(2 / 3)  # P = {the, sign} x 2, G = {the, sign}: 2 * 2 / (4 + 2)
    # A triple whose tag is repeated inside is malformed for format, but every complete span still counts.
    doubled = "<action>remove</action><action>remove</action><subject>the sign</subject><goal>background only</goal>"
    assert rewards(doubled, gold=[GOLD[1]]) == [0.0, pytest.approx(2 / 3), 1.0, 1.0]


def test_empty_output_scores_zero():
    assert rewards("") == [0.0, 0.0, 0.0, 0.0]
    assert rewards(None) == [0.0, 0.0, 0.0, 0.0]
    assert rewards([{"role": "assistant", "content": ""}]) == [0.0, 0.0, 0.0, 0.0]
    assert plan_format_partial_reward([None], [""]) == [0.0]


def test_unicode_is_normalised():
    gold = [{"action": "recolor", "subject": "le café", "goal": "红色"}]
    # "CAFE\u0301" (decomposed accent, upper case) is NFKC-normalised and case-folded to "café".
    pred = "<action>Recolor</action><subject>LE CAFE\u0301</subject><goal>头发 红色</goal>"
    fmt, action, subject, goal = rewards(pred, gold)
    assert (fmt, action, subject) == (1.0, 1.0, 1.0)
    assert goal == pytest.approx(2 / 3)  # P = {头发, 红色}, G = {红色}
    assert parse_plan(pred)[0]["subject"] == "LE CAFE\u0301"


def test_bad_input_never_raises_and_scores_zero_for_format():
    nested = "<action>recolor<subject>her coat</subject></action><subject>x</subject><goal>y</goal>"
    unclosed = "<action>recolor</action><subject>her coat</subject><goal>scarlet"
    stray = GOOD + "</goal>"
    outside = "Sure! " + GOOD
    huge = GOOD * (MAX_CHARS // len(GOOD) + 1)
    for text in (nested, unclosed, stray, outside, huge, "no tags at all", "<action></action>"):
        assert plan_format_reward([None], [text]) == [0.0], text[:40]
    # The innermost complete span of a nested pair still counts for F1; a huge output counts for nothing.
    assert extract_components(nested)["subject"] == ["her coat", "x"]
    assert rewards(huge) == [0.0, 0.0, 0.0, 0.0]
    assert plan_format_partial_reward([None], [huge]) == [0.0]


def test_partial_format_credit_hand_computed():
    # present tags: <action>, </action> = 2 of 6; complete components: action = 1 of 3
    assert plan_format_partial_reward([None], ["<action>recolor</action> and more"]) == [
        pytest.approx(0.5 * 2 / 6 + 0.4 * 1 / 3)
    ]
    # All six tags and all three components, but text outside the triples: 0.9, never 1.
    assert plan_format_partial_reward([None], ["Plan: " + GOOD]) == [pytest.approx(0.9)]
    assert plan_format_partial_reward([None], [GOOD]) == [1.0]
    assert plan_format_partial_reward([None], ["</goal>"]) == [pytest.approx(0.5 / 6)]


def test_missing_ground_truth_names_the_record():
    with pytest.raises(DataError, match=r"record id='r7' has no ground-truth `decomposition`"):
        action_f1_reward([None], [GOOD], decomposition=[None], id=["r7"])
    with pytest.raises(DataError, match="sample 0 of the batch has no ground-truth"):
        goal_f1_reward([None], [GOOD])
    # datasets may hand a list-of-structs column back as a dict of lists.
    as_columns = {
        "action": ["recolor", "remove"],
        "subject": ["her coat", "the sign"],
        "goal": ["scarlet", "background only"],
    }
    assert subject_f1_reward([None], [GOOD], decomposition=[as_columns]) == [1.0]


def test_combined_reward_weighted_sum_and_gated():
    text = "<action>recolor</action><subject>her coat"  # format 0, action 2/3, subject 0, goal 0
    cols = {"decomposition": [GOLD]}
    weighted = make_decomposition_reward((1.0, 2.0, 1.0, 1.0))
    assert weighted([None], [text], **cols) == [pytest.approx((2.0 * 2 / 3) / 5.0)]
    gated = make_decomposition_reward((1.0, 2.0, 1.0, 1.0), combine="gated")
    assert gated([None], [text], **cols) == [0.0]
    partial = make_decomposition_reward((1.0, 1.0, 1.0, 1.0), combine="gated", partial_format=True)
    # partial format = 0.5 * 3/6 (<action>, </action>, <subject>) + 0.4 * 1/3; F1 mean = (2/3) / 3
    assert partial([None], [text], **cols) == [pytest.approx((0.25 + 0.4 / 3) * (2 / 9))]
    assert make_decomposition_reward()([None], [GOOD], **cols) == [1.0]
    with pytest.raises(ConfigError, match="4 non-negative numbers"):
        make_decomposition_reward((1.0, 1.0))
    with pytest.raises(ConfigError, match="unknown `combine: product`"):
        make_decomposition_reward(combine="product")


def test_reward_funcs_by_name_and_dotted_path():
    funcs = planner_reward_funcs(["format", "action", "refiner_rl.agents.rewards.goal_f1_reward"])
    assert [f.__name__ for f in funcs] == ["plan_format_reward", "action_f1_reward", "goal_f1_reward"]
    with pytest.raises(ConfigError, match="unknown reward 'accuracy'"):
        planner_reward_funcs(["accuracy"])
    with pytest.raises(ConfigError, match="unknown F1 `match: exact`"):
        planner_reward_funcs(["action"], match="exact")
