"""`tiermoe chat` as a user drives it: a real subprocess on the built-in model (which has a chat template), fed
through stdin; its replies must be what LLM.chat gives for the same conversation."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.models.registry import DEFAULT_MODEL

SYSTEM = {"role": "system", "content": "Thou art a bard."}


@pytest.fixture(scope="module")
def llm():
    return LLM(DEFAULT_MODEL)


def user(text):
    return {"role": "user", "content": text}


def reply(llm, messages, params):
    return llm.chat(messages, params)[0].outputs[0].text


def start_chat(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tiermoe.cli", "chat", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_chat_keeps_the_conversation_resets_and_ends_at_eof(llm):
    params = SamplingParams(temperature=0, max_tokens=12)
    m1, m2, m3 = "Speak of love.", "What of thy brother?", "Who art thou?"
    r1 = reply(llm, [SYSTEM, user(m1)], params)
    r2 = reply(llm, [SYSTEM, user(m1), {"role": "assistant", "content": r1}, user(m2)], params)
    r3 = reply(llm, [SYSTEM, user(m3)], params)
    assert r2 != reply(llm, [SYSTEM, user(m2)], params)  # the first turn changes the second reply
    proc = start_chat("--max-tokens", "12", "--system", SYSTEM["content"], "--threads", "1")
    stdout, stderr = proc.communicate(f"{m1}\n{m2}\n/reset\n{m3}\n", timeout=300)  # then end of input
    assert proc.returncode == 0, stderr
    assert stdout == f"> {r1}\n> {r2}\n> (conversation reset)\n> {r3}\n> \n"
    assert "/reset" in stderr and "/exit" in stderr  # the banner says how to use it


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(llm):
    proc = start_chat("--max-tokens", "160", "--ignore-eos", "--threads", "1")
    shown = []
    reader = threading.Thread(target=lambda: shown.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    proc.stdin.write("Speak at length.\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 120
    while len("".join(shown)) < 8 and time.monotonic() < deadline:  # "> " then the reply's first characters
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.stdin.write("Be brief.\n/exit\n")
    proc.stdin.close()
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    reader.join(timeout=10)
    stdout = "".join(shown)
    assert stdout.startswith("> ") and "\n[stopped]\n> " in stdout
    partial, second = stdout[2:].split("\n[stopped]\n> ")
    assert 0 < len(llm.tokenizer.encode(partial)) < 160
    # The stopped reply stays in the conversation, and the next one continues from it.
    params = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
    expected = reply(llm, [user("Speak at length."), {"role": "assistant", "content": partial}, user("Be brief.")],
                     params)
    assert second == expected + "\n> "


def test_chat_refuses_a_model_without_template(tiny_models):
    proc = start_chat("--model", str(tiny_models("mixtral")))
    _, stderr = proc.communicate("hello\n", timeout=300)
    assert proc.returncode == 2 and "no tokenizer" in stderr
