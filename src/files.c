/*
 * files — stat-based kind checks and the directory fsync (see files.h).
 */
#include "files.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

const char *rsl_files_kind_name(rsl_file_kind kind) {
  switch (kind) {
  case RSL_FILE_MISSING:
    return "missing";
  case RSL_FILE_REGULAR:
    return "regular";
  case RSL_FILE_DIRECTORY:
    return "directory";
  case RSL_FILE_DEVICE:
    return "device";
  case RSL_FILE_FIFO:
    return "fifo";
  case RSL_FILE_SOCKET:
    return "socket";
  case RSL_FILE_DANGLING:
    return "dangling";
  }
  return "unknown";
}

int rsl_files_kind(const char *path, rsl_file_kind *kind, int *is_link) {
  struct stat st;
  *is_link = lstat(path, &st) == 0 && S_ISLNK(st.st_mode);
  if (stat(path, &st) < 0) {
    if (errno != ENOENT) return errno;
    *kind = *is_link ? RSL_FILE_DANGLING : RSL_FILE_MISSING;
    return 0;
  }
  if (S_ISREG(st.st_mode))
    *kind = RSL_FILE_REGULAR;
  else if (S_ISDIR(st.st_mode))
    *kind = RSL_FILE_DIRECTORY;
  else if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode))
    *kind = RSL_FILE_DEVICE;
  else if (S_ISFIFO(st.st_mode))
    *kind = RSL_FILE_FIFO;
  else
    *kind = RSL_FILE_SOCKET;
  return 0;
}

int rsl_files_sync_dir(const char *dir) {
  int rc = 0;
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno;
  if (fsync(fd) < 0) rc = errno;
  close(fd);
  return rc;
}
