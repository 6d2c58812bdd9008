"""An agent with two tools (calculator, capital lookup) on ChatSpecGuard, offline on the embedded Gemma 3 270M.

Uses langchain's ``create_agent`` (``pip install langchain``, or the package's ``agent`` extra).
Prints the conversation (tool calls, tool results, final answer) and every SpecGuard step: whether
it was text or a tool call, and whether the draft's step was accepted or the target wrote it (and
why: ``score``, or ``schema`` for a draft tool call that was not valid JSON, named an unbound tool
or broke the tool's argument schema).

    python -m langchain_specguard.apps.agent_demo [--question "..."] [--threshold 0.5]

Honest expectation: the embedded model is a 270M *base* model. It was never trained to call tools,
so with the fallback tool prompt and one worked example it sometimes writes a well-formed call and
often does not; the printout shows what happened either way.
"""

from __future__ import annotations

import argparse
import ast
import operator
import time
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool

from ..callbacks import SpecGuardCallbackHandler
from ..chat_models import ChatSpecGuard

DEFAULT_QUESTION = "What is the capital of France?"
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
CAPITALS = {"france": "Paris", "japan": "Tokyo", "italy": "Rome", "kenya": "Nairobi"}


def _arith(node: ast.AST) -> float:
    """+ - * / on numbers from a parsed expression; anything else is refused (no eval)."""
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_arith(node.operand)
    raise ValueError("only numbers and + - * / are allowed")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * /, e.g. '12 * 7'."""
    value = _arith(ast.parse(expression, mode="eval"))
    return str(int(value) if float(value).is_integer() else value)


@tool
def lookup(country: str) -> str:
    """Look up the capital city of a country."""
    return CAPITALS.get(country.strip().lower(), "unknown")


def worked_example() -> list[BaseMessage]:
    """One solved turn, so a base model sees the call format and the tool result in use."""
    return [
        SystemMessage("Answer questions. Use a tool when it helps."),
        HumanMessage("What is the capital of Italy?"),
        AIMessage("", tool_calls=[{"name": "lookup", "args": {"country": "Italy"}, "id": "example_1"}]),
        ToolMessage("Rome", tool_call_id="example_1"),
        AIMessage("The capital of Italy is Rome."),
    ]


class StepLog(SpecGuardCallbackHandler):
    """The step events of every model call the agent made, as a table."""

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.to_records()

    def render(self) -> str:
        rows = ["call step  kind       written by  verdict            text"]
        for s in self.steps:
            call = s["call"] + 1
            verdict = "accepted" if s["accepted"] else f"rejected ({s['reason']})"
            rows.append(
                f"{call:>4} {s['index']:>4}  {s['kind']:<9}  {s['source']:<10}  {verdict:<17}  {s['text'][:70]!r}"
            )
            if s.get("detail"):
                rows.append(f"{'':>33}draft call problem: {s['detail'][:90]}")
        return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--threshold", type=float, default=0.5, help="acceptance_threshold")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from langchain.agents import create_agent  # the agent loop lives in the `langchain` package

    llm = ChatSpecGuard(acceptance_threshold=args.threshold, max_tokens=args.max_tokens, seed=0)
    agent: Any = create_agent(llm, tools=[calculator, lookup])
    log = StepLog()
    started = time.perf_counter()
    state = agent.invoke(
        {"messages": [*worked_example(), HumanMessage(args.question)]},
        config={"callbacks": [log], "recursion_limit": 8},
    )
    seconds = time.perf_counter() - started
    print("conversation (after the worked example):")
    for message in state["messages"][len(worked_example()) :]:
        calls = getattr(message, "tool_calls", None) or []
        bad = getattr(message, "invalid_tool_calls", None) or []
        line = f"  {message.type:>5}: {str(message.content)[:200]!r}"
        line += "".join(f"\n         tool call {c['name']}({c['args']})" for c in calls)
        line += "".join(f"\n         unusable tool call: {b.get('error')}" for b in bad)
        print(line)
    print("\nSpecGuard steps:")
    print(log.render())
    tool_steps = [s for s in log.steps if s["kind"] == "tool_call"]
    print(
        f"\n{len(log.steps)} steps, {len(tool_steps)} tool-call steps, "
        f"{sum(s['accepted'] for s in log.steps)} accepted from the draft, "
        f"{sum(s['reason'] == 'schema' for s in log.steps)} draft tool calls rejected by schema; {seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
