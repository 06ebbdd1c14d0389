/*
 * policy — the host for policy modules, as the call state machine sees it:
 * a refcounted, immutable version of a policy (its validated settings) and
 * the decision after a failed attempt, by the module's `decide` when it has
 * one, else by the built-in rules (retry_on + backoff).
 * Uses: jitter, transport (types only), Lua (only inside policy.c).
 *
 * Ownership: a version is created by the Lua binding (lua_core) and shared
 * by refcount; every call in flight holds one, so a reload never changes
 * the rules under a running call.
 */
#ifndef RSL_POLICY_H
#define RSL_POLICY_H

#include <stddef.h>

#include "breaker.h"
#include "budget.h"
#include "hints.h"
#include "jitter.h"
#include "transport.h"

#define RSL_REASON_MAX 160
#define RSL_HEDGE_MAX 4 /* hedge.max: attempts of one try in flight at once */

typedef enum {
  RSL_BREAKER_KEY_HOST, /* scheme://host:port */
  RSL_BREAKER_KEY_URL,  /* the URL without query or fragment */
  RSL_BREAKER_KEY_GLOBAL,
} rsl_breaker_key;

typedef struct rsl_policy_conf {
  int max_attempts;
  double per_try_timeout_ms, connect_timeout_ms, deadline_ms;
  rsl_jitter jitter;
  double base_ms, max_ms;
  unsigned char retry_status[600]; /* 1 for each status in retry_on */
  unsigned retry_errors;           /* bit (1 << rsl_error_class) */
  unsigned retry_grpc;             /* bit (1 << gRPC status code) */
  int retry_after_respect;
  double retry_after_max_ms;
  char *idempotency_header;        /* NULL: no key sent */
  char **idempotency_methods;      /* upper-case */
  size_t idempotency_method_count;
  int breaker_enabled;
  rsl_breaker_conf breaker;
  rsl_breaker_key breaker_key;
  int budget_enabled;
  rsl_budget_kind budget_kind;
  double budget_max_tokens, budget_token_ratio;
  double budget_retry_cost, budget_timeout_cost, budget_success_refund;
  double budget_ratio, budget_ttl_ms, budget_min_per_s; /* kind = ratio */
  int throttle_enabled; /* adaptive throttling (throttle.h) */
  double throttle_k, throttle_window_ms;
  int retry_refused; /* retry_on.refused: try again after a local refusal */
  int hedge_enabled;  /* hedge: more attempts of a slow try, first good wins */
  double hedge_after_ms; /* -1: the client's recent p95 */
  int hedge_max;         /* attempts of one try in flight at once, 2..MAX */
  size_t max_response_bytes;
  /* streaming (contract 7); 0: off */
  double first_byte_timeout_ms, idle_timeout_ms, stream_timeout_ms;
} rsl_policy_conf;

typedef struct rsl_policy rsl_policy;

/* Everything a decision may look at (contract 1's `a`). */
typedef struct rsl_attempt_info {
  int attempt;
  const char *method, *url;
  const rsl_response *res; /* status 0 + error when no response */
  double elapsed_ms, remaining_ms;
  double budget_tokens; /* -1 without a budget */
  const char *breaker;  /* state name, or NULL without a breaker */
  double prev_delay_ms; /* decorrelated jitter's memory */
  rsl_prng *prng;
  const rsl_hints *hints; /* the server's retry hints (a.server); NULL: none */
  int has_idempotency_key; /* the request carries the policy's key header */
} rsl_attempt_info;

typedef struct rsl_decision {
  int retry;
  int exhausted; /* when !retry: a transient failure we stopped retrying */
  double delay_ms;
  char reason[RSL_REASON_MAX];
} rsl_decision;

void rsl_policy_ref(rsl_policy *p);
void rsl_policy_unref(rsl_policy *p);

const rsl_policy_conf *rsl_policy_conf_of(const rsl_policy *p);
const char *rsl_policy_name(const rsl_policy *p);
const char *rsl_policy_version(const rsl_policy *p);

