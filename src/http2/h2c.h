/*
 * h2c — the HTTP/2 side of the scriptable upstream (`resilua serve`,
 * resilua.upstream): cleartext HTTP/2 with prior knowledge, on libnghttp2,
 * on the resilua loop.  Each request goes to the server's handler (see
 * server.h); a gRPC request (content-type application/grpc) gets its
 * message unframed, and its answer framed, with grpc-status and
 * grpc-message in the trailers (or a Trailers-Only response), as grpc/grpc's
 * doc/PROTOCOL-HTTP2.md says.  A handler's delay longer than the client's
 * grpc-timeout ends the call with DEADLINE_EXCEEDED at the timeout, as a
 * gRPC server does.
 *
 * Actions: "hang" never answers the stream; "reset" resets it
 * (RST_STREAM INTERNAL_ERROR); "close" sends GOAWAY naming the streams
 * before this one as the last processed and refuses this one
 * (RST_STREAM REFUSED_STREAM): the client knows it was not processed and
 * may retry it safely.  The connection ends once the others are answered.
 *
 * Uses: server (handler, counters), loop, libnghttp2.  Never includes lua.h.
 */
#ifndef RSL_H2C_H
#define RSL_H2C_H

#include <stddef.h>

#include "../server.h"

typedef struct rsl_h2c rsl_h2c;

/* Serves HTTP/2 on fd (non-blocking; owned from now on, closed by
 * rsl_h2c_close) for s, starting with the `n` bytes already read from it
 * (the client preface first: http/conn hands such a connection over).
 * The connection links itself into *list (the server's) and unlinks
 * itself when it closes.  0, or -1 when out of memory (fd untouched). */
int rsl_h2c_start(rsl_server *s, int fd, const char *read, size_t n,
                  rsl_h2c **list);

/* Closes the connection and frees it, its streams and their timers. */
void rsl_h2c_close(rsl_h2c *c);

#endif
