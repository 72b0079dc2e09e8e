#!/usr/bin/env python3
"""Compares `realm eval` output (JSON lines) with a reference file in the same format.

    compare-eval.py REFERENCE.jsonl GOT.jsonl --tol 0.25 [--min-greedy 10] [--label NAME]

For every prompt: each of the reference's top-20 (token, logit) pairs must appear in GOT's
`top_logits` (run `realm eval --top 200` so that it does) within `--tol`; the greedy continuation
must be identical up to the first near-tie, a step whose reference best-vs-second gap is at most
0.3 (the criteria of host/engine/tests/golden.rs). When the reference has no gaps (another
`realm eval` run), only the logits are compared and the largest difference is reported.
Exit 1 on any failure.
"""
import argparse
import json
import sys

NEAR_TIE = 0.3


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("reference")
    ap.add_argument("got")
    ap.add_argument("--tol", type=float, required=True)
    ap.add_argument("--min-greedy", type=int, default=0)
    ap.add_argument("--label", default=None)
    a = ap.parse_args()
    label = a.label or a.got
    refs, got = load(a.reference), load(a.got)
    if len(refs) != len(got):
        print(f"{label}: {len(got)} results for {len(refs)} prompts")
        return 1
    worst, greedy_ok, failures = 0.0, 0, []
    for i, (r, g) in enumerate(zip(refs, got)):
        if r["prompt_tokens"] != g["prompt_tokens"]:
            failures.append(f"prompt {i}: different prompt tokens")
            continue
        have = {t: v for t, v in g["top_logits"]}
        for tok, want in r["top_logits"][:20]:
            if tok not in have:
                failures.append(f"prompt {i}: token {tok} (reference logit {want:.4f}) not in the top {len(have)}")
                continue
            d = abs(have[tok] - want)
            worst = max(worst, d)
            if d > a.tol:
                failures.append(f"prompt {i}: token {tok}: {have[tok]:.4f} vs {want:.4f} (|diff| {d:.4f} > {a.tol})")
        gaps = r.get("greedy_gaps")
        if gaps is not None:
            for step, (want, gap) in enumerate(zip(r["greedy"], gaps)):
                if gap <= NEAR_TIE:
                    break
                if step >= len(g["greedy"]) or g["greedy"][step] != want:
                    failures.append(f"prompt {i}: greedy step {step} differs")
                    break
                greedy_ok += 1
    print(f"{label}: max |logit diff| over the reference's top-20 = {worst:.5f} (tolerance {a.tol}); "
          f"{greedy_ok} greedy steps matched")
    if greedy_ok < a.min_greedy:
        failures.append(f"only {greedy_ok} greedy steps compared (want {a.min_greedy})")
    for f in failures[:20]:
        print(f"  FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
