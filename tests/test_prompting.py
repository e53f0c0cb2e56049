import pytest

from coevo_lib.prompting import format_turn, parse_action, parse_thought


@pytest.mark.parametrize(
    "reply, action",
    [
        ("Thought: look for it\nAction: search[red mug]", "search[red mug]"),
        ("thought: x\naction:   click[B0AB12]  ", "click[B0AB12]"),
        ("Thought: a\nAction: click[x]\nAction: click[buy now]", "click[buy now]"),  # last one wins
        ("click[buy now]", "click[buy now]"),  # no marker: last non-empty line
        ("Thought: hmm\n\nsearch[shoes]\n", "search[shoes]"),
        ("Action: ```sql\nSELECT 1\n```", "SELECT 1"),
        ("Action: SELECT name\nFROM singer", "SELECT name\nFROM singer"),  # multi-line SQL kept
        ("", ""),
        ("ACTION:submit", "submit"),
    ],
)
def test_parse_action_is_tolerant(reply, action):
    assert parse_action(reply) == action


def test_thought_round_trip():
    text = format_turn("I need size m.", "click[m]")
    assert parse_thought(text) == "I need size m." and parse_action(text) == "click[m]"
    assert format_turn("ignored", "click[m]", react=False) == "Action: click[m]"


def test_eto_style_prompt_and_chat_style_prompt():
    from coevo_lib.config import PromptConfig
    from coevo_lib.envs.base import TaskSpec
    from coevo_lib.prompting import ETO_ACKNOWLEDGEMENT, ETO_TASK_INTRO, initial_messages

    example = [{"role": "user", "content": "Task: find a plant"}, {"role": "assistant", "content": "Action: look"},
               {"role": "user", "content": "You see a fern."}, {"role": "assistant", "content": "Action: focus on fern"}]
    spec = TaskSpec(name="toy", system_prompt="You act in a house.", few_shot=example)
    eto = initial_messages(spec, "Task: find an animal", PromptConfig(style="eto", few_shot=True))
    assert [m["role"] for m in eto] == ["user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert eto[0]["content"].startswith("You act in a house.") and eto[1]["content"] == ETO_ACKNOWLEDGEMENT
    assert eto[2]["content"].endswith("Task: find a plant") and eto[3:6] == example[1:]
    assert eto[-1]["content"] == f"{ETO_TASK_INTRO}\nTask: find an animal"
    no_example = initial_messages(spec, "Task: x", PromptConfig(style="eto", few_shot=False))
    assert [m["role"] for m in no_example] == ["user", "assistant", "user"]
    chat = initial_messages(spec, "Task: x", PromptConfig(style="chat", few_shot=True))
    assert chat[0]["role"] == "system" and chat[1:5] == example and chat[-1] == {"role": "user", "content": "Task: x"}


def test_in_context_example_turns_are_never_trained_on(tiny_tokenizer):
    from coevo_lib.prompting import render_ids, tokenize_conversation

    messages = [{"role": "user", "content": "Instruction: buy a red mug"},
                {"role": "assistant", "content": "OK"},
                {"role": "user", "content": "Instruction: buy a blue mug"},
                {"role": "assistant", "content": "Thought: go\nAction: search[blue mug]"}]
    ids, all_turns = tokenize_conversation(tiny_tokenizer, messages)
    _, agent_turns = tokenize_conversation(tiny_tokenizer, messages, prompt_messages=3)
    prompt_len = len(render_ids(tiny_tokenizer, messages[:3], add_generation_prompt=True))
    assert sum(all_turns[:prompt_len]) > 0 and sum(agent_turns[:prompt_len]) == 0  # "OK" is prompt
    assert agent_turns[prompt_len:] == all_turns[prompt_len:] and sum(agent_turns) > 0
