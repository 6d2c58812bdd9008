"""langchain-tests' standard integration suite, run for real on a tiny random-weight pair.

Tool calling and structured output are not implemented yet (their tests skip through the
``has_tool_calling`` / ``has_structured_output`` flags, which default to False for this class).
"""

from __future__ import annotations

from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_specguard import ChatSpecGuard
from tests.tiny_models import llama_pair


class TestChatSpecGuardIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatSpecGuard

    @property
    def chat_model_params(self) -> dict:
        target, draft = llama_pair()
        return {"target_model": target, "draft_model": draft, "max_tokens": 24, "max_step_tokens": 8, "seed": 0}
