/*
 * loop — the event loop every other part of resilua runs on.
 *
 * Provides: epoll readiness watchers, one-shot timers kept in a binary
 * min-heap on CLOCK_MONOTONIC (nanosecond resolution: the earliest timer arms
 * a timerfd, so waits are not rounded to milliseconds), and signals delivered
 * through a signalfd as ordinary events.
 * Uses: nothing but Linux system calls.  Never includes lua.h.
 *
 * Ownership: watchers and timers are embedded in their owner's structs; the
 * loop only links to them, so an owner must stop them before freeing.
 */
#ifndef RSL_LOOP_H
#define RSL_LOOP_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

typedef struct rsl_loop rsl_loop;

enum { RSL_IO_READ = 1, RSL_IO_WRITE = 2, RSL_IO_ERROR = 4 };

typedef void (*rsl_io_cb)(void *ud, int fd, unsigned events);
typedef void (*rsl_timer_cb)(void *ud);
typedef void (*rsl_signal_cb)(void *ud, int signo);

typedef struct rsl_io {
  int fd;
  unsigned events; /* RSL_IO_* currently watched; 0 when not registered */
  int weak;        /* set before registering: does not keep the loop alive */
  rsl_io_cb cb;
  void *ud;
} rsl_io;

typedef struct rsl_timer {
  uint64_t due_ns;
  size_t heap_index; /* position in the heap, SIZE_MAX when inactive */
  rsl_timer_cb cb;
  void *ud;
} rsl_timer;

/* Monotonic time in nanoseconds and milliseconds. */
uint64_t rsl_now_ns(void);
double rsl_now_ms(void);

/* Creates a loop; *out is owned by the caller (rsl_loop_free). 0 or -errno. */
int rsl_loop_new(rsl_loop **out);
/* Creates a loop on a virtual clock that starts at start_ns: timers only
 * (no fds or signals: rsl_io_set and rsl_loop_signals give -ENOTSUP), and
 * each step jumps the clock to the next timer instead of waiting.  Used to
 * run the call machine in simulated time (resilua.testing). */
int rsl_loop_new_virtual(rsl_loop **out, uint64_t start_ns);
/* The loop's clock: monotonic time, or a virtual loop's simulated time.
 * Everything that schedules on a loop reads time through this. */
uint64_t rsl_loop_now_ns(const rsl_loop *loop);
double rsl_loop_now_ms(const rsl_loop *loop);
void rsl_loop_free(rsl_loop *loop);

/* Registers, changes (events == 0 unregisters) or removes fd readiness. */
void rsl_io_init(rsl_io *io, int fd, rsl_io_cb cb, void *ud);
int rsl_io_set(rsl_loop *loop, rsl_io *io, unsigned events);
/* Makes a registered or unregistered watcher weak (it no longer keeps the
 * loop alive) or strong again. */
void rsl_io_set_weak(rsl_loop *loop, rsl_io *io, int weak);

void rsl_timer_init(rsl_timer *t, rsl_timer_cb cb, void *ud);
/* (Re)starts t to fire once after delay_ns. 0 or -ENOMEM. */
int rsl_timer_start(rsl_loop *loop, rsl_timer *t, uint64_t delay_ns);
void rsl_timer_stop(rsl_loop *loop, rsl_timer *t);
int rsl_timer_active(const rsl_timer *t);

/* Delivers the signals in `set` to cb instead of their default action. */
int rsl_loop_signals(rsl_loop *loop, const sigset_t *set, rsl_signal_cb cb,
                     void *ud);

/* Runs due timers, then waits at most max_wait_ns (or until the next timer;
 * UINT64_MAX waits as long as needed) and dispatches ready watchers.
 * Returns the number of active timers and watchers left, or -errno
 * (-EDEADLK when called from inside one of this loop's callbacks). */
int rsl_loop_step(rsl_loop *loop, uint64_t max_wait_ns);

/* Active timers plus registered watchers (the signalfd not counted). */
size_t rsl_loop_alive(const rsl_loop *loop);

#endif
