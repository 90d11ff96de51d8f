/* The C client (c/offlog.h) driven step by step from tests/test_c_client.py.
 *
 * One command per line on stdin, one answer per line on stdout:
 *
 *   open PATH SOCKET FLAGS MS     FLAGS: "-" or a comma list of shm, fsync
 *                                 -> ok TRANSPORT | err ERRNO TEXT
 *   write TAG FIRST STOP SIZE     records [FIRST, STOP) of tests/records.py's format;
 *                                 EAGAIN is retried (100 us naps, up to 60 s)
 *                                 -> ok EAGAINS | err ERRNO RECORD TEXT
 *   threads N FIRST STOP SIZE     the same from N threads at once, tags T0 ... T<N-1>
 *                                 -> ok | err ERRNO RECORD TEXT (the first thread's that failed)
 *   sync MS                       -> ok SIZE (the file's size right after the sync) | err ERRNO TEXT
 *   close MS                      -> ok | err ERRNO TEXT
 *
 * TEXT is offlog_error()'s, or "-".
 */
#include "../c/offlog.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static offlog_t *log_;
static char path[4096];

static void answer_error(const char *what)
{
    int err = errno;
    const char *text = log_ ? offlog_error(log_) : NULL;
    printf("err %d %s%s\n", err, what, text ? text : "-");
}

/* records.record(tag, n, size): "TAG NUMBER LENGTH FILL\n" */
static size_t make_record(char *out, const char *tag, long n, long size)
{
    long length = n % 41 + size;
    int head = sprintf(out, "%s %06ld %07ld ", tag, n, length);
    memset(out + head, 'a' + (int)(n % 26), (size_t)length);
    out[head + length] = '\n';
    return (size_t)(head + length + 1);
}

/* Write records [first, stop) of ``tag``, retrying EAGAIN; 0, or the errno (and ``*at``) of the failure. */
static int write_records(const char *tag, long first, long stop, long size, long *eagains, long *at)
{
    char *record = malloc((size_t)size + 128);
    for (long n = first; n < stop; n++) {
        size_t len = make_record(record, tag, n, size), done = 0;
        time_t give_up = time(NULL) + 60;
        while (done < len) {
            ssize_t took = offlog_write(log_, record + done, len - done);
            if (took >= 0) {
                done += (size_t)took;
            } else if (errno == EAGAIN && time(NULL) < give_up) {
                ++*eagains;
                nanosleep(&(struct timespec){0, 100000}, NULL);
            } else {
                int err = errno;
                free(record);
                *at = n;
                return err;
            }
        }
    }
    free(record);
    return 0;
}

struct writer {
    pthread_t thread;
    char tag[16];
    long first, stop, size, eagains, at;
    int err;
};

static void *writer_main(void *arg)
{
    struct writer *w = arg;
    w->err = write_records(w->tag, w->first, w->stop, w->size, &w->eagains, &w->at);
    return NULL;
}

static void answer_write(int err, long at, long eagains)
{
    char what[32];
    errno = err;
    snprintf(what, sizeof what, "%ld ", at);
    if (err)
        answer_error(what);
    else
        printf("ok %ld\n", eagains);
}

static void write_in_threads(int count, long first, long stop, long size)
{
    struct writer writers[64];
    int err = 0;
    long at = 0;
    for (int t = 0; t < count; t++) {
        writers[t] = (struct writer){.first = first, .stop = stop, .size = size};
        snprintf(writers[t].tag, sizeof writers[t].tag, "T%d", t);
        pthread_create(&writers[t].thread, NULL, writer_main, &writers[t]);
    }
    for (int t = 0; t < count; t++) {
        pthread_join(writers[t].thread, NULL);
        if (writers[t].err && !err) {
            err = writers[t].err;
            at = writers[t].at;
        }
    }
    answer_write(err, at, 0);
}

int main(void)
{
    char line[8192], a[4096], b[4096], c[64];
    long x, y, z;
    int n;
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        if (sscanf(line, "open %4095s %4095s %63s %ld", a, b, c, &x) == 4) {
            int flags = (strstr(c, "shm") ? OFFLOG_SHM : 0) | (strstr(c, "fsync") ? OFFLOG_FSYNC : 0);
            strcpy(path, a);
            log_ = offlog_open(a, b, flags, (int)x);
            if (log_)
                printf("ok %s\n", offlog_transport(log_));
            else
                answer_error("");
        } else if (sscanf(line, "write %63s %ld %ld %ld", c, &x, &y, &z) == 4) {
            long eagains = 0, at = 0;
            int err = write_records(c, x, y, z, &eagains, &at);
            answer_write(err, at, eagains);
        } else if (sscanf(line, "threads %d %ld %ld %ld", &n, &x, &y, &z) == 4 && n > 0 && n <= 64) {
            write_in_threads(n, x, y, z);
        } else if (sscanf(line, "sync %ld", &x) == 1) {
            struct stat st;
            if (offlog_sync(log_, (int)x) < 0)
                answer_error("");
            else if (stat(path, &st) < 0)
                printf("err %d stat\n", errno);
            else
                printf("ok %lld\n", (long long)st.st_size);
        } else if (sscanf(line, "close %ld", &x) == 1) {
            int result = offlog_close(log_, (int)x);
            int err = errno;
            log_ = NULL;
            errno = err;
            if (result < 0)
                answer_error("");
            else
                printf("ok\n");
        } else {
            printf("err 0 unknown command: %s", line);
        }
    }
    return 0;
}
