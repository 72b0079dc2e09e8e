#!/usr/bin/env python3
"""Hostile-tenant load test of `realm serve` (issue 11): one tenant attacks while nine behave.

    attack_load.py BASE_URL ADMIN_TOKEN MODEL HOSTILE_WASM [--duration 20] [--streams 200]
                   [--tenants 10] [--good-per-tenant 15] [--max-tokens 8] [--attack-workers 2]
                   [--server-pid PID] [--json FILE]

Two phases of DURATION seconds each, the same well-behaved load in both:

- baseline: TENANTS-1 well-behaved tenants, GOOD_PER_TENANT concurrent streaming chat clients
  each (below the per-tenant guest-instance cap of 16), each client sending one short streamed
  chat completion after another;
- attack: the same, plus the attacker tenant (default quotas) with the rest of the STREAMS
  concurrent clients: ATTACK_WORKERS of them loop over the attacks below, the others send rounds
  of bursts of concurrent streams (far more than its instance cap of 16; every fourth with a
  long prompt that hogs KV pages).

The attacks (the hostile guest is guests/hostile): guest sampling with
`penalty-last-n = u32::MAX`; guest `tokenize` of 15 MiB of prose and of 15 MiB of whitespace
(inside the 16 MiB host-data limit); four 3.9 MB `/v1/completions` prompts at once; a guest
holding a long prompt's KV pages while it decodes; handle misuse (a session used after drop, a
model handle passed as a session, a forged handle).

Fails (exit 1) on any 5xx to anyone, on any dropped or failed stream of a well-behaved tenant
(not 200, an error event, no finish_reason, no `[DONE]`, a transport error or timeout), or when
the server is gone at the end. Prints, per phase, the well-behaved tenants' time-to-first-token
percentiles and their ratio (p99 with the attacker / p99 without; a figure for
docs/benchmarks.md, not asserted here), what each attack got back, `/healthz` latency and, with
--server-pid, the server's peak RSS.
"""

import argparse
import asyncio
import json
import sys
import time

from load import pct
from realm_admin import admin

try:  # the HTTP client the pinned `openai` package depends on (tests/e2e/requirements.txt)
    import httpx2 as httpx
except ImportError:
    import httpx

MIB = 1 << 20


def peak_rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Phase:
    def __init__(self, name):
        self.name = name
        self.ttft = []
        self.latency = []
        self.ok = 0
        self.dropped = []
        self.status = {}
        self.five_xx = []
        self.attacks = {}
        self.attacker_streams = {"ok": 0, "429": 0, "in_stream_error": 0, "other": 0}
        self.healthz = []
        self.attacker_rounds = 0

    def count(self, who, status, what):
        self.status[status] = self.status.get(status, 0) + 1
        if status >= 500:
            self.five_xx.append(f"{who}: {what}: HTTP {status}")


async def read_stream(resp):
    """(time to first content or None, finish_reason, error event, saw [DONE])."""
    first, finish, error, done = None, None, None, False
    t0 = time.perf_counter()
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        ev = json.loads(data)
        if "error" in ev:
            error = ev["error"]
            continue
        for c in ev.get("choices", []):
            content = (c.get("delta") or {}).get("content") or c.get("text")
            if content and first is None:
                first = time.perf_counter() - t0
            finish = c.get("finish_reason") or finish
    return first, finish, error, done


