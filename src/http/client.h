/*
 * http/client — HTTP/1.1 attempts of our own, on pooled keep-alive
 * connections, for the raw attempts (rsl_request.raw: the proxy's) to a
 * plain http:// upstream given by a numeric address.  libcurl cost two
 * thirds of a proxied request (its printf engine writing each header, its
 * default headers, a URL parse per attempt); this sends the header lines
 * the proxy built as they are and parses the answer with http-parser.
 *
 * The contract is rsl_transport_send/cancel/resume's (transport.h): the
 * same rsl_response, streaming hook, error classes and messages, timeouts
 * and max_active queue.  The upstream sees the request curl would send
 * (Host first, the lines in order, Content-Length when there is a body;
 * curl's conventions in the lines: "Name:" sends nothing, "Name;" an empty
 * field, a "Host:" line replaces the URL's).  Nothing is ever sent twice:
 * a pooled connection that dies before the answer fails the attempt with
 * `reset`, for the policy to judge.
 *
 * Provides: rsl_h1_* (this file).
 * Uses: loop (watchers, timers), transport.h (types), hints, http/buf,
 * http-parser, libc sockets.  No lua.h.
 */
#ifndef RSL_HTTP_CLIENT_H
#define RSL_HTTP_CLIENT_H

#include "../loop.h"
#include "../transport.h"

typedef struct rsl_h1_client rsl_h1_client;
typedef struct rsl_h1_attempt rsl_h1_attempt;

/* An rsl_h1_attempt begins with an int holding RSL_H1_TAG; transport.c's
 * own attempts begin with an int that is 0, which is how an rsl_attempt
 * handed out by the transport is told apart (rsl_h1_owns). */
#define RSL_H1_TAG 0x48317631
/* rsl_h1_send's answer for a request it does not take (see there). */
#define RSL_H1_DECLINED 1

/* *out is owned by the caller (rsl_h1_client_free).  0 or -ENOMEM. */
int rsl_h1_client_new(rsl_h1_client **out, rsl_loop *loop);
/* Cancels every attempt (no callbacks) and closes every connection. */
void rsl_h1_client_free(rsl_h1_client *cl);

/* Starts an attempt, as rsl_transport_send.  RSL_H1_DECLINED when req is
 * not one this client takes (not http://, a host name that needs DNS,
 * user info, HTTP/2): send it another way.  Otherwise 0 with *out valid
 * until the callback runs (never before this returns), or -1 with *err
 * (static) set. */
int rsl_h1_send(rsl_h1_client *cl, const rsl_request *req,
                rsl_attempt_done cb, void *ud, rsl_h1_attempt **out,
                const char **err);
/* Stops an attempt; its connection, if it had one, is closed. */
void rsl_h1_cancel(rsl_h1_attempt *a);
/* Resumes an attempt whose hook answered RSL_DATA_PAUSE (from the loop,
 * not from inside this call). */
void rsl_h1_resume(rsl_h1_attempt *a);
/* 1 when attempt (an rsl_attempt) is one of this client's. */
int rsl_h1_owns(const void *attempt);

#endif
