"""Prompt rendering: a task's messages -> the text the model continues.

Messages are dicts `{"role": "user"|"bot"|"system", "content": str}`; a task's last message is
the bot prefix the model continues (e.g. "Ответ:"). Two renderers:

- `ConversationFormat`: llmtf's conversation-config JSON (what the paper used, for base models
  and, with per-model configs such as qwen2.json, for instruct models). `BASE_FORMAT` is
  `non_instruct_simple.json`: `<BOS>{user}\\n{bot answer}\\n\\n...{user}\\n{bot prefix}`.
- `ChatTemplateFormat`: the tokenizer's own Jinja chat template with the final assistant turn
  left open (the reference's later behaviour; the simplest choice for any HF instruct model).
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from lep_megatron.common.io import UserInputError

Message = Dict[str, str]


@dataclass
class ConversationFormat:
    """An llmtf conversation config (conversation_configs/*.json)."""

    user_message_template: str = "{content}\n"
    """Format string with `{role}` and `{content}` for a user message."""
    bot_message_template: str = "{content}\n\n"
    """Format string for a complete bot message (a few-shot answer)."""
    bot_message_template_incomplete: str = "{content}"
    """Format string for the final bot message, which the model continues."""
    system_message_template: str = "{content}\n"
    """Format string for a system message."""
    user_role: str = "user"
    bot_role: str = "bot"
    system_role: str = "system"
    system_prompt: str = ""
    """If non-empty, prepended as a system message."""
    global_prefix: Optional[str] = None
    """Text before the first message; None = the tokenizer's BOS text (or "" without one)."""
    suffix: str = ""
    """Appended only when the last message is not a bot message."""
    eos_token: Union[str, List[str]] = field(default_factory=lambda: ["\n", "\n\n"])
    """Stop strings; single-token ones also stop generation by id."""

    def __post_init__(self):
        for name in ("user_message_template", "bot_message_template", "bot_message_template_incomplete",
                     "system_message_template"):
            if "{content}" not in getattr(self, name):
                raise UserInputError(f"conversation format: {name} must contain '{{content}}'")

    @classmethod
    def from_json(cls, path: Path) -> "ConversationFormat":
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)

    @property
    def stop_strings(self) -> List[str]:
        return [self.eos_token] if isinstance(self.eos_token, str) else list(self.eos_token)

    def render(self, messages: Sequence[Message], bos_text: str) -> str:
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}] + list(messages)
        out = [bos_text if self.global_prefix is None else self.global_prefix]
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] == "user":
                template, role = self.user_message_template, self.user_role
            elif m["role"] == "system":
                template, role = self.system_message_template, self.system_role
            elif m["role"] == "bot":
                template = self.bot_message_template_incomplete if last else self.bot_message_template
                role = self.bot_role
            else:
                raise UserInputError(f"message role {m['role']!r}: expected user, bot or system")
            out.append(template.format(role=role, content=m["content"]))
        if messages[-1]["role"] != "bot":
            out.append(self.suffix)
        return "".join(out)


BASE_FORMAT = ConversationFormat()


@dataclass
class ChatTemplateFormat:
    """The tokenizer's Jinja chat template; the final bot message is continued, not closed."""

    tokenizer: object
    """A transformers tokenizer with a `chat_template`."""
    extra_stop_strings: List[str] = field(default_factory=list)
    """Stop strings besides the tokenizer's eos token."""

    def __post_init__(self):
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserInputError(
                "prompt_format=chat_template: the tokenizer has no chat_template; "
                "use prompt_format=base or a conversation-config JSON path"
            )

    @property
    def stop_strings(self) -> List[str]:
        eos = self.tokenizer.eos_token
        return ([eos] if eos else []) + list(self.extra_stop_strings)

    def render(self, messages: Sequence[Message], bos_text: str) -> str:
        roles = {"user": "user", "bot": "assistant", "system": "system"}
        chat = [{"role": roles[m["role"]], "content": m["content"]} for m in messages]
        last_is_bot = messages[-1]["role"] == "bot"
        return self.tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=not last_is_bot, continue_final_message=last_is_bot
        )


PromptFormat = Union[ConversationFormat, ChatTemplateFormat]


def make_format(spec: str, tokenizer) -> PromptFormat:
    """`base`, `chat_template`, or a path to a conversation-config JSON."""
    if spec == "base":
        return BASE_FORMAT
    if spec == "chat_template":
        return ChatTemplateFormat(tokenizer)
    path = Path(spec)
    if not path.is_file():
        raise UserInputError(
            f"prompt_format={spec}: expected 'base', 'chat_template' or a conversation-config JSON file"
        )
    return ConversationFormat.from_json(path)


@dataclass
class PromptBuilder:
    """Renders messages and assembles few-shot prompts within a token budget."""

    format: PromptFormat
    count_tokens: Callable[[str], int]
    """Token count of a rendered prompt (no special tokens added)."""
    bos_text: str
    """The tokenizer's BOS as text ("" without one): the default global prefix."""
    max_len: int
    """Few-shot examples are added only while the rendered prompt stays below this many tokens."""
    leading_space: bool = False
    """Whether the tokenizer marks a leading space on the first word (SentencePiece style)."""

    def render(self, messages: Sequence[Message]) -> str:
        return self.format.render(messages, self.bos_text)

    def fits(self, messages: Sequence[Message]) -> bool:
        return self.count_tokens(self.render(messages)) < self.max_len

    def prepend_shots(self, test: List[Message], shots: Sequence[List[Message]]) -> List[Message]:
        """llmtf's SimpleFewShotHFTask: put shot i before everything so far, stop at the first
        one that does not fit; so shots[0] ends up next to the test item."""
        messages = list(test)
        for shot in shots:
            candidate = list(shot) + messages
            if not self.fits(candidate):
                break
            messages = candidate
        return messages
