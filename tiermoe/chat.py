"""`tiermoe chat`: a conversation with a model in the terminal, replies streamed token by token.

The whole conversation is rendered with the model's chat template at every turn (LLM.chat_prompt), so the model sees
what was said before. `/reset` forgets it (keeping the system message), `/exit` or end of input (Ctrl-D) leaves.
Ctrl-C during a reply stops that reply after the token being computed (the model is never interrupted mid-step); what
was shown stays in the conversation as the assistant's turn.
"""

from __future__ import annotations

import signal
import sys
from contextlib import closing
from dataclasses import dataclass, field
from typing import TextIO

from tiermoe.errors import RequestError, TiermoeError
from tiermoe.sampling_params import SamplingParams

COMMANDS = "/reset forgets the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply"


@dataclass
class Conversation:
    """The messages so far, as the chat template takes them."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})


class StopOnInterrupt:
    """While active, Ctrl-C (SIGINT) only sets `requested`; the reply loop checks it between tokens."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopOnInterrupt:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def chat(llm, params: SamplingParams, system: str | None = None, stdin: TextIO = sys.stdin,
         stdout: TextIO = sys.stdout) -> int:
    """Run the conversation loop until /exit or end of input; returns the exit status."""
    if params.n != 1:
        raise RequestError("chat keeps one conversation: n must be 1")
    conversation = Conversation(system)
    llm.chat_prompt([*conversation.messages, {"role": "user", "content": "."}])  # no template: refuse at start
    if stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    print(f"tiermoe chat with {llm.config.model}: {COMMANDS}", file=sys.stderr)
    while (line := _read(stdout)) is not None:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            conversation.reset()
            print("(conversation reset)", file=stdout, flush=True)
        elif text.startswith("/"):
            print(f"unknown command {text.split()[0]}: {COMMANDS}", file=sys.stderr)
        elif text:
            _turn(llm, params, conversation, text, stdout)
    return 0


def _read(stdout: TextIO) -> str | None:
    """The user's next line; None at end of input. Ctrl-C at the prompt gives an empty line."""
    try:
        return input("> ")
    except EOFError:
        print(file=stdout)
        return None
    except KeyboardInterrupt:
        print(f"\n({COMMANDS})", file=sys.stderr)
        return ""


def _turn(llm, params: SamplingParams, conversation: Conversation, text: str, stdout: TextIO) -> None:
    """Send the user's message with the conversation so far and stream the reply into it."""
    conversation.add("user", text)
    try:
        prompt = llm.chat_prompt(conversation.messages)
        reply, finish, stopped = _stream(llm, prompt, params, stdout)
    except TiermoeError as e:  # e.g. the conversation outgrew the context: the message is not kept
        conversation.messages.pop()
        print(f"error: {e} (/reset starts a new conversation)", file=sys.stderr)
        return
    conversation.add("assistant", reply)
    if stopped:
        print("[stopped]", file=stdout, flush=True)
    elif finish == "length":
        print(f"(reply cut at {params.max_tokens} tokens, --max-tokens, or at the context's end)", file=sys.stderr)


def _stream(llm, prompt, params: SamplingParams, stdout: TextIO) -> tuple[str, str | None, bool]:
    """Print the reply as it grows; returns (its text, finish reason, whether Ctrl-C stopped it)."""
    shown, text, finish = 0, "", None
    with StopOnInterrupt() as interrupt, closing(llm.stream(prompt, params)) as outputs:
        for out in outputs:
            text, finish = out.outputs[0].text, out.outputs[0].finish_reason
            print(text[shown:], end="", file=stdout, flush=True)
            shown = len(text)
            if interrupt.requested:
                break
    print(file=stdout, flush=True)
    return text, finish, interrupt.requested and finish is None
