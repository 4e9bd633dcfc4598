"""The terminal chat: driven through a pseudo-terminal it answers, keeps history, resets, and
survives Ctrl-C; the session trims history to the context and renders the chat template."""

import sys
import time

import pexpect
import pytest

from mamba_slm.chat import ChatSession, is_chat_model
from mamba_slm.generation import GenerationConfig, load_engine


def spawn_chat(model_dir, *flags):
    child = pexpect.spawn(sys.executable, ["-m", "mamba_slm", "chat", "--model", str(model_dir), *flags],
                          encoding="utf-8", timeout=60)  # fmt: skip
    child.expect("you> ")
    return child


def ask(child, line):
    child.sendline(line)
    child.expect("you> ")
    return child.before


def test_chat_answers_keeps_history_resets_and_exits(tiny_model_dir):
    child = spawn_chat(tiny_model_dir, "--template", "chat", "--max-new-tokens", "8", "--temperature", "0")
    assert "bot> " in ask(child, "Hello there")
    assert "(2 messages)" in ask(child, "/history")
    ask(child, "To be or not to be?")
    history = ask(child, "/history")
    assert "(4 messages)" in history and "[user] Hello there" in history and "[assistant]" in history
    assert "system prompt set" in ask(child, "/system You are terse.")
    assert "conversation cleared" in ask(child, "/reset")
    assert "(0 messages)" in ask(child, "/history")
    assert "unknown command" in ask(child, "/nope")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def stop_a_streaming_reply(child, line):
    child.sendline(line)
    child.expect("bot> ")
    child.expect(r"\S", timeout=30)  # the reply is streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("you> ")


def test_ctrl_c_stops_the_reply_not_the_program(tiny_model_dir):
    # Greedy replies of this model never reach a stop token (sampled ones may end within a few
    # tokens, before the Ctrl-C arrives): every reply is still streaming when it is interrupted.
    child = spawn_chat(tiny_model_dir, "--max-new-tokens", "200000", "--temperature", "0")
    stop_a_streaming_reply(child, "Tell me everything")
    assert "(2 messages)" in ask(child, "/history")  # the partial reply stays in the history
    time.sleep(0.5)  # let the child block in input(): a SIGINT just before its read() waits for the next line
    child.sendintr()  # at the prompt: a hint, not an exit
    child.expect("/exit to quit")
    child.expect("you> ")
    stop_a_streaming_reply(child, "Still there?")  # it still answers
    assert "(4 messages)" in ask(child, "/history")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return load_engine(str(tiny_model_dir))


def test_session_renders_the_chat_template_and_trims_old_turns(engine):
    session = ChatSession(engine, GenerationConfig(max_new_tokens=4, temperature=0), system="Be kind.",
                          context_limit=60)  # fmt: skip
    for question in ["first question here", "second one", "third"]:
        "".join(session.reply(question))
    text = engine.tokenizer.decode(session.prompt_ids())
    assert text.startswith("<|system|>Be kind.<|end|>") and text.endswith("<|assistant|>")
    assert len(session.prompt_ids()) <= 60 - 4
    assert session.history[0]["role"] == "user" and "first question" not in text  # the oldest turn went first


def test_a_reply_limit_beyond_the_context_keeps_the_question(engine):
    session = ChatSession(engine, GenerationConfig(max_new_tokens=10**6), context_limit=60)
    session.history = [{"role": "user", "content": "an old question"}, {"role": "assistant", "content": "ok"},
                       {"role": "user", "content": "What is the new question?"}]  # fmt: skip
    text = engine.tokenizer.decode(session.prompt_ids())
    assert "What is the new question?" in text and len(session.prompt_ids()) <= 30


def test_a_message_longer_than_the_context_keeps_the_system_prompt_and_its_own_end(engine):
    session = ChatSession(engine, GenerationConfig(max_new_tokens=8), system="Be kind.", context_limit=60)
    session.history = [{"role": "user", "content": " ".join(f"w{i}" for i in range(200)) + " the end?"}]
    ids = session.prompt_ids()
    text = engine.tokenizer.decode(ids)
    assert len(ids) <= 60 - 8
    assert text.startswith("<|system|>Be kind.<|end|><|user|>") and text.endswith(
        "the end?<|end|><|assistant|>"
    )


def test_plain_template_continues_the_text(engine):
    session = ChatSession(engine, GenerationConfig(max_new_tokens=4, temperature=0), template="plain")
    reply = "".join(session.reply("To be, or not"))
    expected = engine.generate(["To be, or not"], GenerationConfig(max_new_tokens=4, temperature=0))[0].text
    assert reply == expected


def test_chat_tuned_models_are_detected(tmp_path):
    assert not is_chat_model(tmp_path)
    (tmp_path / "training_args.json").write_text('{"chat": true}')
    assert is_chat_model(tmp_path)
