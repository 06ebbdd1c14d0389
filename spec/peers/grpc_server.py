"""A gRPC peer for the specs: Python grpcio (a real gRPC implementation we
did not write), with a generic handler on raw bytes, so no generated code.

Prints "listening on 127.0.0.1:PORT" once it serves.  Methods of test.Echo:
  Echo      answers the request bytes as they came
  Flaky     UNAVAILABLE for the first `x-fail` calls (default 2) with the
            same `x-key`, then echoes
  Invalid   INVALID_ARGUMENT, message "bad input: 100% wrong"
  Pushback  UNAVAILABLE with trailer grpc-retry-pushback-ms = `x-pushback`
  Sleep     sleeps `x-sleep-ms`, then echoes
  Stats     JSON: every call seen (method, metadata, time_remaining, peer)
            and the most calls in flight at once
"""
import json
import sys
import threading
import time
from concurrent import futures

import grpc

lock = threading.Lock()
calls = []
flaky_counts = {}
in_flight = {"now": 0, "max": 0}


def record(method, context):
    md = {k: (v if isinstance(v, str) else v.hex()) for k, v in context.invocation_metadata()}
    entry = {"method": method, "metadata": md, "time_remaining": context.time_remaining(),
             "peer": context.peer()}
    with lock:
        calls.append(entry)
    return md


def handle(method):
    def run(request, context):
        if method == "Stats":
            with lock:
                return json.dumps({"calls": calls, "max_in_flight": in_flight["max"]}).encode()
        md = record(method, context)
        with lock:
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
        try:
            return answer(method, md, request, context)
        finally:
            with lock:
                in_flight["now"] -= 1
    return run


def answer(method, md, request, context):
    if method == "Flaky":
        key = md.get("x-key", "")
        with lock:
            flaky_counts[key] = flaky_counts.get(key, 0) + 1
            n = flaky_counts[key]
        if n <= int(md.get("x-fail", "2")):
            context.abort(grpc.StatusCode.UNAVAILABLE, "flaky %d" % n)
    elif method == "Invalid":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input: 100% wrong")
    elif method == "Pushback":
        context.set_trailing_metadata((("grpc-retry-pushback-ms", md.get("x-pushback", "0")),))
        context.abort(grpc.StatusCode.UNAVAILABLE, "pushback")
    elif method == "Sleep":
        time.sleep(int(md.get("x-sleep-ms", "0")) / 1000.0)
    return request


class Handler(grpc.GenericRpcHandler):
    def service(self, details):
        service, _, method = details.method.lstrip("/").partition("/")
        if service != "test.Echo":
            return None
        return grpc.unary_unary_rpc_method_handler(handle(method))


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256),
                         handlers=(Handler(),),
                         options=(("grpc.max_concurrent_streams", 1000),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print("listening on 127.0.0.1:%d" % port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
