#!/usr/bin/env python3
"""Figures for sessions and Idempotency-Key on a running `atoll dev` (release build):

    python3 examples/three-sites/measure.py session US_URL EU_URL 300   # read after a write elsewhere
    python3 examples/three-sites/measure.py idem US_URL EU_URL 500      # keyed vs plain POST
    atoll dev latency eu-west-1=300 && python3 examples/three-sites/measure.py forward US_URL EU_URL 30
    python3 examples/three-sites/measure.py page SITE_URL SITE_PID 60     # status page size and CPU
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
elif mode == "page":
    # python3 measure.py page SITE_URL PID SECONDS: the status page's size, the history's CPU,
    # and the site's CPU while a page polls it every second (as the page does) or not.
    import gzip, os
    pid, secs = int(eu), n
    tick = os.sysconf("SC_CLK_TCK")
    def cpu(path):
        f = open(path).read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) * 1000 / tick  # utime + stime, ms
    def thread(name):
        for tid in os.listdir(f"/proc/{pid}/task"):
            if open(f"/proc/{pid}/task/{tid}/comm").read().strip() == name:
                return f"/proc/{pid}/task/{tid}/stat"
    s, page, h, _ = call(us, "GET", "/_atoll/ui", {})
    s, full, h, _ = call(us, "GET", "/_atoll/ui/state?since=0", {})
    state = json.loads(full)
    last = state["history"]["samples"][-1]["t"]
    time.sleep(1.1)
    s, new, h, _ = call(us, "GET", f"/_atoll/ui/state?since={last}", {})
    print(f"page {len(page)/1024:.1f} KiB ({len(gzip.compress(page))/1024:.1f} KiB gzipped); state with the whole history "
          f"({len(state['history']['samples'])} samples) {len(full)/1024:.1f} KiB, one second's update {len(new)/1024:.1f} KiB")
    hist = thread("atoll-history")
    h0, p0 = cpu(hist), cpu(f"/proc/{pid}/stat")
    time.sleep(secs)
    h1, p1 = cpu(hist), cpu(f"/proc/{pid}/stat")
    since = last
    t_end = time.time() + secs
    while time.time() < t_end:
        s, body, h, _ = call(us, "GET", f"/_atoll/ui/state?since={since}", {})
        samples = json.loads(body)["history"]["samples"]
        if samples: since = samples[-1]["t"]
        time.sleep(1)
    p2 = cpu(f"/proc/{pid}/stat")
    print(f"over {secs} s: the history thread {(h1-h0)/secs:.2f} ms CPU/s; the site idle {(p1-p0)/secs:.2f} ms CPU/s, "
          f"with a page open {(p2-p1)/secs:.2f} ms CPU/s")
