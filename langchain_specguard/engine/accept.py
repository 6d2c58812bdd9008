"""The accept rule: how many proposed tokens the target keeps, and the token it writes after them.

Written once, for every place where the target judges tokens someone else proposed (the verification pass
over a draft step, each speculation round while the target writes), for a batch of rows at once. It takes
tensors only, so it is tested without a loaded pair (vLLM's rejection sampler has the same shape).

Token ``i`` of row ``b``'s proposal is kept when

- greedy: it is the target's own choice there (the argmax of its processed distribution), or
- sampling: speculative rejection sampling takes it (``log u_i < log p(x_i) - log q(x_i)``), or
- either way: the verification rule already passed it (``passed[b, i]``, e.g. the target found it
  almost as likely as its own choice; see ``confidence_method``),

and the first token not kept ends the row's run. The target's token there is its choice (greedy) or a draw
from the residual ``max(0, p - q)`` (sampling), which keeps speculative sampling exact when no token was
passed by the verification rule. When every proposal is kept and the caller fed the last one too (the row
has a logits row more than it has proposals), the target's next token comes from that row.

Draft and target may have different numbers of output rows (Qwen2.5-7B has 152,064, its 0.5B draft
151,936): ``q`` is compared with ``p`` over the rows both have, and rows only the target has count as
``q = 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .sampling import draw, residual_sample


class Accepted(NamedTuple):
    kept: int  # leading proposals kept
    token: int | None  # the target's own token after them; None when all were kept and no row follows


def accept(
    proposed: torch.Tensor,
    lengths: Sequence[int],
    rows: Sequence[int],
    *,
    choices: torch.Tensor,
    sampled: Sequence[bool] | None = None,
    logp: torch.Tensor | None = None,
    logq: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    passed: torch.Tensor | None = None,
    draft_logq_at: Callable[[list[int], list[int]], torch.Tensor] | None = None,
) -> list[Accepted]:
    """Apply the rule to each row ``b`` of ``proposed [n, k]`` (its first ``lengths[b]`` tokens).

    ``rows[b]``: the row's logits rows, ``lengths[b]`` or one more (the last proposal was fed too).
    ``choices [n, r]``: the target's greedy choice after each fed position (one definition:
    :func:`~.sampling.greedy`); on the host when the caller read them there, so greedy rows cost no device
    round trip. Rows marked in ``sampled`` use speculative sampling and need ``logp [n, r, V]`` (the target's
    processed log-probabilities), ``logq [n, k]`` (each proposal's log-probability under the distribution the
    draft drew it from), ``uniforms [n, k + 1]`` (row ``b``'s acceptance draws, then at column ``lengths[b]``
    the one for the target's own token) and ``draft_logq_at(rows, positions)``, the draft's processed
    log-probabilities ``[m, V_draft]`` at those rows' first rejections (computed only there). ``passed [n, k]``
    marks proposals the verification rule already accepted. At most two host reads (one without sampling).
    """
    n, k = proposed.shape
    device = choices.device
    proposed = proposed.to(device)
    keep = proposed == choices[:, :k]
    sampling = [bool(s) for s in sampled] if sampled is not None else [False] * n
    if any(sampling):
        assert logp is not None and logq is not None and uniforms is not None, "sampling needs logp, logq and uniforms"
        p = logp[:, :k].gather(-1, proposed[..., None].to(logp.device)).squeeze(-1).to(device)
        drawn = uniforms[:, :k].to(device).log() < p - logq.to(device)
        keep = torch.where(torch.as_tensor(sampling, device=device)[:, None], drawn, keep)
    if passed is not None:
        keep = keep | passed.to(device)
    columns = torch.arange(k, device=device)[None]
    keep = keep & (columns < torch.as_tensor(list(lengths), device=device)[:, None])
    first = torch.cat([~keep, keep.new_ones(n, 1)], dim=1).int().argmax(dim=1)  # the first token not kept
    first = torch.minimum(first, torch.as_tensor(list(lengths), device=device))
    last_row = torch.as_tensor(list(rows), device=device) - 1
    picks = [first, choices.gather(1, torch.minimum(first, last_row)[:, None]).squeeze(1)]
    if any(sampling):
        assert logp is not None and uniforms is not None
        at = torch.as_tensor([min(length, r - 1) for length, r in zip(lengths, rows, strict=True)], device=logp.device)
        bonus_p = logp.gather(1, at[:, None, None].expand(n, 1, logp.shape[-1])).squeeze(1)
        bonus_u = uniforms.gather(1, torch.as_tensor(list(lengths), device=uniforms.device)[:, None]).squeeze(1)
        picks.append(draw(bonus_p.exp(), bonus_u.to(logp.device)).to(device))
    read = torch.stack(picks).tolist()  # the one host read without sampling
    results: list[Accepted | None] = []
    residual: list[int] = []
    for b in range(n):
        kept, length = int(read[0][b]), lengths[b]
        if kept == length and rows[b] <= length:
            results.append(Accepted(length, None))
        elif not sampling[b]:
            results.append(Accepted(kept, int(read[1][b])))
        elif kept == length:
            results.append(Accepted(length, int(read[2][b])))
        else:
            results.append(None)
            residual.append(b)
    if residual:
        assert logp is not None and uniforms is not None and draft_logq_at is not None
        firsts = [int(read[0][b]) for b in residual]
        index = torch.as_tensor(residual, device=logp.device)
        target = logp[index, torch.as_tensor(firsts, device=logp.device)]  # [m, V]
        u = uniforms[index, torch.as_tensor([lengths[b] for b in residual], device=index.device)]
        drawn_tokens = residual_sample(target, shared_rows(draft_logq_at(residual, firsts), target), u).tolist()
        for b, kept, token in zip(residual, firsts, drawn_tokens, strict=True):
            results[b] = Accepted(kept, int(token))
    return [r for r in results if r is not None]


def shared_rows(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """The draft's log-probabilities on the target's rows: cut to them, or padded with ``-inf`` (q = 0)."""
    rows = logp.shape[-1]
    logq = logq.to(logp.device, logp.dtype)
    if logq.shape[-1] >= rows:
        return logq[..., :rows]
    pad = logq.new_full((*logq.shape[:-1], rows - logq.shape[-1]), float("-inf"))
    return torch.cat([logq, pad], dim=-1)
