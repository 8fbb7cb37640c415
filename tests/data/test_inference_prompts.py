"""Prompt rows for generation: the answer split off as the reference, and rows the model cannot answer refused."""

from __future__ import annotations

import pytest

from lightning_qlora.data.inference_prompts import prompt_row
from lightning_qlora.data.prompts import DataError


def chat(*roles):
    return {"messages": [{"role": role, "content": f"{role} {i}"} for i, role in enumerate(roles)]}


def test_a_final_assistant_turn_becomes_the_reference():
    row = prompt_row(chat("system", "user", "assistant", "user", "assistant"), "chat", "p.jsonl line 1")
    assert [m["role"] for m in row.messages] == ["system", "user", "assistant", "user"]
    assert row.reference == "assistant 4"
    row = prompt_row(chat("user"), "chat", "p.jsonl line 1")
    assert [m["role"] for m in row.messages] == ["user"] and row.reference is None
    row = prompt_row({"instruction": "Add.", "input": "1+1", "output": "2", "id": 7}, "alpaca", "p.jsonl line 1")
    assert row.reference == "2" and row.id == 7 and row.messages[-1]["role"] == "user"


@pytest.mark.parametrize(
    ("roles", "named"),
    [
        (("user", "assistant", "assistant"), "the turns are user, assistant, assistant (reference)"),
        (("user", "system"), "the turns are user, system;"),
        (("system", "assistant"), "no user turn to answer"),
    ],
    ids=["two-assistant-turns", "system-last", "no-user"],
)
def test_a_row_whose_answer_would_not_follow_a_user_turn_is_refused(roles, named):
    with pytest.raises(DataError, match="p.jsonl line 3") as err:
        prompt_row(chat(*roles), "chat", "p.jsonl line 3")
    assert named in str(err.value) and "\n" not in str(err.value)
