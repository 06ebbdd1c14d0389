/*
 * refused — which of libcurl's HTTP/2 streams the server never processed.
 *
 * A stream closed with REFUSED_STREAM never reached the server's
 * application (RFC 9113, 8.7): the server refused it with RST_STREAM, or
 * it was above the last-stream-id of a GOAWAY (nghttp2 closes those with
 * REFUSED_STREAM too).  gRPC retries such a stream transparently (gRFC
 * A6).  libcurl 7.88 keeps that error code to itself: it resends a
 * refused stream on its own, with the same trace as a reused connection
 * that died (where the server may have run the request), and fails a
 * stream above a GOAWAY's last-stream-id as a framing error.  So this
 * file hears it from nghttp2: it stands in for
 * nghttp2_session_callbacks_set_on_stream_close_callback (the executable's
 * definition comes first in the dynamic linker's search, ahead of
 * libnghttp2's), and wraps the stream-close callback that libcurl
 * registers, and only libcurl's, with one that reports refused streams
 * first; and the same for the callback by which libcurl learns that a
 * response's headers begin (a stream that began an answer was processed).
 * Nothing else changes: the real setters are called, with libcurl's
 * callbacks behind the wrappers.  Should libcurl not register through us
 * (linked statically, another HTTP/2 back end), no stream is ever
 * reported: refusals then look as they did before.
 *
 * Uses: libnghttp2, the dynamic linker (dlsym, dladdr).  Never includes
 * lua.h; knows nothing of libcurl but the name of its library.
 */
#ifndef RSL_H2_REFUSED_H
#define RSL_H2_REFUSED_H

typedef enum {
  RSL_H2_STREAM_ANSWERED, /* the response's HEADERS began */
  RSL_H2_STREAM_REFUSED   /* closed with REFUSED_STREAM */
} rsl_h2_stream_event;

/* Told of an event on one of libcurl's streams, with the stream's user
 * data (libcurl 7.88: its easy handle, CURL *), from inside libcurl's
 * processing, before libcurl itself hears of it.  A stream that was
 * answered and then refused broke RFC 9113: it is not unprocessed. */
typedef void (*rsl_h2_stream_fn)(void *stream_data, rsl_h2_stream_event ev);

/* Sets the one function told of these events (NULL: none). */
void rsl_h2_refused_listen(rsl_h2_stream_fn fn);

#endif
