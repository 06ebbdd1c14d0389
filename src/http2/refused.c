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
typedef void (*headers_setter)(nghttp2_session_callbacks *,
                               nghttp2_on_begin_headers_callback);

static rsl_h2_stream_fn listener;
/* libcurl's callbacks (one function each for all its sessions). */
static nghttp2_on_stream_close_callback curl_on_close;
static nghttp2_on_begin_headers_callback curl_on_begin_headers;

void rsl_h2_refused_listen(rsl_h2_stream_fn fn) { listener = fn; }

/* Tells the listener of event on the stream, if it has user data. */
static void tell(nghttp2_session *session, int32_t stream_id,
                 rsl_h2_stream_event event) {
  void *data = nghttp2_session_get_stream_user_data(session, stream_id);
  if (data && listener) listener(data, event);
}

static int on_close(nghttp2_session *session, int32_t stream_id,
                    uint32_t error_code, void *user_data) {
  if (error_code == NGHTTP2_REFUSED_STREAM)
    tell(session, stream_id, RSL_H2_STREAM_REFUSED);
  return curl_on_close(session, stream_id, error_code, user_data);
}

static int on_begin_headers(nghttp2_session *session,
                            const nghttp2_frame *frame, void *user_data) {
  if (frame->hd.type == NGHTTP2_HEADERS &&
      frame->headers.cat == NGHTTP2_HCAT_RESPONSE)
    tell(session, frame->hd.stream_id, RSL_H2_STREAM_ANSWERED);
  return curl_on_begin_headers(session, frame, user_data);
}

/* Whether the code at fn (a function pointer's bytes) is libcurl's: its
 * callbacks are wrapped, any other (our own server's, h2c.c) is set as
 * it is. */
static int in_libcurl(const void *fn) {
  Dl_info info;
  void *addr;
  memcpy(&addr, fn, sizeof addr); /* a code address, for dladdr */
  return dladdr(addr, &info) && info.dli_fname &&
         strstr(info.dli_fname, "libcurl");
}

/* What a stand-in setter does first: finds libnghttp2's setter `name`
 * once (into *real), and when the callback *fn is libcurl's, keeps it in
 * *curl_fn and puts *wrapper in its place.  The pointers are to function
 * pointers of `size` bytes, handled as bytes (ISO C has no generic
 * function pointer). */
static void interpose(const char *name, void *real, void *fn, void *curl_fn,
                      const void *wrapper, size_t size) {
  static const char none[sizeof(void (*)(void))];
  if (memcmp(real, none, size) == 0) {
    void *sym = dlsym(RTLD_NEXT, name); /* the next definition: libnghttp2's */
    memcpy(real, &sym, size);
  }
  if (memcmp(fn, none, size) != 0 && memcmp(fn, wrapper, size) != 0 &&
      in_libcurl(fn)) {
    memcpy(curl_fn, fn, size);
    memcpy(fn, wrapper, size);
  }
}

/* Stands in for libnghttp2's (see refused.h). */
void nghttp2_session_callbacks_set_on_stream_close_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_stream_close_callback fn) {
  static close_setter real;
  const nghttp2_on_stream_close_callback wrapper = on_close;
  interpose("nghttp2_session_callbacks_set_on_stream_close_callback", &real,
            &fn, &curl_on_close, &wrapper, sizeof fn);
  if (real) real(cbs, fn); /* libnghttp2 is linked in: always found */
}

/* The same for the callback libcurl learns of a response's headers by:
 * a stream that began an answer was not refused unprocessed. */
void nghttp2_session_callbacks_set_on_begin_headers_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_begin_headers_callback fn) {
  static headers_setter real;
  const nghttp2_on_begin_headers_callback wrapper = on_begin_headers;
  interpose("nghttp2_session_callbacks_set_on_begin_headers_callback", &real,
            &fn, &curl_on_begin_headers, &wrapper, sizeof fn);
  if (real) real(cbs, fn);
}
