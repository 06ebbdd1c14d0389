/*
 * proxy — `resilua proxy` (contract 7): an HTTP/1.1 reverse proxy whose
 * every request is one call under its route's policy.  Routes match by
 * Host and path prefix; answers stream through once committed; the proxy
 * answers its own errors as JSON; /_resilua/metrics and /_resilua/health.
 *
 * Provides: rsl_proxy_* (this file).
 * Uses: http/conn (the client side), call (the upstream side: policy,
 * retries, breaker, budget, streaming), proxy/headers, proxy/metrics, loop.
 * Never includes lua.h (the binding is proxy/lua_proxy.c).
 *
 * Ownership: the proxy owns its routes, which hold refs on their client
 * and policy; a request in flight holds its route, so new routes
 * (rsl_proxy_set_routes) apply to new requests only.
 */
#ifndef RSL_PROXY_H
#define RSL_PROXY_H

#include <stddef.h>
#include <stdint.h>

#include "../call.h"

typedef struct rsl_proxy rsl_proxy;

/* Borrowed: the proxy copies the strings and takes refs. */
typedef struct rsl_proxy_route {
  const char *name;
  const char *prefix;   /* path prefix; "" matches every path */
  const char *host;     /* Host to match (without port), or NULL: any */
  const char *upstream; /* base URL, http(s)://host[:port][/path] */
  int keep_host;        /* forward the client's Host instead of upstream's */
  rsl_client *client;
  rsl_policy *policy;
} rsl_proxy_route;

typedef struct rsl_proxy_conf {
  const char *listen;
  size_t max_connections, max_in_flight;
  size_t max_header_bytes, max_body_bytes;
  uint64_t idle_timeout_ms;  /* client keep-alive; 0: none */
  const char *admin_prefix;  /* "/_resilua", or NULL: no admin paths */
} rsl_proxy_conf;

/* Listens and serves on env's loop with env's transport and log.  0, or
 * -errno with *err a malloc'd message the caller frees. */
int rsl_proxy_new(rsl_proxy **out, rsl_call_env *env,
                  const rsl_proxy_conf *conf, char **err);
/* Replaces the routes (tried in order; the first that matches serves).
 * 0 or -ENOMEM (the old routes stay). */
int rsl_proxy_set_routes(rsl_proxy *p, const rsl_proxy_route *routes,
                         size_t n);
/* Stops accepting, answers health with 503 and closes each connection
 * after its next answer.  Calls in flight go on. */
void rsl_proxy_drain(rsl_proxy *p);
size_t rsl_proxy_in_flight(const rsl_proxy *p);
const char *rsl_proxy_address(const rsl_proxy *p);
/* Ends every call in flight (their clients see the connection close). */
void rsl_proxy_free(rsl_proxy *p);

#endif
