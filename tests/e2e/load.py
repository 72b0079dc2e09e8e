#!/usr/bin/env python3
"""Load test of `realm serve`: many concurrent streaming clients across several tenants.

    load.py BASE_URL ADMIN_TOKEN MODEL [--tenants 4] [--clients 8] [--requests 2] [--max-tokens 8]

Creates TENANTS tenants; each gets CLIENTS concurrent clients that each send REQUESTS streamed
chat completions one after another (all tenants at once). Passes only with zero errors: every
request is answered 200, every stream has a finish_reason and a usage chunk and ends cleanly,
and each tenant's server-side usage counts exactly its own requests and tokens. Prints
throughput and time-to-first-token percentiles.
"""

import argparse
import asyncio
import sys
import time

from openai import AsyncOpenAI
from realm_admin import admin


def pct(xs, p):
    """The p-th percentile (nearest rank) of xs; NaN for none."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def client_loop(client, model, n, max_tokens, tag, stats):
    for i in range(n):
        t0 = time.perf_counter()
        first, finish, usage, text = None, None, None, ""
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"Tell me about {tag} number {i}."}],
                max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for c in chunk.choices:
                    if c.delta.content and first is None:
                        first = time.perf_counter() - t0
                    text += c.delta.content or ""
                    finish = c.finish_reason or finish
            if finish is None or usage is None:
                raise RuntimeError(f"stream ended without finish_reason/usage ({finish}, {usage})")
            stats["ok"] += 1
            stats["tokens"] += usage.completion_tokens
            stats["per_tenant"][tag] = stats["per_tenant"].get(tag, 0) + usage.completion_tokens
            if first is not None:
                stats["ttft"].append(first)
            stats["latency"].append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - every failure counts, whatever its type
            stats["errors"].append(f"{tag}: {type(e).__name__}: {e}")


async def run(args):
    tenants = []
    for t in range(args.tenants):
        v = admin(args.base, args.admin_token, "POST", "/admin/tenants", {"name": f"load-{t}"})
        tenants.append((v["id"], v["api_key"]))
    stats = {"ok": 0, "tokens": 0, "errors": [], "ttft": [], "latency": [], "per_tenant": {}}
    clients = [AsyncOpenAI(base_url=args.base + "/v1", api_key=key, max_retries=0, timeout=600)
               for _, key in tenants]
    t0 = time.perf_counter()
    await asyncio.gather(*(
        client_loop(clients[t], args.model, args.requests, args.max_tokens, tenants[t][0], stats)
        for t in range(args.tenants) for _ in range(args.clients)
    ))
    wall = time.perf_counter() - t0
    total = args.tenants * args.clients * args.requests
    print(f"load: {args.tenants} tenants x {args.clients} concurrent streaming clients x "
          f"{args.requests} requests = {total}; {stats['ok']} ok, {len(stats['errors'])} errors "
          f"in {wall:.1f} s ({stats['ok'] / wall:.2f} req/s, {stats['tokens'] / wall:.1f} "
          f"generated tokens/s)", file=sys.stderr)
    if stats["ttft"]:
        print(f"load: time to first token p50 {pct(stats['ttft'], 50) * 1000:.0f} ms, "
              f"p99 {pct(stats['ttft'], 99) * 1000:.0f} ms; request latency p50 "
              f"{pct(stats['latency'], 50) * 1000:.0f} ms, p99 "
              f"{pct(stats['latency'], 99) * 1000:.0f} ms", file=sys.stderr)
    for e in stats["errors"][:10]:
        print(f"load: error: {e}", file=sys.stderr)
    if stats["errors"] or stats["ok"] != total:
        sys.exit(1)
    # Usage is recorded per tenant, and only for that tenant.
    for tid, _ in tenants:
        u = admin(args.base, args.admin_token, "GET", f"/admin/tenants/{tid}/usage")
        want_req = args.clients * args.requests
        if u["requests"] != want_req or u["tokens_out"] != stats["per_tenant"][tid]:
            print(f"load: usage of {tid} is {u}; expected {want_req} requests and "
                  f"{stats['per_tenant'][tid]} tokens out", file=sys.stderr)
            sys.exit(1)
    print("load: zero errors; per-tenant usage matches", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base")
    p.add_argument("admin_token")
    p.add_argument("model")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
