/*
 * watch — file changes in folders, through inotify on the loop.  Reports a
 * file when it was written and closed or renamed into a watched folder, so
 * editors that save by writing a temporary file and renaming it are seen
 * once, with the final name.
 * A watch does not keep the loop alive on its own.
 * Uses: loop.  Never includes lua.h.
 */
#ifndef RSL_WATCH_H
#define RSL_WATCH_H

#include "loop.h"

typedef struct rsl_watch rsl_watch;

/* dir: the watched folder as it was added; name: the file in it. */
typedef void (*rsl_watch_cb)(void *ud, const char *dir, const char *name);

/* *out is owned by the caller (rsl_watch_free).  0 or -errno. */
int rsl_watch_new(rsl_watch **out, rsl_loop *loop, rsl_watch_cb cb, void *ud);
void rsl_watch_free(rsl_watch *w);
/* Watches one more folder (a folder added twice is watched once).
 * 0 or -errno. */
int rsl_watch_add(rsl_watch *w, const char *dir);

#endif
