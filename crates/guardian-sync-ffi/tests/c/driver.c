/*
 * Drives the whole C ABI of guardian-sync against a running reference
 * server. Built with the system compiler and run (also under valgrind) by
 * tests/c_program.rs.
 *
 * usage: driver SERVER_URL TOKEN DEAD_URL DIR SLOWDOWN
 *   SERVER_URL  the reference server, with TOKEN accepted
 *   DEAD_URL    a URL where nothing listens (the "offline" phase)
 *   DIR         a directory for the outbox file
 *   SLOWDOWN    factor applied to every wait (valgrind is slow)
 *
 * Exits 0 when every check passed; prints the failed check otherwise.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "guardian_sync.h"

#define OPS 20

static int failures = 0;

#define CHECK(cond)                                                           \
    do {                                                                      \
        if (!(cond)) {                                                        \
            const char *m = gs_last_error_message();                          \
            fprintf(stderr, "driver.c:%d: check failed: %s (last error: %s)\n", \
                    __LINE__, #cond, m ? m : "none");                         \
            failures++;                                                       \
            goto out;                                                         \
        }                                                                     \
    } while (0)

static unsigned slowdown = 1;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* True if the JSON text has the member `"name":value` (compact JSON). */
static int has(const char *json, const char *member) {
    return json != NULL && strstr(json, member) != NULL;
}

/* Waits for an event whose JSON contains `needle`; counts matches of
 * `count_needle` (if not NULL) into *count on the way. Returns 1 if seen. */
static int wait_event(GsEngine *e, const char *needle, double seconds) {
    double deadline = now_s() + seconds * slowdown;
    while (now_s() < deadline) {
        char *ev = NULL;
        GsStatus s = gs_engine_next_event(e, 200, &ev);
        if (s == GS_STATUS_TIMEOUT) {
            if (ev != NULL) return 0; /* must be NULL on timeout */
            continue;
        }
        if (s != GS_STATUS_OK) return 0;
        int hit = has(ev, needle);
        gs_string_free(ev);
        if (hit) return 1;
    }
    return 0;
}

/* Reads `"name":N` from a status JSON; -1 if absent. */
static long member(const char *json, const char *name) {
    char key[64];
    snprintf(key, sizeof key, "\"%s\":", name);
    const char *p = strstr(json, key);
    if (p == NULL) return -1;
    return strtol(p + strlen(key), NULL, 10);
}

static long status_member(GsEngine *e, const char *name) {
    char *st = NULL;
    if (gs_engine_status(e, &st) != GS_STATUS_OK) return -2;
    long v = member(st, name);
    gs_string_free(st);
    return v;
}

/* Event callback: counts successes; runs on the engine's event thread. */
static void on_event(void *user_data, const char *event_json) {
    atomic_int *succeeded = user_data;
    if (has(event_json, "\"event\":\"op_succeeded\"")) atomic_fetch_add(succeeded, 1);
}

/* Token callback: hands out the token in user_data. */
static int64_t give_token(void *user_data, bool refresh, char *buf, size_t buf_len) {
    (void)refresh;
    const char *token = user_data;
    size_t n = strlen(token);
    if (n < buf_len) memcpy(buf, token, n + 1);
    return (int64_t)n;
}

