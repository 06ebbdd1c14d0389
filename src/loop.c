/*
 * loop — epoll + timer heap + signalfd.  See loop.h.
 */
#include "loop.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define NS_PER_S 1000000000ull

struct rsl_loop {
  int epfd;
  rsl_io timer_io; /* the timerfd armed for the earliest timer */
  uint64_t armed_ns; /* what the timerfd is armed for; 0 when disarmed */
  rsl_timer **heap;
  size_t heap_len, heap_cap;
  size_t watchers;
  rsl_io signal_io;
  rsl_signal_cb signal_cb;
  void *signal_ud;
  /* Events being dispatched: a watcher removed meanwhile is blanked out of
   * the rest, so its owner may free it from inside a callback. */
  struct epoll_event *pending;
  int pending_len;
  int stepping; /* a step is running: stepping again from a callback is refused */
  /* A virtual loop (rsl_loop_new_virtual) has no epoll, timerfd or
   * signalfd: its clock is vnow_ns, which a step moves straight to the
   * next timer, so waits take no real time. */
  int is_virtual;
  uint64_t vnow_ns;
  /* epoll_pwait2(2) is missing (Linux < 5.11): waits in ms, and the
   * timerfd wakes the loop for its timers. */
  int no_pwait2;
};

uint64_t rsl_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * NS_PER_S + (uint64_t)ts.tv_nsec;
}

double rsl_now_ms(void) { return (double)rsl_now_ns() / 1e6; }

uint64_t rsl_loop_now_ns(const rsl_loop *loop) {
  return loop->is_virtual ? loop->vnow_ns : rsl_now_ns();
}

double rsl_loop_now_ms(const rsl_loop *loop) {
  return (double)rsl_loop_now_ns(loop) / 1e6;
}


static void timerfd_ready(void *ud, int fd, unsigned events) {
  (void)ud;
  (void)events;
  uint64_t expirations;
  /* Drain it; due timers run at the top of every step anyway. */
  if (read(fd, &expirations, sizeof expirations) < 0) return;
}

int rsl_loop_new(rsl_loop **out) {
  rsl_loop *loop = calloc(1, sizeof *loop);
  if (!loop) return -ENOMEM;
  loop->epfd = epoll_create1(EPOLL_CLOEXEC);
  int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (loop->epfd < 0 || tfd < 0) {
    int err = -errno;
    if (loop->epfd >= 0) close(loop->epfd);
    if (tfd >= 0) close(tfd);
    free(loop);
    return err;
  }
  loop->signal_io.fd = -1;
  rsl_io_init(&loop->timer_io, tfd, timerfd_ready, loop);
  loop->timer_io.weak = 1; /* timers keep the loop alive, not their fd */
  int rc = rsl_io_set(loop, &loop->timer_io, RSL_IO_READ);
  if (rc < 0) {
    close(tfd);
    close(loop->epfd);
    free(loop);
    return rc;
  }
  *out = loop;
  return 0;
}

int rsl_loop_new_virtual(rsl_loop **out, uint64_t start_ns) {
  rsl_loop *loop = calloc(1, sizeof *loop);
  if (!loop) return -ENOMEM;
  loop->epfd = -1;
  loop->timer_io.fd = -1;
  loop->signal_io.fd = -1;
  loop->is_virtual = 1;
  loop->vnow_ns = start_ns;
  *out = loop;
  return 0;
}

void rsl_loop_free(rsl_loop *loop) {
  if (!loop) return;
  for (size_t i = 0; i < loop->heap_len; i++)
    loop->heap[i]->heap_index = SIZE_MAX;
  if (loop->timer_io.fd >= 0) close(loop->timer_io.fd);
  if (loop->signal_io.fd >= 0) close(loop->signal_io.fd);
  if (loop->epfd >= 0) close(loop->epfd);
  free(loop->heap);
  free(loop);
}

void rsl_io_init(rsl_io *io, int fd, rsl_io_cb cb, void *ud) {
  io->fd = fd;
  io->events = 0;
  io->weak = 0;
  io->cb = cb;
  io->ud = ud;
}

int rsl_io_set(rsl_loop *loop, rsl_io *io, unsigned events) {
  if (loop->is_virtual) return -ENOTSUP; /* nothing to wait on: no fds */
  struct epoll_event ev = {0};
  ev.data.ptr = io;
  if (events & RSL_IO_READ) ev.events |= EPOLLIN;
  if (events & RSL_IO_WRITE) ev.events |= EPOLLOUT;
  int op = events == 0 ? EPOLL_CTL_DEL
           : io->events == 0 ? EPOLL_CTL_ADD
                             : EPOLL_CTL_MOD;
  if (events == io->events) return 0;
  if (epoll_ctl(loop->epfd, op, io->fd, &ev) < 0) {
    /* The kernel's view differs from ours when the fd was closed (and
     * maybe reused) while registered: a close drops the registration. */
    if (op == EPOLL_CTL_MOD && errno == ENOENT)
      op = EPOLL_CTL_ADD;
    else if (op != EPOLL_CTL_DEL || (errno != ENOENT && errno != EBADF))
      return -errno;
    if (op != EPOLL_CTL_DEL && epoll_ctl(loop->epfd, op, io->fd, &ev) < 0)
      return -errno;
  }
  if (io->events == 0 && !io->weak) loop->watchers++;
  if (events == 0) {
    if (!io->weak) loop->watchers--;
    for (int i = 0; i < loop->pending_len; i++)
      if (loop->pending[i].data.ptr == io) loop->pending[i].data.ptr = NULL;
  }
  io->events = events;
  return 0;
}

