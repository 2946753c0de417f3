#!/usr/bin/env python3
"""Backup and seed figures (issue 16), with real processes of a release build:

    cargo build --release -p atoll
    python3 examples/three-sites/measure_backup.py target/release/atoll guests/target/wasm32-wasip2/release/counter.wasm [MiB]

Starts site A alone, fills it with MiB (default 1024) of key-value data through the admin API
(1 MiB values, four clients), takes `atoll backup` of it, then starts B from the backup
(`--seed`, peered with A) and C empty (peered with A), and reports: backup MiB/s, seed MiB/s (the
site's own log), the bytes B and C pulled from A until they held the last key, and how long that
took. Everything runs in a temporary directory, removed at the end.
"""
import json, os, re, shutil, subprocess, sys, tempfile, threading, time, urllib.request

atoll, wasm = sys.argv[1], sys.argv[2]
mib = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
work = tempfile.mkdtemp(prefix="atoll-backup-")
env = dict(os.environ, ATOLL_ADMIN_TOKEN="t", ATOLL_PEER_SECRET="a-long-shared-peer-secret", RUST_LOG="info")
procs = []

def start(name, *extra):
    log = open(f"{work}/{name}.log", "w")
    p = subprocess.Popen([atoll, "site", "--name", name, "--region", "us-east", "--listen", "127.0.0.1:0",
                          "--data", f"{work}/{name}", "--set", "admin.deploy_key_file=" + f"{work}/deploy.key",
                          "--set", "sync.anti_entropy_ms=1000", *extra],
                         env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    procs.append(p)
    t = time.time()
    line = p.stdout.readline()
    url = re.search(r"http://[0-9.:]+", line).group(0)
    return p, url, time.time() - t

def get(url, path):
    req = urllib.request.Request(url + path, headers={"Authorization": "Bearer t"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.read()

def pulled(url):
    status = json.loads(get(url, "/_atoll/sync/status")[1])
    return sum(p.get("bytes_received", 0) for p in status["peers"])

def holds(url, key):
    try:
        return get(url, f"/_atoll/apps/counter/kv/{key}")[0] == 200
    except Exception:
        return False

try:
    subprocess.run([atoll, "keygen", "--out", f"{work}/deploy.key"], check=True, capture_output=True)
    a, a_url, _ = start("a")
    subprocess.run([atoll, "deploy", "--site", a_url, "--app", "counter", wasm], env=env, check=True, capture_output=True)
    value = os.urandom(1 << 20)
    def fill(w):
        for i in range(w, mib, 4):
            req = urllib.request.Request(f"{a_url}/_atoll/apps/counter/kv/big{i:05}", data=value, method="PUT",
                                         headers={"Authorization": "Bearer t"})
            urllib.request.urlopen(req, timeout=60).read()
    t = time.time()
    threads = [threading.Thread(target=fill, args=(w,)) for w in range(4)]
    [x.start() for x in threads]; [x.join() for x in threads]
    fill_s = time.time() - t
    print(f"filled {mib} MiB in {fill_s:.1f} s ({mib / fill_s:.0f} MiB/s through the admin API)")
    last = f"big{mib - 1:05}"

    out = subprocess.run([atoll, "backup", "--site", a_url, "--out", f"{work}/a.backup"], env=env,
                         check=True, capture_output=True, text=True).stdout.strip()
    print(out)
    size = os.path.getsize(f"{work}/a.backup") / (1 << 20)

    b, b_url, b_start = start("b", "--peer", a_url, "--seed", f"{work}/a.backup")
    seeded = [l for l in open(f"{work}/b.log") if "seeded from a backup" in l]
    rate = re.search(r"mib_per_s=([0-9.]+)", seeded[0]).group(1) if seeded else "?"
    print(f"seed: {size:.0f} MiB merged and the site listening after {b_start:.1f} s (the site's log: {float(rate):.0f} MiB/s)")
    t = time.time()
    while not holds(b_url, last) or get(b_url, "/_atoll/health?ready=1")[0] != 200:
        time.sleep(0.2)
    print(f"seeded site ready and holding everything {time.time() - t:.1f} s after it listened; pulled {pulled(b_url) / 1024:.0f} KiB from its peer")

    c, c_url, _ = start("c", "--peer", a_url)
    t = time.time()
    while not holds(c_url, last):
        time.sleep(0.5)
    print(f"empty site holding everything after {time.time() - t:.1f} s; pulled {pulled(c_url) / (1 << 20):.0f} MiB from its peer")
finally:
    for p in procs:
        p.kill()
    shutil.rmtree(work, ignore_errors=True)
