"""How often a self-speculative draft of the first ``k`` layers agrees with its target, per ``k``, and what its
subset head loses: measured along the target's own greedy continuations of GSM8K prompts (teacher forcing).

For each prompt the target writes ``--max-tokens`` tokens greedily; one forward pass over prompt and answer gives
every layer's hidden state, and the early exit at layer ``k`` (final norm, then the LM head, as the engine's
self-speculative draft computes it) is compared with the target at each answer position:

- ``argmax``: the draft's greedy token is the target's (what token-level speculation keeps);
- ``ratio``: the target's probability of the draft's token is at least half of its own first choice's (the
  default step rule's per-token test, ``confidence_method="ratio"`` at 0.5);
- the same two with the draft's head restricted to the ``--vocab`` most frequent tokens (engine/draft_vocab.py),
  and with that subset joined by the prompt's own tokens; the share of the target's tokens each covers.

    PYTHONPATH=. python benchmarks/cpu_draft_depth.py --limit 5 --max-tokens 128 --out benchmarks/results/x.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from langchain_specguard.apps.bench import encode_prompts, load_problems
from langchain_specguard.engine.draft_vocab import frequent_ids
from langchain_specguard.engine.loading import load_embedded_pair

DATA = "/work/shared/data/gsm8k/test.jsonl"
HALF = -0.6931471805599453  # log(0.5): the default threshold of the ratio rule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    pair = load_embedded_pair()
    model = pair.target
    head = model.get_output_embeddings()
    norm = model.model.norm
    layers = int(model.config.num_hidden_layers)
    subset = frequent_ids(pair.tokenizer, args.vocab, int(head.out_features), pair.eos_token_ids)
    problems = load_problems(args.data, args.limit)
    prompts = encode_prompts(pair, [q for q, _ in problems], "chat")
    counts = {k: [0] * 6 for k in range(1, layers)}  # argmax and ratio: full head, subset, subset + prompt
    covered = with_prompt = total = 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                 do_sample=False, pad_token_id=pair.tokenizer.pad_token_id or 0)  # fmt: skip
            n = out.shape[1] - len(prompt)
            states = model(out, output_hidden_states=True).hidden_states
            rows = slice(len(prompt) - 1, out.shape[1] - 1)  # positions predicting the answer's tokens
            final = torch.log_softmax(model(out).logits[0, rows].float(), -1)
            best = final.max(-1).values
            chosen = final.argmax(-1)
            joined = torch.unique(torch.cat([subset, ids[0]]))
            covered += int(torch.isin(chosen, subset).sum())
            with_prompt += int(torch.isin(chosen, joined).sum())
            total += n
            for k in range(1, layers):
                logits = head(norm(states[k][0, rows])).float()
                for j, cols in enumerate((None, subset, joined)):
                    part = logits if cols is None else logits[:, cols]
                    pick = part.argmax(-1) if cols is None else cols[part.argmax(-1)]
                    counts[k][2 * j] += int((pick == chosen).sum())
                    counts[k][2 * j + 1] += int((final.gather(-1, pick[:, None])[:, 0] - best >= HALF).sum())
    lines = [
        f"command: {' '.join(sys.argv)}",
        f"{pair.name}: {layers} layers; {len(prompts)} GSM8K prompts, {total} target tokens (greedy); subset head "
        f"{len(subset)} tokens covers {covered / total:.3f} of the target's tokens, with the prompt's tokens "
        f"{with_prompt / total:.3f}",
        f"{'layers':>6} {'argmax':>7} {'ratio>=.5':>9} {'argmax@subset':>13} {'ratio@subset':>12} "
        f"{'argmax@subset+prompt':>20} {'ratio@subset+prompt':>19}",
    ]
    for k, (a, r, sa, sr, pa, pr) in counts.items():
        lines.append(
            f"{k:>6} {a / total:7.3f} {r / total:9.3f} {sa / total:13.3f} {sr / total:12.3f} {pa / total:20.3f} "
            f"{pr / total:19.3f}"
        )
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