void rsl_io_set_weak(rsl_loop *loop, rsl_io *io, int weak) {
  weak = weak != 0;
  if (io->weak == weak) return;
  if (io->events) {
    if (weak) loop->watchers--;
    else loop->watchers++;
  }
  io->weak = weak;
}

/* --- timer heap ---------------------------------------------------------- */

static void heap_set(rsl_loop *loop, size_t i, rsl_timer *t) {
  loop->heap[i] = t;
  t->heap_index = i;
}

static void heap_up(rsl_loop *loop, size_t i) {
  rsl_timer *t = loop->heap[i];
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (loop->heap[parent]->due_ns <= t->due_ns) break;
    heap_set(loop, i, loop->heap[parent]);
    i = parent;
  }
  heap_set(loop, i, t);
}

static void heap_down(rsl_loop *loop, size_t i) {
  rsl_timer *t = loop->heap[i];
  for (;;) {
    size_t child = 2 * i + 1;
    if (child >= loop->heap_len) break;
    if (child + 1 < loop->heap_len &&
        loop->heap[child + 1]->due_ns < loop->heap[child]->due_ns)
      child++;
    if (t->due_ns <= loop->heap[child]->due_ns) break;
    heap_set(loop, i, loop->heap[child]);
    i = child;
  }
  heap_set(loop, i, t);
}

void rsl_timer_init(rsl_timer *t, rsl_timer_cb cb, void *ud) {
  t->due_ns = 0;
  t->heap_index = SIZE_MAX;
  t->cb = cb;
  t->ud = ud;
}

int rsl_timer_active(const rsl_timer *t) { return t->heap_index != SIZE_MAX; }

void rsl_timer_stop(rsl_loop *loop, rsl_timer *t) {
  size_t i = t->heap_index;
  if (i == SIZE_MAX) return;
  t->heap_index = SIZE_MAX;
  rsl_timer *last = loop->heap[--loop->heap_len];
  if (last == t) return;
  heap_set(loop, i, last);
  heap_up(loop, i);
  heap_down(loop, last->heap_index);
}

int rsl_timer_start(rsl_loop *loop, rsl_timer *t, uint64_t delay_ns) {
  rsl_timer_stop(loop, t);
  if (loop->heap_len == loop->heap_cap) {
    size_t cap = loop->heap_cap ? loop->heap_cap * 2 : 64;
    rsl_timer **heap = realloc(loop->heap, cap * sizeof *heap);
    if (!heap) return -ENOMEM;
    loop->heap = heap;
    loop->heap_cap = cap;
  }
  t->due_ns = rsl_loop_now_ns(loop) + delay_ns;
  heap_set(loop, loop->heap_len++, t);
  heap_up(loop, t->heap_index);
  return 0;
}

/* Arms the timerfd for the earliest timer, when that changed. */
static void arm_timerfd(rsl_loop *loop) {
  uint64_t due = loop->heap_len ? loop->heap[0]->due_ns : 0;
  if (due == loop->armed_ns) return;
  struct itimerspec its = {0};
  its.it_value.tv_sec = (time_t)(due / NS_PER_S);
  its.it_value.tv_nsec = (long)(due % NS_PER_S);
  if (timerfd_settime(loop->timer_io.fd, TFD_TIMER_ABSTIME, &its, NULL) == 0)
    loop->armed_ns = due;
}

/* Runs the timers due now; returns how many ran. */
static int run_due_timers(rsl_loop *loop) {
  uint64_t now = rsl_loop_now_ns(loop);
  int ran = 0;
  while (loop->heap_len && loop->heap[0]->due_ns <= now) {
    rsl_timer *t = loop->heap[0];
    rsl_timer_stop(loop, t);
    t->cb(t->ud);
    ran++;
  }
  return ran;
}

/* --- signals ------------------------------------------------------------- */

static void signalfd_ready(void *ud, int fd, unsigned events) {
  (void)events;
  rsl_loop *loop = ud;
  struct signalfd_siginfo si;
  while (read(fd, &si, sizeof si) == (ssize_t)sizeof si)
    loop->signal_cb(loop->signal_ud, (int)si.ssi_signo);
}

