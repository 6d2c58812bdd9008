"""langchain-tests' standard integration suite, run for real on tiny random-weight pairs, twice.

``TestChatSpecGuardIntegration`` runs it on a random-weight pair as it is. Tool calling and structured output
are switched on (``bind_tools`` exists, so the suite's ``has_tool_calling``/``has_structured_output`` are
True). The tests that render tool histories, bind tools and parse the answer pass; the ones that need the
model to *decide* to call a tool and write a correct call (``magic_function`` with ``{"input": 3}``, a joke
schema...) are strict xfails in ``conftest.py``, each with the model limit that explains it.

``TestChatSpecGuardScripted`` runs the whole suite again on the smallest tiny pair with both models scripted
to answer as a perfect caller would (:func:`tests.scripted.perfect_caller`: the tool the question names, its
arguments from the question, plain text after a tool result). Only the logits are scripted: drafting, step
boundaries, scoring, acceptance, the target's fallback, tool-call steps and their schema checks, parsing,
structured output and the message round trip are the package's own code, so every failure here is the
package's. It found two (issue 29 item 8): ``test_agent_loop`` with ``output_version="v1"`` and
``test_structured_output_pydantic_2_v1``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from langchain_specguard import ChatSpecGuard
from tests.scripted import force_script, perfect_caller
from tests.tiny_models import long_llama_pair, scripted_pair


class TestChatSpecGuardIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatSpecGuard

    @property
    def chat_model_params(self) -> dict:
        # a 4096-position window: the fallback tool prompt is long in characters (char-level tokenizer)
        target, draft = long_llama_pair()
        return {"target_model": target, "draft_model": draft, "max_tokens": 24, "max_step_tokens": 8, "seed": 0}

    @property
    def supports_json_mode(self) -> bool:
        return True  # json_mode is a forced call of the schema's tool: test_json_mode passes when scripted


@functools.cache
def _scripted_tokenizer() -> PreTrainedTokenizerBase:
    """One tokenizer object for every instance of the scripted class: its identity is part of the loading key, so
    they all share the one pair the class scripts, and no other test's instance gets it."""
    return AutoTokenizer.from_pretrained(scripted_pair()[0])


class TestChatSpecGuardScripted(ChatModelIntegrationTests):
    """The standard suite against a perfect caller: the package's code is what it exercises."""

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatSpecGuard

    @property
    def chat_model_params(self) -> dict:
        target, draft = scripted_pair()
        return {
            "target_model": target,
            "draft_model": draft,
            "tokenizer": _scripted_tokenizer(),
            "max_tokens": 160,  # the longest scripted answer (the Unicode tool call) is about 130 characters
            "n_candidates": 2,
            "seed": 0,
        }

    @property
    def supports_json_mode(self) -> bool:
        return True

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _perfect_caller(cls) -> Iterator[None]:
        """Load the class's pair once and script both of its models; the instance held here keeps the scripted pair
        loaded for every test of the class (instances with the same loading options share it)."""
        holder = ChatSpecGuard(**cls().chat_model_params)
        pair = holder.load()
        force_script(pair.draft, pair.tokenizer, perfect_caller)
        force_script(pair.target, pair.tokenizer, perfect_caller)
        yield
        del holder