/* Decides after a failed attempt.  0, or -1 when the policy failed (raised,
 * ran too long, returned a bad value): *err then holds a malloc'd message
 * naming file:line, owned by the caller. */
int rsl_policy_decide(rsl_policy *p, const rsl_attempt_info *a,
                      rsl_decision *d, char **err);

/* Builds a version from the normalized policy table at `idx` (as
 * lua/resilua/policy.lua makes it) and pushes it as a userdata owning one
 * ref.  Raises a Lua error on a malformed table.  The policy runs in L's
 * state: for policies a script builds (policy.define).  Implemented with the Lua
 * API; declared here so this header stays free of lua.h. */
struct lua_State;
int rsl_policy_push_new(struct lua_State *L, int idx);
/* core.policy_load(path, policy_path[, overrides]) -> policy, table, bytes
 * | nil, msg: loads and validates the policy file at path in a sandbox of
 * its own (its own Lua state, see sandbox.h), under the load limits;
 * `overrides` (plain data) replace fields of the file's table before
 * validation (the command line's --timeout, --no-breaker, ...).  `table` is a
 * plain-data copy of the normalized table for the host (functions become
 * "<function>"), bytes the memory the policy's state holds.  `prng` (the
 * runtime's) feeds the policy's resilua.backoff. */
int rsl_policy_push_loaded(struct lua_State *L, rsl_prng *prng);
/* Loading a policy on a helper thread (reloads off the hot path).  The
 * thread builds the policy in its own state; the host's state is touched
 * only by rsl_policy_job_push_result, on the caller's thread. */
typedef struct rsl_policy_job rsl_policy_job;
/* Starts loading (path, policy path) = the arguments at 1 and 2 of L, as
 * core.policy_load takes them.  0 and *out (owned by the caller), or
 * -errno. */
int rsl_policy_job_start(struct lua_State *L, rsl_policy_job **out);
/* Readable once the job is done. */
int rsl_policy_job_fd(const rsl_policy_job *j);
/* Waits for the job (it is done when its fd is readable) and pushes what
 * core.policy_load returns; the result is L's from then on. */
int rsl_policy_job_push_result(struct lua_State *L, rsl_policy_job *j,
                               rsl_prng *prng);
/* Waits for the thread if it still runs (at most the load limits), then
 * frees everything the job holds. */
void rsl_policy_job_free(rsl_policy_job *j);
/* core.policy_names(dir) -> sorted list of the *.lua regular files in dir
 * (empty when it cannot be read). */
int rsl_policy_names_lua(struct lua_State *L);
/* Pushes res's headers as a table {lower-case name = value} (a.headers;
 * also a call result's headers). */
void rsl_policy_push_headers(struct lua_State *L, const rsl_response *res);
/* Sets t.status, or t.error (the class name) when status is 0, on the
 * table on top of the stack: how every result and attempt table says it. */
void rsl_policy_push_status(struct lua_State *L, long status,
                            rsl_error_class error);
/* Sets t.grpc_status and t.grpc_message (when present) on the table on
 * top of the stack, for a gRPC response; nothing otherwise. */
void rsl_policy_push_grpc(struct lua_State *L, const rsl_response *res);
/* The version held by the userdata at idx (raises if it is not one). */
rsl_policy *rsl_policy_check(struct lua_State *L, int idx);

/* Calls the policy's breaker.on_change(key, from, to), if it has one, under
 * the policy instruction limit.  0, or -1 when it failed: *err then holds a
 * malloc'd message (or NULL when out of memory), owned by the caller. */
int rsl_policy_breaker_changed(rsl_policy *p, const char *key,
                               const char *from, const char *to, char **err);

/* The built-in rules alone (what `decide` overrides). */
void rsl_policy_decide_builtin(const rsl_policy_conf *c,
                               const rsl_attempt_info *a, rsl_decision *d);

#endif
