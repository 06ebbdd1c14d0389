"""A raw HTTP/1.1 upstream for specs that need bytes no well-behaved server
sends: repeated or malformed headers, broken chunked encoding, a keep-alive
connection closed under a request.

    python3 spec/raw_server.py ROUTES.json

ROUTES.json maps a path to a response: {"raw": bytes as latin-1 text,
sent as is} and optionally "close_nth": N, which closes the connection,
with no answer, on the N-th request it carries (N counts per connection).
A path not in ROUTES gets a 200 "ok" kept alive.  GET /_count answers the
number of requests read so far, itself not included.  Prints
"listening on 127.0.0.1:PORT" once it accepts.
"""
import json
import socket
import socketserver
import sys
import threading

ROUTES = json.load(open(sys.argv[1])) if len(sys.argv) > 1 else {}
MAX_HEAD_BYTES = 64 * 1024
lock = threading.Lock()
count = 0


def read_request(sock, buf):
    """One request (head and Content-Length body) from sock; returns
    (path, rest of buf) or (None, b"") when the client closed."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data or len(buf) > MAX_HEAD_BYTES:
            return None, b""
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            return None, b""
        rest += data
    parts = lines[0].split(b" ")
    return (parts[1].decode("latin-1") if len(parts) > 1 else "/"), rest[length:]


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        global count
        buf, nth = b"", 0
        while True:
            path, buf = read_request(self.request, buf)
            if path is None:
                return
            if path == "/_count":
                with lock:
                    n = count
                body = str(n).encode()
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(body), body))
                continue
            nth += 1
            with lock:
                count += 1
            route = ROUTES.get(path, {})
            if route.get("close_nth") == nth:
                self.request.shutdown(socket.SHUT_RDWR)
                return
            raw = route.get("raw")
            if raw is None:
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                continue
            self.request.sendall(raw.encode("latin-1"))
            if b"connection: close" in raw.lower().encode("latin-1"):
                return


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    server = Server(("127.0.0.1", 0), Handler)
    print("listening on 127.0.0.1:%d" % server.server_address[1], flush=True)
    server.serve_forever()
