"""Prompt rendering: the base format, a conversation-config JSON, the tokenizer's chat template."""
import json

import pytest

from lep_megatron.common.io import UserInputError
from lep_megatron.evaluation.prompts import BASE_FORMAT, ChatTemplateFormat, ConversationFormat, PromptBuilder, make_format

SHOT = [{"role": "user", "content": "2+2?"}, {"role": "bot", "content": "Ответ: 4"}]
TEST = [{"role": "user", "content": "3+3?"}, {"role": "bot", "content": "Ответ:"}]


def test_base_format(tokenizer):
    assert BASE_FORMAT.render(SHOT + TEST, "<s>") == "<s>2+2?\nОтвет: 4\n\n3+3?\nОтвет:"
    assert BASE_FORMAT.stop_strings == ["\n", "\n\n"]
    assert make_format("base", tokenizer) is BASE_FORMAT


def test_conversation_config_json(tmp_path, tokenizer):
    qwen2 = {
        "system_prompt": "", "user_message_template": "<|im_start|>{role}\n{content}<|im_end|>\n",
        "bot_message_template": "<|im_start|>{role}\n{content}<|im_end|>\n",
        "bot_message_template_incomplete": "<|im_start|>{role}\n{content}",
        "user_role": "user", "bot_role": "assistant", "global_prefix": "", "eos_token": "<|im_end|>",
    }
    path = tmp_path / "qwen2.json"
    path.write_text(json.dumps(qwen2))
    fmt = make_format(str(path), tokenizer)
    assert fmt.render(TEST, "<s>") == "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\nОтвет:"
    assert fmt.stop_strings == ["<|im_end|>"]
    sys_fmt = ConversationFormat(system_prompt="Ты помощник.", global_prefix="")
    assert sys_fmt.render([TEST[0]], "") == "Ты помощник.\n3+3?\n"  # suffix "" after a user turn
    with pytest.raises(UserInputError, match="prompt_format=nope"):
        make_format("nope", tokenizer)


def test_chat_template_continues_the_assistant_turn(tokenizer):
    fmt = make_format("chat_template", tokenizer)
    assert isinstance(fmt, ChatTemplateFormat)
    assert fmt.render(SHOT + TEST, "") == (
        "<s><|user|>\n2+2?</s>\n<|assistant|>\nОтвет: 4</s>\n<|user|>\n3+3?</s>\n<|assistant|>\nОтвет:")
    assert fmt.render([TEST[0]], "") == "<s><|user|>\n3+3?</s>\n<|assistant|>\n"
    assert fmt.stop_strings == ["</s>"]


def test_prepend_shots_within_budget():
    builder = PromptBuilder(format=BASE_FORMAT, count_tokens=lambda t: len(t.split()), bos_text="", max_len=7)
    shots = [[{"role": "user", "content": f"q{i}"}, {"role": "bot", "content": f"a{i}"}] for i in range(3)]
    test = [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]
    # 2 words per block: test 2, +shot0 4, +shot1 6, +shot2 8 >= 7 -> stop; shot0 next to the test item
    assert builder.render(builder.prepend_shots(test, shots)) == "q1\na1\n\nq0\na0\n\nq\na"
