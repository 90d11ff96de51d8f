/* The C client's figures: ``bench SOCKET PATH latency|throughput CALLS [socket]``.
 *
 * latency     every offlog_write of a 100-byte record timed alone (CLOCK_MONOTONIC
 *             before and after, as bench/worker.py's timed mode does with
 *             perf_counter_ns), in bursts of 10,000 (1 MB, a quarter of the
 *             default ring) with an offlog_sync after each, so no write meets a
 *             full ring; then the same bursts untimed, for the mean without the
 *             clock. Prints p50, p99, p99.9, max, the timer's own p50 and the
 *             untimed mean, in ns.
 * throughput  CALLS records of 100 bytes, then offlog_sync: records/s from the
 *             first write until the sync returned (the bytes are in the file). A
 *             write that finds the ring full (EAGAIN) is retried after a 20 us nap.
 *
 * Over a ring unless the last argument is "socket". One line of JSON on stdout.
 * python -m bench.c_client runs it next to the Python client.
 */
#define _GNU_SOURCE
#include "offlog.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { RECORD = 100, BURST = 10000, TIMEOUT_MS = 300000 };

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int by_value(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile, as bench/stats.py takes them. */
static int64_t at(const int64_t *sorted, long n, double q)
{
    long rank = (long)(q * (double)n);
    rank += (double)rank < q * (double)n; /* rounded up */
    return sorted[(rank < 1 ? 1 : rank > n ? n : rank) - 1];
}

static void must(int ok, offlog_t *log, const char *what)
{
    if (!ok) {
        fprintf(stderr, "bench: %s: %s (%s)\n", what, strerror(errno), log && offlog_error(log) ? offlog_error(log) : "-");
        exit(1);
    }
}

static void write_all(offlog_t *log, const char *record)
{
    while (offlog_write(log, record, RECORD) < 0) {
        must(errno == EAGAIN, log, "write");
        nanosleep(&(struct timespec){0, 20000}, NULL);
    }
}

static void latency(offlog_t *log, const char *record, long calls)
{
    int64_t *lat = malloc(sizeof *lat * (size_t)calls), *timer = malloc(sizeof *timer * (size_t)calls);
    for (long i = 0; i < BURST; i++) /* warm up */
        write_all(log, record);
    must(offlog_sync(log, TIMEOUT_MS) == 0, log, "sync");
    for (long done = 0; done < calls; done += BURST) {
        for (long i = done; i < calls && i < done + BURST; i++) {
            int64_t t0 = now_ns();
            ssize_t r = offlog_write(log, record, RECORD);
            int64_t t1 = now_ns();
            must(r == RECORD, log, "write (the ring was full: the burst is too large)");
            lat[i] = t1 - t0;
        }
        must(offlog_sync(log, TIMEOUT_MS) == 0, log, "sync");
    }
    for (long i = 0; i < calls; i++) {
        int64_t t0 = now_ns();
        timer[i] = now_ns() - t0;
    }
    int64_t untimed = 0;
    for (long done = 0; done < calls; done += BURST) {
        long n = calls - done < BURST ? calls - done : BURST;
        int64_t t0 = now_ns();
        for (long i = 0; i < n; i++)
            must(offlog_write(log, record, RECORD) == RECORD, log, "write");
        untimed += now_ns() - t0;
        must(offlog_sync(log, TIMEOUT_MS) == 0, log, "sync");
    }
    qsort(lat, (size_t)calls, sizeof *lat, by_value);
    qsort(timer, (size_t)calls, sizeof *timer, by_value);
    printf("{\"transport\": \"%s\", \"calls\": %ld, \"p50_ns\": %lld, \"p99_ns\": %lld, \"p99.9_ns\": %lld, "
           "\"max_ns\": %lld, \"timer_ns\": %lld, \"untimed_mean_ns\": %.1f}\n",
           offlog_transport(log), calls, (long long)at(lat, calls, 0.5), (long long)at(lat, calls, 0.99),
           (long long)at(lat, calls, 0.999), (long long)lat[calls - 1], (long long)at(timer, calls, 0.5),
           (double)untimed / (double)calls);
    free(lat);
    free(timer);
}

static void throughput(offlog_t *log, const char *record, long calls)
{
    int64_t start = now_ns();
    for (long i = 0; i < calls; i++)
        write_all(log, record);
    must(offlog_sync(log, TIMEOUT_MS) == 0, log, "sync");
    double seconds = (double)(now_ns() - start) / 1e9;
    printf("{\"transport\": \"%s\", \"calls\": %ld, \"seconds\": %.4f, \"records_per_s\": %.0f, \"mb_per_s\": %.1f}\n",
           offlog_transport(log), calls, seconds, (double)calls / seconds, (double)calls * RECORD / seconds / 1e6);
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: bench SOCKET PATH latency|throughput CALLS [socket]\n");
        return 2;
    }
    long calls = atol(argv[4]);
    int flags = argc > 5 && strcmp(argv[5], "socket") == 0 ? 0 : OFFLOG_SHM;
    char record[RECORD];
    memset(record, 'x', RECORD - 1);
    record[RECORD - 1] = '\n';
    offlog_t *log = offlog_open(argv[2], argv[1], flags, TIMEOUT_MS);
    must(log != NULL, NULL, "open");
    if (strcmp(argv[3], "latency") == 0)
        latency(log, record, calls);
    else
        throughput(log, record, calls);
    must(offlog_close(log, TIMEOUT_MS) == 0, NULL, "close");
    return 0;
}
