"""langchain-tests' standard unit suite (construction, params, tool-binding flags)."""

from __future__ import annotations

from langchain_core.language_models import BaseChatModel
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_specguard import ChatSpecGuard
from tests.tiny_models import llama_pair


class TestChatSpecGuardUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatSpecGuard

    @property
    def chat_model_params(self) -> dict:
        target, draft = llama_pair()
        return {"target_model": target, "draft_model": draft}
