/*
 * call — the call state machine: attempt → outcome → decision → wait →
 * next attempt, under a per-try timeout, a whole-call deadline, the
 * client's breakers and retry budget, and one idempotency key per call.
 * Uses: loop, transport, breaker, budget, policy, log.  Never includes lua.h.
 */
#ifndef RSL_CALL_H
#define RSL_CALL_H

#include "breaker.h"
#include "budget.h"
#include "jitter.h"
#include "log.h"
#include "loop.h"
#include "policy.h"
#include "throttle.h"
#include "transport.h"

typedef enum {
  RSL_OUTCOME_OK,
  RSL_OUTCOME_FAILED,
  RSL_OUTCOME_GAVE_UP,
  RSL_OUTCOME_DEADLINE,
  RSL_OUTCOME_BUDGET,
  RSL_OUTCOME_BREAKER_OPEN,
  RSL_OUTCOME_POLICY_ERROR,
  RSL_OUTCOME_THROTTLED, /* the adaptive throttle refused: nothing sent */
} rsl_outcome;

const char *rsl_outcome_name(rsl_outcome o);

typedef struct rsl_call rsl_call;

/* How calls send their attempts.  The real transport is the default; a
 * test kit plugs in a scripted one (resilua.testing), so the same state
 * machine runs against canned outcomes.  An rsl_attempt is opaque here:
 * each sender hands out its own handles. */
typedef struct rsl_sender {
  int (*send)(void *impl, const rsl_request *req, rsl_attempt_done cb,
              void *ud, rsl_attempt **out, const char **err);
  void (*cancel)(void *impl, rsl_attempt *a);
} rsl_sender;

/* What every call shares: the runtime's pieces (borrowed) and the list of
 * calls in flight (so they can all be cancelled at shutdown).  Calls read
 * time only through loop (rsl_loop_now_ns), so a virtual loop moves their
 * deadlines, breakers and budgets too. */
typedef struct rsl_call_env {
  rsl_loop *loop;
  rsl_transport *transport; /* used when sender is NULL */
  const rsl_sender *sender; /* NULL: the transport */
  void *sender_impl;        /* the sender's first argument */
  rsl_log *log;
  rsl_prng *prng;
  rsl_call *calls;
} rsl_call_env;

#define RSL_CLIENT_RECENT 128

/* A client's shared state: breakers by key, one retry budget and one
 * adaptive throttle.  Clients with the same name share one; refcounted
 * (calls in flight hold a ref). */
typedef struct rsl_client {
  int refs;
  char *name;
  rsl_breakers breakers;
  int has_budget;
  rsl_budget budget;
  int has_throttle;
  rsl_throttle throttle;
  /* the latencies of the last successful attempts, for hedge.after_ms = "p95" */
  float recent_ms[RSL_CLIENT_RECENT];
  int recent_len, recent_next;
} rsl_client;

rsl_client *rsl_client_new(const char *name); /* NULL on ENOMEM; refs = 1 */
void rsl_client_unref(rsl_client *c);
/* The breaker a call to url would use under conf, or NULL (no breaker,
 * bad URL or ENOMEM). */
rsl_breaker *rsl_client_breaker(rsl_client *c, const rsl_policy_conf *conf,
                                const char *url);
/* The budget, created from conf on first use; NULL without one. */
rsl_budget *rsl_client_budget(rsl_client *c, const rsl_policy_conf *conf);

/* A consumer of the response body as it arrives (contract 7).  The call
 * commits when the first body byte of a successful response is handed to
 * it: before, everything of the policy applies (retries, per-try timeout,
 * first_byte_timeout_ms, the deadline); after, no retry, and only
 * idle_timeout_ms and stream_timeout_ms bound the response.  A failing
 * response is never streamed: its body is kept for the policy and the
 * result, as without a consumer. */
enum { RSL_CHUNK_TAKEN = 0, RSL_CHUNK_PAUSE = 1, RSL_CHUNK_ABORT = -1 };
typedef struct rsl_call_stream {
  /* The commit point: status and headers of the response that will be
   * the call's.  0, or -1 to abort (the call then fails). */
  int (*on_commit)(void *ud, const rsl_response *head);
  /* A piece of body: RSL_CHUNK_TAKEN, RSL_CHUNK_PAUSE (not taken: it
   * comes again after rsl_call_resume), or RSL_CHUNK_ABORT. */
  int (*on_chunk)(void *ud, const char *data, size_t len);
  void *ud;
  /* Optional: told of every attempt's status (0: error) as it ends. */
  void (*on_attempt)(void *ud, long status, rsl_error_class error);
} rsl_call_stream;

/* Borrowed: the call copies what it keeps. */
typedef struct rsl_call_request {
  const char *method;
  const char *url;
  const char *const *headers; /* "Name: value" */
  size_t header_count;
  const char *body; /* NULL: none */
  size_t body_len;
  size_t max_active; /* 0, or see rsl_request.max_active */
  const rsl_call_stream *stream; /* NULL: the body is kept whole */
  int raw;                       /* rsl_request.raw (a proxy) */
  /* Per-request limits that may only tighten the policy's; 0: none. */
  double deadline_ms;
  int max_attempts;
  const char *route, *request_id; /* named in its events when set */
  rsl_call **handle; /* NULL, or set to the call (valid until it ends) */
  int http2;          /* see rsl_request.http2 */
  /* "pkg.Service/Method": a unary gRPC call to url's origin (HTTP/2, POST,
   * the body framed as one message, grpc-timeout on every attempt); the
   * result's body is the answer unframed and its grpc_status decides.
   * NULL: a plain HTTP call. */
  const char *grpc;
} rsl_call_request;

/* Transparent retries per call at most (see call.c, transparent_retry):
 * a stream the server refused unprocessed is sent again whatever the
 * policy says, not counted against max_attempts; past this many, the
 * policy judges the refusal like any error. */
#define RSL_CALL_TRANSPARENT_MAX 3

/* Attempts whose latency a result keeps: policies allow at most 100. */
#define RSL_CALL_MAX_ATTEMPTS 100

typedef struct rsl_call_result {
  rsl_outcome outcome;
  rsl_response last; /* the last attempt's response (status 0 if none) */
  char message[512];
  int attempts;
  double elapsed_ms;
  float attempt_ms[RSL_CALL_MAX_ATTEMPTS]; /* each attempt's latency */
  char call_id[17];
  int committed; /* the body went to the stream consumer: not in last */
} rsl_call_result;

/* Called once when the call ends (never from inside rsl_call_start); the
 * result is handed over (free result->last with rsl_response_free). */
typedef void (*rsl_call_done)(void *ud, rsl_call_result *result);

/* Starts a call.  0, or -1 with *err (static text) on a request that can
 * never be sent (bad URL, bad method).  The call holds refs on client,
 * policy and shadow until it ends.  shadow (or NULL) is a candidate policy
 * asked beside the live one after every failed attempt: it never changes
 * the call; each disagreement is a `shadow` event (see call.c). */
int rsl_call_start(rsl_call_env *env, rsl_client *client, rsl_policy *policy,
                   rsl_policy *shadow, const rsl_call_request *req,
                   rsl_call_done cb, void *ud, const char **err);

/* Resumes a stream whose consumer answered RSL_CHUNK_PAUSE. */
void rsl_call_resume(rsl_call *call);
/* Ends a call without calling back (its consumer is gone). */
void rsl_call_cancel(rsl_call *call);

/* Ends every call in flight without calling back (at shutdown). */
void rsl_call_cancel_all(rsl_call_env *env);

#endif