int rsl_loop_signals(rsl_loop *loop, const sigset_t *set, rsl_signal_cb cb,
                     void *ud) {
  if (loop->is_virtual) return -ENOTSUP;
  if (sigprocmask(SIG_BLOCK, set, NULL) < 0) return -errno;
  int fd = signalfd(loop->signal_io.fd, set, SFD_NONBLOCK | SFD_CLOEXEC);
  if (fd < 0) return -errno;
  loop->signal_cb = cb;
  loop->signal_ud = ud;
  if (loop->signal_io.fd < 0) {
    rsl_io_init(&loop->signal_io, fd, signalfd_ready, loop);
    loop->signal_io.weak = 1; /* signals alone do not keep the loop alive */
    int rc = rsl_io_set(loop, &loop->signal_io, RSL_IO_READ);
    if (rc < 0) return rc;
  }
  return 0;
}

/* --- stepping ------------------------------------------------------------ */

size_t rsl_loop_alive(const rsl_loop *loop) {
  return loop->heap_len + loop->watchers;
}

/* A virtual step: the timers due now, or else the clock jumps to the
 * earliest timer (never past now + max_wait_ns) and runs what is due. */
static int virtual_step(rsl_loop *loop, uint64_t max_wait_ns) {
  if (!run_due_timers(loop) && loop->heap_len) {
    uint64_t due = loop->heap[0]->due_ns;
    if (max_wait_ns != UINT64_MAX && due - loop->vnow_ns > max_wait_ns)
      due = loop->vnow_ns + max_wait_ns;
    loop->vnow_ns = due;
    run_due_timers(loop);
  }
  loop->stepping = 0;
  return (int)rsl_loop_alive(loop);
}

/* Waits for events: until the earliest timer (or max_wait_ns, if sooner),
 * at most; not at all when `now` is set.  epoll_pwait2 takes the wait in
 * ns, so no timerfd is needed: re-arming one for every new earliest timer
 * cost a system call per timer, and an expensive one on virtual machines
 * (an open-loop run at 10,000 calls/s spent a quarter of its time there). */
static int wait_events(rsl_loop *loop, struct epoll_event *events,
                       uint64_t max_wait_ns, int now) {
  if (!loop->no_pwait2) {
    uint64_t wait_ns = now ? 0 : max_wait_ns;
    if (!now && loop->heap_len) {
      uint64_t due = loop->heap[0]->due_ns, t = rsl_now_ns();
      uint64_t until = due > t ? due - t : 0;
      if (until < wait_ns) wait_ns = until;
    }
    struct timespec ts = {.tv_sec = (time_t)(wait_ns / NS_PER_S),
                          .tv_nsec = (long)(wait_ns % NS_PER_S)};
    int n = epoll_pwait2(loop->epfd, events, MAX_EVENTS,
                         wait_ns == UINT64_MAX ? NULL : &ts, NULL);
    /* Not there (ENOSYS), or refused by a seccomp profile older than the
     * call (EPERM, ENOTSUP): epoll_wait and the timerfd from now on. */
    if (n >= 0 || (errno != ENOSYS && errno != EPERM && errno != ENOTSUP))
      return n;
    loop->no_pwait2 = 1;
  }
  int timeout_ms;
  if (max_wait_ns == UINT64_MAX) {
    timeout_ms = -1; /* the timerfd wakes us for the next timer */
  } else {
    uint64_t ms = (max_wait_ns + 999999) / 1000000;
    timeout_ms = ms > 1000000 ? 1000000 : (int)ms;
  }
  if (now || (loop->heap_len && loop->heap[0]->due_ns <= rsl_now_ns()))
    timeout_ms = 0;
  arm_timerfd(loop);
  return epoll_wait(loop->epfd, events, MAX_EVENTS, timeout_ms);
}

int rsl_loop_step(rsl_loop *loop, uint64_t max_wait_ns) {
  if (loop->stepping) return -EDEADLK;
  loop->stepping = 1;
  if (loop->is_virtual) return virtual_step(loop, max_wait_ns);
  /* Timers that ran may have finished what the caller waits for: then
   * this step only polls, so the caller can look before we block. */
  int ran = run_due_timers(loop);
  struct epoll_event events[MAX_EVENTS];
  int n = wait_events(loop, events, max_wait_ns, ran);
  if (n < 0) {
    int err = errno;
    loop->stepping = 0;
    return err == EINTR ? (int)rsl_loop_alive(loop) : -err;
  }
  loop->pending = events;
  loop->pending_len = n;
  for (int i = 0; i < n; i++) {
    rsl_io *io = events[i].data.ptr;
    if (!io) continue;
    unsigned ev = 0;
    if (events[i].events & (EPOLLIN | EPOLLHUP)) ev |= RSL_IO_READ;
    if (events[i].events & EPOLLOUT) ev |= RSL_IO_WRITE;
    if (events[i].events & EPOLLERR) ev |= RSL_IO_ERROR;
    io->cb(io->ud, io->fd, ev);
  }
  loop->pending_len = 0;
  run_due_timers(loop);
  loop->stepping = 0;
  return (int)rsl_loop_alive(loop);
}
