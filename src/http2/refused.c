/*
 * refused — libcurl's refused HTTP/2 streams, heard from nghttp2.  See
 * refused.h.
 */
#include "refused.h"

#include <dlfcn.h>
#include <nghttp2/nghttp2.h>
#include <stddef.h>
#include <string.h>

typedef void (*close_setter)(nghttp2_session_callbacks *,
                             nghttp2_on_stream_close_callback);

static rsl_h2_refused_fn listener;
/* libcurl's stream-close callback (one function for all its sessions). */
static nghttp2_on_stream_close_callback curl_on_close;

void rsl_h2_refused_listen(rsl_h2_refused_fn fn) { listener = fn; }

static int on_close(nghttp2_session *session, int32_t stream_id,
                    uint32_t error_code, void *user_data) {
  if (error_code == NGHTTP2_REFUSED_STREAM && listener) {
    void *data = nghttp2_session_get_stream_user_data(session, stream_id);
    if (data) listener(data);
  }
  return curl_on_close(session, stream_id, error_code, user_data);
}

/* Whether fn is code of libcurl's: its stream-close callback is wrapped,
 * any other (our own server's, h2c.c) is set as it is. */
static int in_libcurl(nghttp2_on_stream_close_callback fn) {
  Dl_info info;
  void *addr;
  memcpy(&addr, &fn, sizeof addr); /* a code address, for dladdr */
  return dladdr(addr, &info) && info.dli_fname &&
         strstr(info.dli_fname, "libcurl");
}

/* Stands in for libnghttp2's (see refused.h); the real one is the next
 * definition in the search order. */
void nghttp2_session_callbacks_set_on_stream_close_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_stream_close_callback fn) {
  static close_setter real;
  if (!real) {
    void *sym = dlsym(RTLD_NEXT,
                      "nghttp2_session_callbacks_set_on_stream_close_callback");
    memcpy(&real, &sym, sizeof real);
  }
  if (fn && fn != on_close && in_libcurl(fn)) {
    curl_on_close = fn;
    fn = on_close;
  }
  if (real) real(cbs, fn); /* libnghttp2 is linked in: always found */
}
