"""bench: the Python grpcio peer of bench/grpc.lua -- an asyncio client loop
(grpc.aio, whose transport is grpc-core in C) making unary calls with raw
bytes on one channel (one HTTP/2 connection), CONCURRENCY at a time, for
DURATION seconds.  Prints one JSON line: calls, errors, elapsed_s,
calls_per_s.

  python3 bench/grpc_client.py HOST:PORT METHOD CONCURRENCY DURATION_S
"""
import asyncio
import json
import sys
import time

import grpc


async def main(target, method, concurrency, duration):
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out
        await call(b"warm-up", timeout=10)
        calls = errors = 0
        end = time.monotonic() + duration

        async def worker():
            nonlocal calls, errors
            while time.monotonic() < end:
                try:
                    await call(b"\n\x05hello", timeout=10)
                    calls += 1
                except grpc.RpcError:
                    errors += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - start
        print(json.dumps({"calls": calls, "errors": errors, "elapsed_s": elapsed,
                          "calls_per_s": calls / elapsed}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
