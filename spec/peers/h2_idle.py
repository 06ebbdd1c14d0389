#!/usr/bin/env python3
"""h2_idle.py HOST:PORT: opens an h2c connection (prior knowledge), sends
its SETTINGS and one GET, then stays silent.  Prints "answered" when the
answer's HEADERS come, "goaway ERRORCODE" for a GOAWAY, and "closed" when
the server closes the connection (or "timeout" after 150 s)."""
import socket
import struct
import sys


def frame(kind, flags, stream, payload=b""):
    return (struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
            + struct.pack(">I", stream) + payload)


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    conn = socket.create_connection((host, int(port)))
    conn.settimeout(150)
    # HPACK, static table: :method GET, :scheme http, :path /; :authority literal
    block = b"\x82\x86\x84\x41\x09127.0.0.1"
    conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0)
                 + frame(1, 5, 1, block))
    buf = b""
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                print("closed", flush=True)
                return
            buf += data
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length:
                    break
                kind, flags, payload = buf[3], buf[4], buf[9:9 + length]
                buf = buf[9 + length:]
                if kind == 4 and not flags & 1:
                    conn.sendall(frame(4, 1, 0))
                elif kind == 1:
                    print("answered", flush=True)
                elif kind == 7:
                    print("goaway %d" % struct.unpack(">I", payload[4:8])[0], flush=True)
    except socket.timeout:
        print("timeout", flush=True)


if __name__ == "__main__":
    main()
