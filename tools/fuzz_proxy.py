#!/usr/bin/env python3
"""A short fuzz loop for `resilua proxy`'s upstream side, without libFuzzer.

    tools/fuzz_proxy.py BINARY [SECONDS] [OUT_DIR]

An upstream on 127.0.0.1 answers every request with a random mutation of
a response of spec/fuzz/proxy/upstream/ (bit flips, inserted, dropped or
repeated bytes, a splice of two responses), written in random pieces;
two proxies forward to it, one through the HTTP/1.1 client (a numeric
upstream), one through libcurl ("localhost").  Requests go to both for
SECONDS (default 60).  Every answer must be an HTTP/1.1 status line with
no CR, LF or NUL inside a field, or a close; the proxies must stay up,
and exit 0 on SIGTERM.  Run it on the ASan build to catch memory errors:

    make BUILD=build-asan SANITIZE=address,undefined all
    ASAN_OPTIONS=detect_leaks=1:log_path=/tmp/fz/asan \\
      tools/fuzz_proxy.py build-asan/bin/resilua 120 /tmp/fz

The inputs of failures are kept in OUT_DIR (default: a temporary one).
Exit status 0 when nothing failed.
"""
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "spec", "fuzz",
                      "proxy", "upstream")
POLICY = ("return { max_attempts = 1, per_try_timeout_ms = 1500, "
          "breaker = false, budget = false }\n")
FIELD_LINE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [^\r\n\0]*$")

seeds = [open(os.path.join(CORPUS, f), "rb").read()
         for f in sorted(os.listdir(CORPUS)) if f.endswith(".http")]
lock = threading.Lock()
last_input = {}


def mutate(rng):
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[pos:pos] = bytes([rng.choice(b"\r\n\0 :\t;0123456789abcdef\x80\xff")])
        elif op == 2:
            del data[pos:pos + rng.randint(1, 8)]
        elif op == 3:
            data[pos:pos] = data[pos:pos + rng.randint(1, 64)] * rng.randint(1, 4)
        else:
            other = rng.choice(seeds)
            cut = rng.randrange(len(other) + 1)
            data = data[:pos] + other[cut:]
    return bytes(data)


def upstream(sock, rng_seed):
    rng = random.Random(rng_seed)
    while True:
        c, _ = sock.accept()
        threading.Thread(target=answer, args=(c, rng.getrandbits(64)), daemon=True).start()


def answer(c, seed):
    rng = random.Random(seed)
    data = mutate(rng)
    try:
        c.settimeout(5)
        got = b""
        while b"\r\n\r\n" not in got:
            more = c.recv(65536)
            if not more:
                return
            got += more
        rid = re.search(rb"X-Request-Id: ([0-9a-f]+)", got)
        if rid:
            with lock:
                last_input[rid.group(1).decode()] = data
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        i = 0
        while i < len(data):
            n = rng.randint(1, max(1, len(data) - i))
            c.sendall(data[i:i + n])
            i += n
            if rng.random() < 0.2:
                time.sleep(0.002)
    except OSError:
        pass
    finally:
        c.close()


def start_proxy(binary, upstream_url, policy, log):
    p = subprocess.Popen([binary, "proxy", "--quiet", "--listen", "127.0.0.1:0",
                          "--upstream", upstream_url, "--policy", policy],
                         stdout=subprocess.PIPE, stderr=log)
    line = p.stdout.readline().decode()
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    if not m:
        sys.exit("the proxy did not start: " + line)
    return p, int(m.group(1))


def check_answer(raw):
    """None when raw is a well-formed head (or nothing), else why not."""
    if not raw:
        return None
    head = raw.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    if not re.match(rb"^HTTP/1\.1 [1-5]\d\d ", lines[0]):
        return "bad status line"
    for line in lines[1:]:
        if not FIELD_LINE.match(line):
            return "bad field line %r" % line[:80]
    return None


def request(port, path):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(b"GET /" + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"X-Request-Id: " + path.encode() + b"\r\n\r\n")
        raw = b""
        while True:
            more = s.recv(65536)
            if not more:
                break
            raw += more
    except OSError:
        pass
    finally:
        s.close()
    return raw


def main():
    binary = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60
    out = sys.argv[3] if len(sys.argv) > 3 else tempfile.mkdtemp(prefix="fuzz-proxy.")
    os.makedirs(out, exist_ok=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    port = sock.getsockname()[1]
    threading.Thread(target=upstream, args=(sock, os.getpid()), daemon=True).start()
    policy = os.path.join(out, "policy.lua")
    with open(policy, "w") as f:
        f.write(POLICY)
    log = open(os.path.join(out, "proxy.stderr"), "ab")
    proxies = [start_proxy(binary, "http://127.0.0.1:%d" % port, policy, log),
               start_proxy(binary, "http://localhost:%d" % port, policy, log)]
    failures, n, end = 0, 0, time.time() + seconds
    while time.time() < end and not failures:
        for proc, pport in proxies:
            n += 1
            rid = "%016x" % n
            raw = request(pport, rid)
            why = check_answer(raw)
            if proc.poll() is not None:
                why = "the proxy exited with %d" % proc.returncode
            if why:
                failures += 1
                with lock:
                    bad = last_input.get(rid, b"")
                with open(os.path.join(out, "failure-%s.http" % rid), "wb") as f:
                    f.write(bad)
                print("FAIL %s (%s): %s" % (rid, "native" if proc is proxies[0][0] else "libcurl",
                                            why))
    for proc, _ in proxies:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -1
        if code != 0:
            failures += 1
            print("FAIL: the proxy exited with %d (see %s)" % (code, out))
    print("%d requests, %d failures; inputs and stderr in %s" % (n, failures, out))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
