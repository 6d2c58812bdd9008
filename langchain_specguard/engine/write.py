"""Writing a rejected step: the target continues from its first disagreement, sped up by the draft.

What the target writes is exactly what it would write alone (greedy: its argmax at every position;
sampling: its own distribution, through speculative rejection sampling), so "every step rejected"
still equals the target's own ``generate()``. Within the step the draft proposes ``gamma`` tokens, one
target pass checks them all and adds its own next token; ``gamma`` follows the measured agreement
(:class:`Agreement`), and a draft that rarely agrees makes it 0: plain target decoding, one graph
replay and one host read per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .accept import accept
from .sampling import penalise, processed_logprobs

if TYPE_CHECKING:
    from .generation import Generation


@dataclass
class Written:
    tokens: list[int]
    speculated: int = 0  # draft tokens the target accepted while writing
    drafted: int = 0  # draft positions computed while writing
    target_forwards: int = 0


def write(gen: Generation, proposal_tokens: list[int], agree: int, next_token: int | None, limit: int) -> Written:
    """The target's step: the ``agree`` kept tokens, its own next token, then on to the step's end."""
    tokens = proposal_tokens[:agree]
    if next_token is None:  # the target agrees with the whole step
        return Written(tokens)
    tokens.append(next_token)
    written = Written(tokens)
    end = gen.out.step_end(tokens, agree)
    plain = False
    while end is None and len(tokens) < limit:
        room = limit - len(tokens)
        gamma = 0 if plain else gen.agreement.speculation_length(room - 1)
        if gamma == 0:
            if not plain:
                _start_target_decoding(gen, tokens)
                plain = True
            new = _target_token(gen)
            written.target_forwards += 1
        else:
            new = _speculate(gen, tokens, gamma)
            agree = len(new) - 1  # the draft's tokens the target kept, then its own
            gen.agreement.observe(agree, agree < gamma)  # the next round's length follows it
            written.speculated += agree
            written.drafted += gen.runtime.draft.batch * gamma
            written.target_forwards += 1
        end = gen.out.step_end([*tokens, *new], len(tokens))
        tokens.extend(new)
        gen.runtime.rewind(len(gen.ids) + len(tokens) - 1)  # the next round feeds the last token again
    written.tokens = tokens[:end] if end is not None else tokens[:limit]
    return written


def _start_target_decoding(gen: Generation, tokens: list[int]) -> None:
    target, seq = gen.runtime.target, [*gen.ids, *tokens]
    target.prefill(seq[target.cache.valid : len(seq) - 1], target.cache.valid)
    top = gen.logprobs.top if gen.logprobs is not None else 0
    target.start_decode(
        seq[-1], len(seq) - 1, [gen.params.temperature], gen.controls, seen=gen.seen(target, tokens), top_logprobs=top
    )


def _target_token(gen: Generation) -> list[int]:
    target = gen.runtime.target
    target.decode(1, gen.generator)
    if gen.logprobs is not None:
        gen.logprobs.add_decoded(target, 0, target.decoded - 1, target.decoded)
    return [int(target.out_tokens[0, target.decoded - 1])]


def _speculate(gen: Generation, tokens: list[int], gamma: int) -> list[int]:
    """One round: the draft proposes ``gamma`` tokens, one target pass keeps the agreeing ones plus its own."""
    params, draft, target = gen.params, gen.runtime.draft, gen.runtime.target
    seq = [*gen.ids, *tokens]
    last = len(seq) - 1
    draft.prefill(seq[draft.cache.valid : last], draft.cache.valid)
    temperatures = [params.temperature] * draft.batch
    draft.start_decode(seq[-1], last, temperatures, gen.controls, follow_first=True, seen=gen.seen(draft, tokens))
    draft.decode(gamma, gen.generator)
    target.prefill(seq[target.cache.valid : last], target.cache.valid)
    target.tokens_in[:, 0].fill_(seq[-1])
    target.tokens_in[:, 1 : gamma + 1].copy_(draft.out_tokens[0, :gamma])
    logits = target.forward(None, last, q=gamma + 1)[0]  # [gamma + 1, V]
    proposed = draft.out_tokens[0, :gamma]
    if params.temperature == 0 and not gen.controls.penalised:  # proposals and choices in one host read
        both = torch.cat([proposed.to(logits.device), logits.argmax(dim=-1)]).cpu()
        fed = [seq[-1], *both[:gamma].tolist()]
        result = accept(None, both[:gamma], greedy=True, choices=both[gamma:])
    elif params.temperature == 0:
        fed = [seq[-1], *proposed.tolist()]
        seen = gen.seen_rows(target, tokens, fed, logits.device)
        result = accept(penalise(logits, seen, gen.controls.repetition_penalty), proposed, greedy=True)
    else:
        fed = [seq[-1], *proposed.tolist()]
        seen = gen.seen_rows(target, tokens, fed, logits.device)
        temperature = torch.tensor(params.temperature, dtype=torch.float64, device=logits.device)

        def draft_logq_at(i: int) -> torch.Tensor:  # the draft's distribution there, computed again
            draft_logits = draft.forward([fed[i]], last + i)[0, -1]
            draft_seen = gen.seen(draft, [*tokens, *fed[1 : i + 1]])
            return processed_logprobs(draft_logits, temperature.to(draft_logits.device), gen.controls, draft_seen)

        result = accept(
            processed_logprobs(logits, temperature, gen.controls, seen),
            proposed,
            greedy=False,
            logq=draft.out_logq[0, :gamma],
            uniforms=gen.uniform(gamma + 1),
            draft_logq_at=draft_logq_at,
        )
    agree = result.kept
    assert result.token is not None  # the round fed every proposal: the target always has a next token
    new = [*fed[1 : agree + 1], result.token]
    if gen.logprobs is not None:
        gen.logprobs.add_logits(logits[: agree + 1], new)
    return new