async def good_client(http, key, tag, args, until, ph):
    """Streams one chat completion after another until `until()` says the phase is over."""
    i = 0
    while not until():
        i += 1
        body = {
            "messages": [{"role": "user", "content": f"Tell me about {tag}, topic number {i}."}],
            "model": args.model, "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True,
        }
        t0 = time.perf_counter()
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as r:
                ph.count(tag, r.status_code, "stream")
                if r.status_code != 200:
                    ph.dropped.append(f"{tag}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                    continue
                head = time.perf_counter() - t0
                first, finish, error, done = await read_stream(r)
            if error or not done or finish is None:
                ph.dropped.append(f"{tag}: stream ended badly (error {error}, finish {finish}, "
                                  f"[DONE] {done})")
                continue
            ph.ok += 1
            ph.ttft.append(head + first if first is not None else time.perf_counter() - t0)
            ph.latency.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - every failure of a well-behaved client counts
            ph.dropped.append(f"{tag}: {type(e).__name__}: {e}")


def filler(n_bytes, whitespace=False):
    unit = " \t\n  \n" if whitespace else "The quick brown fox jumps over the lazy dog again. "
    return (unit * (n_bytes // len(unit) + 1))[:n_bytes]


async def attack_step(http, key, name, ph, stop):
    """One attack, retried while it is refused with 429 (the attacker's own streams hold its
    instances and rate budget); records what it finally got back."""
    hdr = {"Authorization": f"Bearer {key}"}
    refused = 0
    while True:
        statuses, detail, secs = await attack_once(http, hdr, name)
        if statuses == [429] and not stop.is_set():
            refused += 1
            ph.count("attacker", 429, name)
            await asyncio.sleep(0.1)
            continue
        break
    a = ph.attacks.setdefault(name, {"runs": 0, "status": {}, "max_s": 0.0, "last": "",
                                     "refused_429": 0})
    a["runs"] += 1
    a["refused_429"] += refused
    a["max_s"] = max(a["max_s"], secs)
    a["last"] = detail
    for s in statuses:
        a["status"][str(s)] = a["status"].get(str(s), 0) + 1
        ph.count("attacker", s, name)


async def attack_once(http, hdr, name):
    t0 = time.perf_counter()
    statuses = []
    try:
        if name == "completions-4x3.9MB":
            prompt = filler(3_900_000)

            async def one():
                r = await http.post("/v1/completions", headers=hdr,
                                    json={"prompt": prompt, "max_tokens": 1})
                return r

            rs = await asyncio.gather(*(one() for _ in range(4)))
            statuses = [r.status_code for r in rs]
            detail = rs[0].text[:160]
        else:
            op = {
                "penalty-last-n-max": {"op": "penalty"},
                "tokenize-15MiB": {"op": "tokenize", "mib": 15, "whitespace": False},
                "tokenize-15MiB-whitespace": {"op": "tokenize", "mib": 15, "whitespace": True},
                "kv-hog-guest": {"op": "hog", "tokens": 6000, "steps": 32},
                "session-after-drop": {"op": "misuse", "how": "after-drop"},
                "model-as-session": {"op": "misuse", "how": "model-as-session"},
                "forged-handle": {"op": "misuse", "how": "forged"},
            }[name]
            r = await http.post("/v1/guests/hostile/invoke", headers=hdr, json=op)
            statuses = [r.status_code]
            detail = r.text[:160]
    except Exception as e:  # noqa: BLE001 - a transport failure is an outcome too
        statuses, detail = [0], f"{type(e).__name__}: {e!r}"
    return statuses, detail, time.perf_counter() - t0


ATTACKS = ["penalty-last-n-max", "tokenize-15MiB", "session-after-drop", "completions-4x3.9MB",
           "tokenize-15MiB-whitespace", "model-as-session", "kv-hog-guest", "forged-handle"]


async def attack_worker(http, key, w, n, stop, ph):
    """Loops over its share of ATTACKS (every n-th from w) until stopped; the n workers' shares
    cover every attack, and the phase lasts until each has run once (see run_phase)."""
    mine = ATTACKS[w::n]
    i = 0
    while not stop.is_set():
        await attack_step(http, key, mine[i % len(mine)], ph, stop)
        i += 1


async def overcap_stream(http, key, w, ph):
    """One of a burst of more concurrent streams than the attacker's instance cap; every fourth
    sends a long prompt (thousands of tokens, to hog KV pages)."""
    hdr = {"Authorization": f"Bearer {key}"}
    prompt = filler(12_000) if w % 4 == 1 else f"Count to {w}."
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "stream": True}
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=hdr) as r:
            ph.count("attacker", r.status_code, "over-cap stream")
            if r.status_code == 429:
                ph.attacker_streams["429"] += 1
                await r.aread()
                return
            if r.status_code != 200:
                ph.attacker_streams["other"] += 1
                await r.aread()
                return
            _, _, error, _ = await read_stream(r)
            ph.attacker_streams["in_stream_error" if error else "ok"] += 1
    except Exception:  # noqa: BLE001 - the attacker's own failures are not the test's
        ph.attacker_streams["other"] += 1


async def attacker_loop(http, key, args, stop, ph):
    """The attack workers loop over the attacks (each holds one of the attacker's instances
    while its attack runs); alongside, rounds of bursts of more concurrent streams than the
    instance cap allows (the streams do not retry, so the attacks keep their instances)."""
    n_attack = min(args.attack_workers, args.attacker_streams)
    burst = args.attacker_streams - n_attack
    workers = [asyncio.create_task(attack_worker(http, key, w, n_attack, stop, ph))
               for w in range(n_attack)]
    await asyncio.sleep(0.5)
    while not stop.is_set():
        ph.attacker_rounds += 1
        await asyncio.gather(*(overcap_stream(http, key, w, ph) for w in range(burst)))
    await asyncio.gather(*workers)


async def healthz_probe(http, stop, ph):
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            r = await http.get("/healthz", timeout=120)
            ok = r.status_code == 200
        except Exception:  # noqa: BLE001
            ok = False
        ph.healthz.append((time.perf_counter() - t0, ok))
        await asyncio.sleep(0.5)


async def run_phase(http, name, good, attacker, args):
    ph = Phase(name)
    deadline = time.perf_counter() + args.duration
    # With the attacker, the phase lasts until every attack has come back at least once too
    # (some take many seconds each: the KV-hog guest took 58-150 s on 2 cores, its host work at
    # the lowest priority), within six times the planned duration and at least three minutes;
    # then attacks in flight get --grace.
    hard_deadline = time.perf_counter() + max(6 * args.duration, 180)

    def over():
        now = time.perf_counter()
        if now >= hard_deadline:
            return True
        return now >= deadline and (attacker is None or all(
            ph.attacks.get(a, {}).get("runs", 0) > 0 for a in ATTACKS))

    stop = asyncio.Event()
    bg = [asyncio.create_task(healthz_probe(http, stop, ph))]
    if attacker is not None:
        bg.append(asyncio.create_task(attacker_loop(http, attacker, args, stop, ph)))
    t0 = time.perf_counter()
    await asyncio.gather(*(good_client(http, key, tid, args, over, ph)
                           for tid, key in good for _ in range(args.good_per_tenant)))
    wall = time.perf_counter() - t0
    stop.set()
    # Attacks in flight get a while to come back (what they get is recorded), then are cut.
    done, pending = await asyncio.wait(bg, timeout=args.grace)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    ph.wall = wall
    return ph


def report(ph, args):
    out = sys.stderr
    hz = [s for s, _ in ph.healthz]
    print(f"attack-load: [{ph.name}] {ph.ok} well-behaved streams ok, {len(ph.dropped)} dropped, "
          f"in {ph.wall:.1f} s ({ph.ok / ph.wall:.1f} streams/s); TTFT p50 "
          f"{pct(ph.ttft, 50) * 1000:.0f} ms, p90 {pct(ph.ttft, 90) * 1000:.0f} ms, p99 "
          f"{pct(ph.ttft, 99) * 1000:.0f} ms; /healthz max {max(hz, default=0) * 1000:.0f} ms "
          f"({sum(1 for _, ok in ph.healthz if not ok)} failed); statuses {ph.status}", file=out)
    for name, a in ph.attacks.items():
        print(f"attack-load: [{ph.name}]   {name}: {a['runs']} runs, statuses {a['status']} "
              f"(after {a['refused_429']} refusals with 429), slowest {a['max_s']:.1f} s; last "
              f"answer: {a['last']!r}", file=out)
    if ph.attacks or any(ph.attacker_streams.values()):
        print(f"attack-load: [{ph.name}]   {ph.attacker_rounds} attacker rounds; over-cap "
              f"streams: {ph.attacker_streams}", file=out)
    for d in ph.dropped[:10]:
        print(f"attack-load: [{ph.name}] dropped: {d}", file=out)
    for f in ph.five_xx[:10]:
        print(f"attack-load: [{ph.name}] 5xx: {f}", file=out)


def summary(ph):
    return {
        "ok": ph.ok, "dropped": len(ph.dropped), "five_xx": len(ph.five_xx),
        "wall_s": round(ph.wall, 2),
        "ttft_ms": {p: round(pct(ph.ttft, p) * 1000, 1) for p in (50, 90, 99)},
        "healthz_max_ms": round(max((s for s, _ in ph.healthz), default=0) * 1000, 1),
        "attacks": ph.attacks, "attacker_streams": ph.attacker_streams, "status": ph.status,
        "attacker_rounds": ph.attacker_rounds,
    }


def once():
    """An `until` for good_client that lets exactly one request through."""
    calls = iter([False])
    return lambda: next(calls, True)


async def run(args):
    good_n = args.tenants - 1
    args.attacker_streams = args.streams - good_n * args.good_per_tenant
    if args.attacker_streams < 1:
        sys.exit("attack-load: --streams leaves no streams for the attacker")
    quotas = {"requests_per_minute": 100000, "burst": 10000}
    good = []
    for t in range(good_n):
        v = admin(args.base, args.admin_token, "POST", "/admin/tenants",
                  {"name": f"good-{t}", "quotas": quotas})
        good.append((v["id"], v["api_key"]))
    # The attacker gets the default quotas: what any tenant gets.
    v = admin(args.base, args.admin_token, "POST", "/admin/tenants", {"name": "attacker"})
    attacker = v["api_key"]
    limits = httpx.Limits(max_connections=args.streams + 50,
                          max_keepalive_connections=args.streams + 50)
    timeout = httpx.Timeout(args.timeout)
    async with httpx.AsyncClient(base_url=args.base, limits=limits, timeout=timeout) as http:
        with open(args.hostile, "rb") as f:
            r = await http.post("/v1/guests?name=hostile", content=f.read(),
                                headers={"Authorization": f"Bearer {attacker}",
                                         "Content-Type": "application/wasm"})
        if r.status_code not in (200, 201):
            sys.exit(f"attack-load: uploading the hostile guest: HTTP {r.status_code}: {r.text}")
        # Warm-up: one request per tenant (guest compilation, first allocations).
        warm = Phase("warm-up")
        await asyncio.gather(*(good_client(http, key, tid, args, once(), warm)
                               for tid, key in good))
        print(f"attack-load: {good_n} well-behaved tenants x {args.good_per_tenant} streams "
              f"= {good_n * args.good_per_tenant}, attacker {args.attacker_streams} "
              f"({min(args.attack_workers, args.attacker_streams)} running attacks); "
              f"{args.duration:.0f} s per phase, max_tokens {args.max_tokens}", file=sys.stderr)
        base = await run_phase(http, "baseline", good, None, args)
        report(base, args)
        att = await run_phase(http, "attack", good, attacker, args)
        report(att, args)
        try:
            alive = (await http.get("/healthz", timeout=60)).status_code == 200
        except Exception:  # noqa: BLE001
            alive = False
    ratio = pct(att.ttft, 99) / pct(base.ttft, 99) if base.ttft and att.ttft else float("nan")
    rss = peak_rss_mib(args.server_pid) if args.server_pid else None
    print(f"attack-load: well-behaved p99 TTFT with the attacker / without: {ratio:.2f} "
          f"({pct(att.ttft, 99) * 1000:.0f} ms / {pct(base.ttft, 99) * 1000:.0f} ms; target "
          f"<= 1.15)" + (f"; server peak RSS {rss:.0f} MiB" if rss else ""), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "admin_token"},
                       "baseline": summary(base), "attack": summary(att),
                       "p99_ttft_ratio": round(ratio, 3), "server_peak_rss_mib": rss,
                       "server_alive": alive}, f, indent=1)
    failures = []
    if not alive:
        failures.append("the server no longer answers /healthz")
    for ph in (base, att):
        if ph.five_xx:
            failures.append(f"{ph.name}: {len(ph.five_xx)} responses were 5xx")
        if ph.dropped:
            failures.append(f"{ph.name}: {len(ph.dropped)} well-behaved streams dropped")
        if ph.ok == 0:
            failures.append(f"{ph.name}: no well-behaved stream completed")
    never = [a for a in ATTACKS if not att.attacks.get(a, {}).get("runs")]
    if never:
        failures.append(f"these attacks never came back within the phase: {', '.join(never)}")
    for f in failures:
        print(f"attack-load: FAIL: {f}", file=sys.stderr)
    if failures:
        sys.exit(1)
    print("attack-load: zero 5xx, zero dropped well-behaved streams", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base")
    p.add_argument("admin_token")
    p.add_argument("model")
    p.add_argument("hostile", help="guests/hostile's .wasm")
    p.add_argument("--duration", type=float, default=20, help="seconds per phase")
    p.add_argument("--streams", type=int, default=200, help="concurrent clients in all")
    p.add_argument("--tenants", type=int, default=10, help="tenants, the attacker included")
    p.add_argument("--good-per-tenant", type=int, default=15)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--attack-workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300, help="per-request client timeout")
    p.add_argument("--grace", type=float, default=60,
                   help="seconds the attacker's requests in flight get after a phase")
    p.add_argument("--server-pid", type=int)
    p.add_argument("--json", help="write the figures here")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
