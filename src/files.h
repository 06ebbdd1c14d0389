/*
 * files — what batch checks before it writes a file, and the directory
 * fsync that makes a rename durable.  Plain C (POSIX).
 */
#ifndef RSL_FILES_H
#define RSL_FILES_H

typedef enum rsl_file_kind {
  RSL_FILE_MISSING, /* nothing there (the parent may not exist either) */
  RSL_FILE_REGULAR,
  RSL_FILE_DIRECTORY,
  RSL_FILE_DEVICE, /* character or block */
  RSL_FILE_FIFO,
  RSL_FILE_SOCKET,
  RSL_FILE_DANGLING, /* a symlink whose target does not exist */
} rsl_file_kind;

/* The name of a kind ("regular", "device", ...). */
const char *rsl_files_kind_name(rsl_file_kind kind);

/* What path is, following symlinks; *is_link says whether path itself is
 * one.  Returns 0, or an errno value (EACCES, ELOOP, ...). */
int rsl_files_kind(const char *path, rsl_file_kind *kind, int *is_link);

/* fsync of the directory dir, so that a rename in it survives a crash.
 * Returns 0 or an errno value. */
int rsl_files_sync_dir(const char *dir);

#endif
