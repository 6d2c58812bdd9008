"""The accept rule: how many proposed tokens the target keeps, and the token it writes after them.

Written once, for every place where the target judges tokens someone else proposed: the verification
pass over a draft step (what a rejected step keeps) and each speculation round while the target
writes. It takes tensors only, so it is tested without a loaded pair (vLLM's rejection sampler has
the same shape).

Token ``i`` of the proposal is kept when

- greedy: it is the target's own choice (the argmax of its processed distribution), or
- sampling: speculative rejection sampling takes it (``log u_i < log p(x_i) - log q(x_i)``), or
- either way: the verification rule already passed it (``passed[i]``, e.g. the target found it
  almost as likely as its own choice; see ``confidence_method``),

and the first token not kept ends the run. The target's token there is its argmax (greedy) or a draw
from the residual ``max(0, p - q)`` (sampling), which keeps speculative sampling exact when no token
was passed by the verification rule. When every proposal is kept and the caller fed the last one too
(``logp`` has a row more than there are proposals), the target's next token is drawn from that row.

Draft and target may have different numbers of output rows (Qwen2.5-7B has 152,064, its 0.5B draft
151,936): ``q`` is compared with ``p`` over the rows both have, and rows only the target has count as
``q = 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .sampling import draw, residual_sample


class Accepted(NamedTuple):
    kept: int  # leading proposals kept
    token: int | None  # the target's own token after them; None when all were kept and no row follows


def accept(
    logp: torch.Tensor | None,
    proposed: torch.Tensor,
    *,
    greedy: bool,
    choices: torch.Tensor | None = None,
    logq: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    passed: torch.Tensor | None = None,
    draft_logq_at: Callable[[int], torch.Tensor] | None = None,
) -> Accepted:
    """Apply the rule to ``proposed [k]`` under the target's processed log-probabilities ``logp [k or k+1, V]``.

    Greedy reads only the target's choice at each row: ``choices [k or k+1]`` when the caller already has
    them (e.g. read to the host with the step's scores, so the rule costs no device round trip), else the
    argmax of ``logp`` (penalised logits do as well). Sampling needs ``logp``, ``logq [k]`` (each proposal's
    log-probability under the distribution the draft drew it from), ``uniforms [k + 1]`` (the acceptance
    draws and one for the target's own token) and ``draft_logq_at(i)``, the draft's processed
    log-probabilities ``[V_draft]`` at position ``i`` (computed only at the first rejection). ``passed [k]``
    (bool) marks proposals the verification rule already accepted. At most one host read.
    """
    if choices is None:
        assert logp is not None, "accept needs the target's log-probabilities or its choices"
        choices = logp.argmax(-1)
    top = choices  # [rows]
    k, rows, device = int(proposed.shape[0]), int(top.shape[0]), top.device
    proposed = proposed.to(device)
    if greedy:
        keep = proposed == top[:k]
    else:
        assert logp is not None and logq is not None and uniforms is not None, "sampling needs logq and uniforms"
        p = logp[:k].gather(-1, proposed[:, None]).squeeze(-1)
        keep = uniforms[:k].to(device).log() < p - logq.to(device)
    if passed is not None:
        keep = keep | passed.to(device)
    first_t = torch.cat([~keep, keep.new_ones(1)]).int().argmax()  # the first token not kept (k: none)
    first, token = torch.stack([first_t, top[first_t.clamp(max=rows - 1)]]).tolist()  # the one host read
    if first == k and rows <= k:
        return Accepted(k, None)
    if greedy:
        return Accepted(first, token)
    assert logp is not None and uniforms is not None
    u = uniforms[k].to(logp.device)
    if first == k:
        return Accepted(k, int(draw(logp[k].exp(), u)))
    assert draft_logq_at is not None
    return Accepted(first, int(residual_sample(logp[first], shared_rows(draft_logq_at(first), logp), u)))


def shared_rows(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """The draft's log-probabilities on the target's rows: cut to them, or padded with ``-inf`` (q = 0)."""
    rows = logp.shape[-1]
    logq = logq.to(logp.device, logp.dtype)
    if logq.shape[-1] >= rows:
        return logq[..., :rows]
    pad = logq.new_full((*logq.shape[:-1], rows - logq.shape[-1]), float("-inf"))
    return torch.cat([logq, pad], dim=-1)