static GsEngine *open_engine(const char *dir, const char *url, const char *token) {
    char config[2048];
    if (token != NULL)
        snprintf(config, sizeof config,
                 "{\"outbox_path\":\"%s/outbox.db\",\"server_url\":\"%s\",\"token\":\"%s\","
                 "\"retry\":{\"base_ms\":50,\"cap_ms\":200,\"max_attempts\":1000},"
                 "\"lock\":{\"heartbeat_interval_ms\":500,\"stale_after_ms\":2000}}",
                 dir, url, token);
    else
        snprintf(config, sizeof config,
                 "{\"outbox_path\":\"%s/outbox.db\",\"server_url\":\"%s\","
                 "\"retry\":{\"base_ms\":50,\"cap_ms\":200,\"max_attempts\":1000}}",
                 dir, url);
    GsEngine *e = NULL;
    if (gs_engine_open(config, &e) != GS_STATUS_OK) return NULL;
    return e;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: driver SERVER_URL TOKEN DEAD_URL DIR SLOWDOWN\n");
        return 2;
    }
    const char *url = argv[1], *token = argv[2], *dead = argv[3], *dir = argv[4];
    slowdown = (unsigned)strtoul(argv[5], NULL, 10);
    if (slowdown == 0) slowdown = 1;

    GsEngine *e = NULL;
    char *id = NULL, *json = NULL;
    char op[256];
    atomic_int succeeded = 0;

    CHECK(gs_version() != NULL && strlen(gs_version()) > 0);

    /* Errors: a code and a message, nothing allocated. */
    CHECK(gs_engine_open(NULL, &e) == GS_STATUS_INVALID_ARGUMENT && e == NULL);
    CHECK(gs_last_error_message() != NULL);
    CHECK(gs_engine_open("{not json", &e) == GS_STATUS_INVALID_ARGUMENT && e == NULL);
    CHECK(gs_engine_open("{\"outbox_path\":\"x\",\"server_url\":\"http://h\",\"tokn\":\"t\"}", &e) ==
          GS_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(gs_last_error_message(), "tokn") != NULL);
    CHECK(gs_engine_start(NULL) == GS_STATUS_INVALID_ARGUMENT);
    CHECK(gs_engine_close(NULL) == GS_STATUS_OK);
    gs_string_free(NULL);

    /* Phase 1, offline: the server is unreachable. Enqueues are durable at
     * once; the runner retries. */
    e = open_engine(dir, dead, token);
    CHECK(e != NULL);
    CHECK(gs_last_error_message() == NULL);
    for (int i = 0; i < OPS; i++) {
        snprintf(op, sizeof op,
                 "{\"kind\":\"create\",\"entity_type\":\"note\",\"entity_id\":\"n%d\","
                 "\"payload\":{\"i\":%d}}",
                 i, i);
        CHECK(gs_engine_enqueue(e, op, &id) == GS_STATUS_OK);
        CHECK(id != NULL && strlen(id) == 36);
        gs_string_free(id);
        id = NULL;
    }
    /* A refused op: a code, a message, nothing stored. */
    CHECK(gs_engine_enqueue(e, "{\"kind\":\"create\",\"entity_type\":\"Bad Type\",\"entity_id\":\"x\","
                               "\"payload\":{}}", &id) == GS_STATUS_INVALID_OP && id == NULL);
    CHECK(gs_engine_enqueue(e, "[]", NULL) == GS_STATUS_INVALID_ARGUMENT);
    /* Cancel a never-attempted op. */
    CHECK(gs_engine_enqueue(e, "{\"kind\":\"create\",\"entity_type\":\"note\",\"entity_id\":\"gone\","
                               "\"payload\":{}}", &id) == GS_STATUS_OK);
    CHECK(gs_engine_cancel(e, id) == GS_STATUS_OK);
    CHECK(gs_engine_cancel(e, id) == GS_STATUS_NOT_FOUND);
    CHECK(gs_engine_retry(e, "not-an-id") == GS_STATUS_INVALID_ARGUMENT);
    gs_string_free(id);
    id = NULL;
    CHECK(status_member(e, "pending") == OPS);
    CHECK(gs_engine_ops(e, "{\"state\":\"pending\",\"limit\":5}", &json) == GS_STATUS_OK);
    CHECK(has(json, "\"entity_id\":\"n0\"") && !has(json, "\"entity_id\":\"n5\""));
    gs_string_free(json);
    json = NULL;
    CHECK(gs_engine_ops(e, "{\"stat\":1}", &json) == GS_STATUS_INVALID_ARGUMENT && json == NULL);

    CHECK(gs_engine_start(e) == GS_STATUS_OK);
    CHECK(gs_engine_start(e) == GS_STATUS_ALREADY_RUNNING);
    CHECK(wait_event(e, "\"event\":\"op_retried\"", 20));
    CHECK(gs_engine_stop(e, 10000 * slowdown) == GS_STATUS_OK);
    CHECK(gs_engine_stop(e, 1000) == GS_STATUS_OK);
    CHECK(status_member(e, "pending") + status_member(e, "in_flight") == OPS);
    CHECK(gs_engine_close(e) == GS_STATUS_OK);
    e = NULL;

    /* Phase 2, online with a wrong token: the runner pauses on
     * auth_required until the app sets a good one, then drains. */
    e = open_engine(dir, url, "wrong-token");
    CHECK(e != NULL);
    CHECK(gs_engine_set_event_callback(e, on_event, &succeeded) == GS_STATUS_OK);
    CHECK(gs_engine_start(e) == GS_STATUS_OK);
    CHECK(wait_event(e, "\"event\":\"auth_required\"", 30));
    CHECK(gs_engine_set_token(e, token) == GS_STATUS_OK);
    {
        int seen = 0;
        double deadline = now_s() + 60.0 * slowdown;
        while (seen < OPS && now_s() < deadline) {
            GsStatus s = gs_engine_next_event(e, 200, &json);
            CHECK(s == GS_STATUS_OK || s == GS_STATUS_TIMEOUT);
            if (s == GS_STATUS_OK && has(json, "\"event\":\"op_succeeded\"")) seen++;
            /* A 401 to a request sent before the new token pauses the
             * engine again: an app answers every auth_required. */
            if (s == GS_STATUS_OK && has(json, "\"event\":\"auth_required\""))
                CHECK(gs_engine_set_token(e, token) == GS_STATUS_OK);
            if (s == GS_STATUS_OK && getenv("GS_DRIVER_TRACE") != NULL) fprintf(stderr, "event: %s\n", json);
            gs_string_free(json);
            json = NULL;
        }
        if (seen != OPS && getenv("GS_DRIVER_TRACE") != NULL) {
            char *st = NULL, *ops = NULL;
            gs_engine_status(e, &st);
            gs_engine_ops(e, NULL, &ops);
            fprintf(stderr, "status: %s\nops: %s\n", st, ops);
            gs_string_free(st);
            gs_string_free(ops);
        }
        CHECK(seen == OPS);
    }
    {
        /* The callback saw the same successes, on its own thread. */
        double deadline = now_s() + 10.0 * slowdown;
        while (atomic_load(&succeeded) < OPS && now_s() < deadline) {
            struct timespec ms = {0, 10 * 1000 * 1000};
            nanosleep(&ms, NULL);
        }
        CHECK(atomic_load(&succeeded) == OPS);
    }
    CHECK(status_member(e, "pending") == 0 && status_member(e, "in_flight") == 0);

    /* A dead letter: an update of an entity the server does not have fails
     * permanently (404); retried it fails again; then it is discarded. */
    CHECK(gs_engine_enqueue(e, "{\"kind\":\"update\",\"entity_type\":\"note\",\"entity_id\":\"missing\","
                               "\"payload\":{\"x\":1}}", &id) == GS_STATUS_OK);
    CHECK(wait_event(e, "\"event\":\"op_failed\"", 30));
    CHECK(status_member(e, "failed") == 1);
    CHECK(gs_engine_ops(e, "{\"state\":\"failed\"}", &json) == GS_STATUS_OK);
    CHECK(has(json, id));
    gs_string_free(json);
    json = NULL;
    CHECK(gs_engine_cancel(e, id) == GS_STATUS_WRONG_STATE);
    CHECK(gs_engine_retry(e, id) == GS_STATUS_OK);
    CHECK(wait_event(e, "\"event\":\"op_failed\"", 30));
    {
        uint64_t n = 0;
        CHECK(gs_engine_retry_all(e, &n) == GS_STATUS_OK && n == 1);
    }
    CHECK(wait_event(e, "\"event\":\"op_failed\"", 30));
    CHECK(gs_engine_discard(e, id) == GS_STATUS_OK);
    CHECK(gs_engine_discard(e, id) == GS_STATUS_NOT_FOUND);
    gs_string_free(id);
    id = NULL;
    CHECK(status_member(e, "failed") == 0);

    /* An atomic transaction: stored together, applied together. A refused
     * op refuses the whole array and stores nothing. */
    CHECK(gs_engine_transaction(e, "[{\"kind\":\"create\",\"entity_type\":\"note\",\"entity_id\":\"t1\","
                                   "\"payload\":{}},{\"kind\":\"create\",\"entity_type\":\"Bad Type\","
                                   "\"entity_id\":\"t2\",\"payload\":{}}]", &json) == GS_STATUS_INVALID_OP &&
          json == NULL);
    CHECK(gs_engine_transaction(e, "{}", NULL) == GS_STATUS_INVALID_ARGUMENT);
    CHECK(gs_engine_transaction(e, "[{\"kind\":\"create\",\"entity_type\":\"note\",\"entity_id\":\"t1\","
                                   "\"payload\":{\"scene\":1}},{\"kind\":\"create\",\"entity_type\":\"note\","
                                   "\"entity_id\":\"t2\",\"payload\":{\"scene\":1}}]", &json) == GS_STATUS_OK);
    CHECK(has(json, "\"txn_id\"") && has(json, "\"op_ids\""));
    gs_string_free(json);
    json = NULL;
    CHECK(wait_event(e, "\"event\":\"transaction_committed\"", 30));
    CHECK(status_member(e, "pending") == 0 && status_member(e, "in_flight") == 0);
    CHECK(gs_engine_set_event_callback(e, NULL, NULL) == GS_STATUS_OK);
    CHECK(gs_engine_stop(e, 10000 * slowdown) == GS_STATUS_OK);
    CHECK(gs_engine_close(e) == GS_STATUS_OK);
    e = NULL;

    /* Phase 3: tokens from a callback; close stops a running runner. */
    e = open_engine(dir, url, NULL);
    CHECK(e != NULL);
    CHECK(gs_engine_set_token_callback(e, give_token, (void *)token) == GS_STATUS_OK);
    CHECK(gs_engine_enqueue(e, "{\"kind\":\"delete\",\"entity_type\":\"note\",\"entity_id\":\"n0\"}",
                            NULL) == GS_STATUS_OK);
    CHECK(gs_engine_start(e) == GS_STATUS_OK);
    CHECK(wait_event(e, "\"event\":\"op_succeeded\"", 30));
    CHECK(status_member(e, "pending") == 0);
    CHECK(gs_engine_close(e) == GS_STATUS_OK);
    e = NULL;

out:
    gs_string_free(id);
    gs_string_free(json);
    if (e != NULL) gs_engine_close(e);
    if (failures == 0) printf("driver: all checks passed\n");
    return failures == 0 ? 0 : 1;
}
