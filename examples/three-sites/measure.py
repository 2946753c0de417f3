#!/usr/bin/env python3
"""Figures for sessions and Idempotency-Key on a running `atoll dev` (release build):

    python3 examples/three-sites/measure.py session US_URL EU_URL 300   # read after a write elsewhere
    python3 examples/three-sites/measure.py idem US_URL EU_URL 500      # keyed vs plain POST
    atoll dev latency eu-west-1=300 && python3 examples/three-sites/measure.py forward US_URL EU_URL 30
"""
import http.client, json, sys, time, statistics, uuid, urllib.parse
def call(url, method, path, headers):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    t = time.perf_counter()
    c.request(method, path, body=b"" if method == "POST" else None, headers=headers)
    r = c.getresponse(); body = r.read(); dt = (time.perf_counter() - t) * 1000
    h = dict((k.lower(), v) for k, v in r.getheaders())
    c.close()
    return r.status, body, h, dt
def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round((len(xs) - 1) * p)))]
mode, us, eu = sys.argv[1], sys.argv[2], sys.argv[3]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 200
if mode == "session":
    plain, tok, stale, waited = [], [], 0, 0
    for i in range(n):
        k = f"/apps/counter/s{uuid.uuid4().hex[:8]}"
        s, b, h, _ = call(eu, "POST", k, {"x-atoll-region": "eu-west"})
        token = h["x-atoll-session"]
        s1, b1, h1, d1 = call(us, "GET", k, {"x-atoll-region": "us-east"})
        s2, b2, h2, d2 = call(us, "GET", k, {"x-atoll-region": "us-east", "x-atoll-session": token})
        plain.append(d1); tok.append(d2)
        if b2.strip() != b"1" or h2.get("x-atoll-stale"): stale += 1
    print(f"read at us-east-1 right after a write at eu-west-1, {n} times: without token p50 {pct(plain,.5):.2f} p99 {pct(plain,.99):.2f} ms; with token p50 {pct(tok,.5):.2f} p99 {pct(tok,.99):.2f} ms; token reads not seeing the write: {stale}")
elif mode == "forward":
    lat = []
    for i in range(n):
        k = f"/apps/counter/f{uuid.uuid4().hex[:8]}"
        s, b, h, _ = call(eu, "POST", k, {"x-atoll-region": "eu-west"})
        s2, b2, h2, d2 = call(us, "GET", k, {"x-atoll-region": "us-east", "x-atoll-session": h["x-atoll-session"]})
        assert h2.get("x-atoll-route") == "session" and b2.strip() == b"1", (h2, b2)
        lat.append(d2)
    print(f"forwarded reads ({n}): p50 {pct(lat,.5):.1f} p99 {pct(lat,.99):.1f} ms")
elif mode == "idem":
    for keyed in (False, True, False, True):
        lat = []
        t0 = time.perf_counter()
        for i in range(n):
            hd = {"x-atoll-region": "us-east"}
            if keyed: hd["idempotency-key"] = uuid.uuid4().hex
            s, b, h, d = call(us, "POST", "/apps/counter/idem", hd)
            assert s == 200
            lat.append(d)
        el = time.perf_counter() - t0
        print(f"{'keyed' if keyed else 'plain'} POST x{n} (one client): p50 {pct(lat,.5):.2f} p99 {pct(lat,.99):.2f} ms, {n/el:.0f}/s")
