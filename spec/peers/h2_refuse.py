#!/usr/bin/env python3
"""An h2c server (prior knowledge) that refuses the first request it gets
with RST_STREAM(REFUSED_STREAM) and answers every later one with an empty
200.  Prints "listening on 127.0.0.1:PORT", then "request N" for each
HEADERS frame it reads (what reached it, resends included)."""
import socket
import struct
import threading

REFUSED_STREAM = 7
lock = threading.Lock()
seen = [0]


def frame(kind, flags, stream, payload=b""):
    return (struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
            + struct.pack(">I", stream) + payload)


def serve(conn):
    buf = b""

    def read(n):
        nonlocal buf
        while len(buf) < n:
            data = conn.recv(65536)
            if not data:
                raise EOFError
            buf += data
        out, buf = buf[:n], buf[n:]
        return out

    try:
        read(24)  # the client preface
        conn.sendall(frame(4, 0, 0))  # our SETTINGS
        while True:
            head = read(9)
            length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
            stream = struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF
            read(length)
            if kind == 4 and not flags & 1:
                conn.sendall(frame(4, 1, 0))  # SETTINGS ACK
            elif kind == 1:
                with lock:
                    seen[0] += 1
                    n = seen[0]
                print("request %d" % n, flush=True)
                if n == 1:
                    conn.sendall(frame(3, 0, stream, struct.pack(">I", REFUSED_STREAM)))
                else:  # HEADERS, END_STREAM | END_HEADERS: ":status 200"
                    conn.sendall(frame(1, 5, stream, b"\x88"))
    except (EOFError, OSError):
        pass
    conn.close()


def main():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    print("listening on 127.0.0.1:%d" % sock.getsockname()[1], flush=True)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
