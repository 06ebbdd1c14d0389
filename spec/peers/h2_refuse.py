#!/usr/bin/env python3
"""An h2c server (prior knowledge) that refuses requests without
processing them, and answers the others with an empty 200.

  h2_refuse.py [--refuse N] [--goaway] [--answer-first M]

--refuse N        refuse the first N requests it reads (default 1; -1: all)
--goaway          refuse by GOAWAY (NO_ERROR) whose last-stream-id is the
                  last stream answered on that connection (0 if none),
                  instead of RST_STREAM(REFUSED_STREAM); the streams the
                  client sends on that connection afterwards are refused
                  too (and counted in N), and the connection stays open
                  until the client closes it
--answer-first M  on each connection, answer the first M requests before
                  refusing any (default 0)
--late            refuse after the answer's HEADERS (":status 200", no
                  END_STREAM): a server that broke RFC 9113, since it had
                  begun to answer

Prints "listening on 127.0.0.1:PORT", then for each HEADERS frame it reads
(what reached it, resends included) "request N", and "processed N" when
it answers one (the application saw it) or "refused N" when it refuses
one (nothing ran)."""
import argparse
import socket
import struct
import sys
import threading

REFUSED_STREAM = 7
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
lock = threading.Lock()
counts = {"seen": 0, "refused": 0, "processed": 0}


def frame(kind, flags, stream, payload=b""):
    return (struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
            + struct.pack(">I", stream) + payload)


def say(line):
    """One whole line (threads must not interleave them); call under lock."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def note(what):
    with lock:
        counts[what] += 1
        say("%s %d" % ({"seen": "request"}.get(what, what), counts[what]))


def take_refusal(limit):
    """Counts and prints a refusal, while the first `limit` last."""
    with lock:
        if limit >= 0 and counts["refused"] >= limit:
            return False
        counts["refused"] += 1
        say("refused %d" % counts["refused"])
    return True


def serve(conn, args):
    buf = b""
    answered_here, last_answered, goaway_sent = 0, 0, False

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
        # Our SETTINGS first, as nghttp2's servers do; a client that does not
        # send the preface (an HTTP/1.1 Upgrade) reads them, then the close.
        conn.sendall(frame(4, 0, 0))
        if read(24) != PREFACE:
            raise EOFError
        while True:
            head = read(9)
            length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
            stream = struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF
            read(length)
            if kind == 4 and not flags & 1:
                conn.sendall(frame(4, 1, 0))  # SETTINGS ACK
            elif kind == 6 and not flags & 1:
                conn.sendall(frame(6, 1, 0, b"\0" * 8))  # PING ACK
            elif kind == 1:
                note("seen")
                if goaway_sent:
                    note("refused")  # above our last-stream-id: never run
                elif answered_here >= args.answer_first and take_refusal(args.refuse):
                    if args.goaway:
                        goaway_sent = True
                        conn.sendall(frame(7, 0, 0, struct.pack(">II", last_answered, 0)))
                    else:
                        if args.late:  # HEADERS, END_HEADERS: ":status 200"
                            conn.sendall(frame(1, 4, stream, b"\x88"))
                        conn.sendall(frame(3, 0, stream, struct.pack(">I", REFUSED_STREAM)))
                else:  # HEADERS, END_STREAM | END_HEADERS: ":status 200"
                    note("processed")
                    answered_here += 1
                    last_answered = stream
                    conn.sendall(frame(1, 5, stream, b"\x88"))
    except (EOFError, OSError):
        pass
    conn.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--refuse", type=int, default=1)
    parser.add_argument("--goaway", action="store_true")
    parser.add_argument("--answer-first", type=int, default=0)
    parser.add_argument("--late", action="store_true")
    args = parser.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    print("listening on 127.0.0.1:%d" % sock.getsockname()[1], flush=True)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve, args=(conn, args), daemon=True).start()


if __name__ == "__main__":
    main()
