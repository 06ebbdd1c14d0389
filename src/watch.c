/*
 * watch — inotify folders.  See watch.h.
 */
#include "watch.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

#define MAX_DIRS 64

struct rsl_watch {
  rsl_loop *loop;
  rsl_io io;
  rsl_watch_cb cb;
  void *ud;
  struct {
    int wd;
    char *dir;
  } dirs[MAX_DIRS];
  int ndirs;
};

static const char *dir_of(const rsl_watch *w, int wd) {
  for (int i = 0; i < w->ndirs; i++)
    if (w->dirs[i].wd == wd) return w->dirs[i].dir;
  return NULL;
}

static void on_ready(void *ud, int fd, unsigned events) {
  (void)events;
  rsl_watch *w = ud;
  /* Aligned as the kernel's records require. */
  char buf[16 * (sizeof(struct inotify_event) + NAME_MAX + 1)]
      __attribute__((aligned(__alignof__(struct inotify_event))));
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) {
    for (char *p = buf; p < buf + n;) {
      const struct inotify_event *ev = (const struct inotify_event *)p;
      const char *dir = dir_of(w, ev->wd);
      if (dir && ev->len > 0) w->cb(w->ud, dir, ev->name);
      p += sizeof *ev + ev->len;
    }
  }
}

int rsl_watch_new(rsl_watch **out, rsl_loop *loop, rsl_watch_cb cb, void *ud) {
  rsl_watch *w = calloc(1, sizeof *w);
  if (!w) return -ENOMEM;
  int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (fd < 0) {
    int err = -errno;
    free(w);
    return err;
  }
  w->loop = loop;
  w->cb = cb;
  w->ud = ud;
  rsl_io_init(&w->io, fd, on_ready, w);
  w->io.weak = 1; /* watching alone does not keep the loop alive */
  int rc = rsl_io_set(loop, &w->io, RSL_IO_READ);
  if (rc < 0) {
    close(fd);
    free(w);
    return rc;
  }
  *out = w;
  return 0;
}

void rsl_watch_free(rsl_watch *w) {
  if (!w) return;
  rsl_io_set(w->loop, &w->io, 0);
  close(w->io.fd);
  for (int i = 0; i < w->ndirs; i++) free(w->dirs[i].dir);
  free(w);
}

int rsl_watch_add(rsl_watch *w, const char *dir) {
  int wd = inotify_add_watch(w->io.fd, dir, IN_CLOSE_WRITE | IN_MOVED_TO);
  if (wd < 0) return -errno;
  if (dir_of(w, wd)) return 0; /* the kernel gave the same folder's wd */
  if (w->ndirs == MAX_DIRS) {
    inotify_rm_watch(w->io.fd, wd);
    return -ENOSPC;
  }
  char *copy = strdup(dir);
  if (!copy) {
    inotify_rm_watch(w->io.fd, wd);
    return -ENOMEM;
  }
  w->dirs[w->ndirs].wd = wd;
  w->dirs[w->ndirs].dir = copy;
  w->ndirs++;
  return 0;
}
