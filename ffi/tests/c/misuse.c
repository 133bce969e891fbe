/*
 * What a careless C caller does to the taskpack C ABI, checked call by call: NULL arguments
 * everywhere, double frees through the nulling _free functions, handles used after their free
 * only in the ways the header makes defined (a freed variable is NULL; a bundle may go before its
 * engine; TpOutputs outlive their engine), wrong task indices and names, buffers too small then
 * the retry, wrong shapes, ranks and element types, bad bundle files and bytes, a caught panic,
 * and 8 threads sharing one engine (twice: with the default cache and with a cache smaller than
 * the task count) whose every output must equal, bit for bit, the output computed on one thread
 * first. Every check asserts an exact status (and that tp_last_error() is empty exactly on
 * TP_OK), message or value. Built and run by the Rust tests in
 * ffi/tests/c_misuse.rs and, under memcheck, ffi/tests/valgrind.rs:
 *
 *   misuse BUNDLE.tpk DATA_DIR [ROUNDS]
 *
 * DATA_DIR is demo.c's: tasks.txt (NAME RANK DIMS... OUT_RANK OUT_DIMS... per task) and
 * NAME.input.f32 / NAME.expected.f32 (raw little-endian floats). The first BATCH images of each
 * task are used. Each of the 8 threads runs every task ROUNDS times (default 3; memcheck runs
 * use 1, as every round repeats the same code paths). Exit status 0 if every check holds.
 */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "taskpack.h"

#define MAX_RANK 8
#define MAX_TASKS 64
#define BATCH 4
#define THREADS 8
/* Each thread runs every task this many times (in its own order). */
static size_t rounds = 3;

typedef struct Counts {
    int checks;
    int failures;
} Counts;

/* The main thread's counts; each worker thread has its own. */
static Counts main_counts;

#define CHECK_IN(counts, cond, ...)                                                     \
    do {                                                                                \
        (counts)->checks++;                                                             \
        if (!(cond)) {                                                                  \
            (counts)->failures++;                                                       \
            flockfile(stderr);                                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                        \
            fprintf(stderr, __VA_ARGS__);                                               \
            fprintf(stderr, " [last error: %s]\n", tp_last_error());                    \
            funlockfile(stderr);                                                        \
        }                                                                               \
    } while (0)

#define CHECK(cond, ...) CHECK_IN(&main_counts, cond, __VA_ARGS__)

/* `call` returns `want`, and tp_last_error() is empty exactly when that is TP_OK. */
#define CHECK_STATUS_IN(counts, call, want)                                             \
    do {                                                                                \
        TpStatus got_ = (call);                                                         \
        CHECK_IN(counts, got_ == (want), "%s returned %s, expected %s", #call,          \
                 tp_status_name(got_), tp_status_name(want));                           \
        CHECK_IN(counts, (tp_last_error()[0] == '\0') == ((want) == TP_OK),             \
                 "%s: the last error is %s", #call,                                     \
                 tp_last_error()[0] ? "set" : "empty");                                 \
    } while (0)

#define CHECK_STATUS(call, want) CHECK_STATUS_IN(&main_counts, call, want)

/* `call` returns TP_NULL_ARGUMENT with exactly the message naming argument `arg`. */
#define CHECK_NULL(call, arg)                                                           \
    do {                                                                                \
        TpStatus got_ = (call);                                                         \
        CHECK(got_ == TP_NULL_ARGUMENT, "%s returned %s, expected TP_NULL_ARGUMENT",    \
              #call, tp_status_name(got_));                                             \
        CHECK(strcmp(tp_last_error(), "argument `" arg "` is NULL") == 0,               \
              "%s: message \"%s\"", #call, tp_last_error());                            \
    } while (0)

typedef struct Task {
    char name[128];
    size_t rank, out_rank;
    int64_t shape[MAX_RANK], out_shape[MAX_RANK];
    /* The first `shape[0]` (<= BATCH) images, and the expected output rows for them. */
    float *input, *expected;
    /* What one thread got from tp_engine_run_f32: out_len floats. */
    float *reference;
    size_t out_len;
} Task;

static Task tasks[MAX_TASKS];
static size_t task_count;

/* Non-NULL garbage for out-parameters that a failing call must reset. */
static double junk[4];
#define JUNK(type) ((type)(void *)junk)

static size_t product(const int64_t *shape, size_t rank) {
    size_t n = 1;
    for (size_t i = 0; i < rank; i++) n *= (size_t)shape[i];
    return n;
}

/* Reads a whole file; *bytes gets its size. NULL on error. */
static void *read_file(const char *path, size_t *bytes) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    void *data = NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long size = ftell(f);
        if (size >= 0 && fseek(f, 0, SEEK_SET) == 0) {
            data = malloc(size > 0 ? (size_t)size : 1);
            if (data && fread(data, 1, (size_t)size, f) != (size_t)size) {
                free(data);
                data = NULL;
            }
            *bytes = (size_t)size;
        }
    }
    fclose(f);
    return data;
}

static float *read_floats(const char *dir, const char *name, const char *suffix, size_t *count) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s%s", dir, name, suffix);
    size_t bytes = 0;
    float *data = read_file(path, &bytes);
    *count = bytes / sizeof(float);
    if (!data) fprintf(stderr, "cannot read %s\n", path);
    return data;
}

/* Reads tasks.txt and the first BATCH images of each task with their expected outputs. */
static size_t read_tasks(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tasks.txt", dir);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = 0;
    while (n < MAX_TASKS) {
        Task *t = &tasks[n];
        if (fscanf(f, "%127s %zu", t->name, &t->rank) != 2 || t->rank > MAX_RANK || t->rank < 1)
            break;
        for (size_t i = 0; i < t->rank; i++)
            if (fscanf(f, "%" SCNd64, &t->shape[i]) != 1) goto done;
        if (fscanf(f, "%zu", &t->out_rank) != 1 || t->out_rank > MAX_RANK || t->out_rank < 1)
            break;
        for (size_t i = 0; i < t->out_rank; i++)
            if (fscanf(f, "%" SCNd64, &t->out_shape[i]) != 1) goto done;
        size_t in_count = 0, out_count = 0;
        float *input = read_floats(dir, t->name, ".input.f32", &in_count);
        float *expected = read_floats(dir, t->name, ".expected.f32", &out_count);
        if (!input || !expected || in_count != product(t->shape, t->rank)
            || out_count != product(t->out_shape, t->out_rank)) {
            fprintf(stderr, "bad data for task %s\n", t->name);
            free(input);
            free(expected);
            break;
        }
        /* Keep the first BATCH images (row-major: a prefix of the data). */
        if (t->shape[0] > BATCH) {
            t->shape[0] = BATCH;
            t->out_shape[0] = BATCH;
        }
        t->input = input;
        t->expected = expected;
        n++;
    }
done:
    fclose(f);
    return n;
}

/* Index of the first element of got that differs from want by more than 1e-4 (relative to the
 * magnitude, at least 1), or n. */
static size_t first_mismatch(const float *got, const float *want, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float tolerance = 1e-4f * (fabsf(want[i]) > 1.0f ? fabsf(want[i]) : 1.0f);
        if (!(fabsf(got[i] - want[i]) <= tolerance)) return i;
    }
    return n;
}

/* The single-thread reference of every task: ask for the length (no buffers), then run; the
 * output must match the expected one (computed by tract from the exported ONNX). */
static void references(const TpEngine *engine) {
    for (size_t i = 0; i < task_count; i++) {
        Task *t = &tasks[i];
        size_t index = SIZE_MAX, len = SIZE_MAX, rank = SIZE_MAX;
        CHECK_STATUS(tp_engine_task_index(engine, t->name, &index), TP_OK);
        CHECK(index == i, "task %s has index %zu, expected %zu (tasks.txt order)", t->name, index,
              i);
        CHECK_STATUS(tp_engine_run_f32(engine, i, t->input, t->shape, t->rank, NULL, 0, &len,
                                       NULL, 0, &rank),
                     TP_BUFFER_TOO_SMALL);
        CHECK(len == product(t->out_shape, t->out_rank) && rank == t->out_rank,
              "%s: needs %zu floats of rank %zu", t->name, len, rank);
        t->out_len = product(t->out_shape, t->out_rank);
        t->reference = calloc(t->out_len, sizeof(float));
        int64_t shape[MAX_RANK] = {0};
        CHECK_STATUS(tp_engine_run_f32(engine, i, t->input, t->shape, t->rank, t->reference,
                                       t->out_len, &len, shape, MAX_RANK, &rank),
                     TP_OK);
        CHECK(len == t->out_len && rank == t->out_rank
                  && memcmp(shape, t->out_shape, rank * sizeof(int64_t)) == 0,
              "%s: output of %zu floats, rank %zu", t->name, len, rank);
        size_t bad = first_mismatch(t->reference, t->expected, t->out_len);
        CHECK(bad == t->out_len, "%s: output[%zu] differs from the expected output", t->name, bad);
    }
}

/* Runs task `i` with tp_engine_run_f32 into a fresh buffer; whether it equals the reference bit
 * for bit. */
static int same_as_reference(Counts *counts, const TpEngine *engine, size_t i) {
    const Task *t = &tasks[i];
    float *out = malloc(t->out_len * sizeof(float));
    int64_t shape[MAX_RANK];
    size_t len = 0, rank = 0;
    CHECK_STATUS_IN(counts, tp_engine_run_f32(engine, i, t->input, t->shape, t->rank, out,
                                              t->out_len, &len, shape, MAX_RANK, &rank),
                    TP_OK);
    int same = len == t->out_len && rank == t->out_rank
               && memcmp(out, t->reference, len * sizeof(float)) == 0
               && memcmp(shape, t->out_shape, rank * sizeof(int64_t)) == 0;
    free(out);
    return same;
}

static void statics(void) {
    static const char *const names[] = {
        "TP_OK",          "TP_NULL_ARGUMENT",    "TP_INVALID_ARGUMENT", "TP_IO",
        "TP_INVALID_BUNDLE", "TP_UNKNOWN_TASK", "TP_BAD_INPUT",        "TP_BUFFER_TOO_SMALL",
        "TP_UNSUPPORTED", "TP_RUNTIME",          "TP_PANIC"};
    for (int32_t s = 0; s <= 10; s++)
        CHECK(strcmp(tp_status_name(s), names[s]) == 0, "status %d is %s", (int)s,
              tp_status_name(s));
    CHECK(strcmp(tp_status_name(-1), "TP_UNKNOWN_STATUS") == 0, "status -1");
    CHECK(strcmp(tp_status_name(11), "TP_UNKNOWN_STATUS") == 0, "status 11");
    CHECK(strcmp(tp_status_name(INT32_MIN), "TP_UNKNOWN_STATUS") == 0, "status INT32_MIN");
    CHECK(tp_version()[0] >= '0' && tp_version()[0] <= '9', "version %s", tp_version());

    /* The message survives tp_status_name, tp_version and tp_last_error itself. */
    CHECK_NULL(tp_engine_task_count(NULL, &(size_t){0}), "engine");
    const char *message = tp_last_error();
    tp_status_name(3);
    tp_version();
    tp_last_error();
    CHECK(strcmp(message, "argument `engine` is NULL") == 0, "the message changed: %s", message);
    CHECK(tp_last_error() == message, "tp_last_error() moved");
}

/* Every pointer argument of every entry point, NULL in turn: TP_NULL_ARGUMENT with a message
 * naming it, and every non-NULL out-parameter reset. */
static void nulls(const TpEngine *engine, const char *path, const void *bytes, size_t size) {
    const Task *t = &tasks[0];
    TpBundle *bundle = JUNK(TpBundle *);
    TpEngine *engine_out = JUNK(TpEngine *);
    TpOutputs *outputs = JUNK(TpOutputs *);
    size_t n = 7;
    const char *text = "junk";
    TpIoInfo info = {"junk", 7, 7, JUNK(const int64_t *)};
    TpTensor tensor = {7, junk, JUNK(const int64_t *), 7};
    int64_t dims[MAX_RANK];
    float y[64];
    float probability = 0.5f;

    CHECK_NULL(tp_bundle_open(NULL, &bundle), "path");
    CHECK(bundle == NULL, "tp_bundle_open: *out reset");
    CHECK_NULL(tp_bundle_open(path, NULL), "out");
    bundle = JUNK(TpBundle *);
    CHECK_NULL(tp_bundle_read(NULL, &bundle), "path");
    CHECK(bundle == NULL, "tp_bundle_read: *out reset");
    CHECK_NULL(tp_bundle_read(path, NULL), "out");
    bundle = JUNK(TpBundle *);
    CHECK_NULL(tp_bundle_from_memory(NULL, size, &bundle), "data");
    CHECK(bundle == NULL, "tp_bundle_from_memory: *out reset");
    bundle = JUNK(TpBundle *);
    CHECK_NULL(tp_bundle_from_memory(NULL, 0, &bundle), "data");
    CHECK(bundle == NULL, "tp_bundle_from_memory: *out reset");
    CHECK_NULL(tp_bundle_from_memory(bytes, size, NULL), "out");
    CHECK_NULL(tp_bundle_verify(NULL), "bundle");
    CHECK_NULL(tp_bundle_free(NULL), "bundle");

    CHECK_NULL(tp_engine_new(NULL, 0, &engine_out), "bundle");
    CHECK(engine_out == NULL, "tp_engine_new: *out reset");
    CHECK_NULL(tp_engine_free(NULL), "engine");
    CHECK_NULL(tp_engine_task_count(NULL, &n), "engine");
    CHECK(n == 0, "tp_engine_task_count: *count reset");
    CHECK_NULL(tp_engine_task_count(engine, NULL), "count");
    CHECK_NULL(tp_engine_task_name(NULL, 0, &text), "engine");
    CHECK(text == NULL, "tp_engine_task_name: *name reset");
    CHECK_NULL(tp_engine_task_name(engine, 0, NULL), "name");
    n = 7;
    CHECK_NULL(tp_engine_task_index(NULL, t->name, &n), "engine");
    CHECK(n == SIZE_MAX, "tp_engine_task_index: *task reset to SIZE_MAX");
    n = 7;
    CHECK_NULL(tp_engine_task_index(engine, NULL, &n), "name");
    CHECK(n == SIZE_MAX, "tp_engine_task_index: *task reset to SIZE_MAX");
    CHECK_NULL(tp_engine_task_index(engine, t->name, NULL), "task");
    CHECK_NULL(tp_engine_prepare(NULL, 0), "engine");
    n = 7;
    CHECK_NULL(tp_engine_cached_bytes(NULL, &n), "engine");
    CHECK(n == 0, "tp_engine_cached_bytes: *bytes reset");
    CHECK_NULL(tp_engine_cached_bytes(engine, NULL), "bytes");
    n = 7;
    CHECK_NULL(tp_engine_input_count(NULL, 0, &n), "engine");
    CHECK(n == 0, "tp_engine_input_count: *count reset");
    CHECK_NULL(tp_engine_input_count(engine, 0, NULL), "count");
    n = 7;
    CHECK_NULL(tp_engine_output_count(NULL, 0, &n), "engine");
    CHECK(n == 0, "tp_engine_output_count: *count reset");
    CHECK_NULL(tp_engine_output_count(engine, 0, NULL), "count");
    CHECK_NULL(tp_engine_input_info(NULL, 0, 0, &info), "engine");
    CHECK(info.name == NULL && info.dtype == 0 && info.rank == 0 && info.shape == NULL,
          "tp_engine_input_info: *info zeroed");
    CHECK_NULL(tp_engine_input_info(engine, 0, 0, NULL), "info");
    info.name = "junk";
    CHECK_NULL(tp_engine_output_info(NULL, 0, 0, &info), "engine");
    CHECK(info.name == NULL, "tp_engine_output_info: *info zeroed");
    CHECK_NULL(tp_engine_output_info(engine, 0, 0, NULL), "info");
    n = 7;
    CHECK_NULL(tp_engine_input_shape(NULL, 0, 0, dims, MAX_RANK, &n), "engine");
    CHECK(n == 0, "tp_engine_input_shape: *rank reset");
    CHECK_NULL(tp_engine_input_shape(engine, 0, 0, NULL, MAX_RANK, &n), "shape");
    CHECK_NULL(tp_engine_input_shape(engine, 0, 0, dims, MAX_RANK, NULL), "rank");
    CHECK_NULL(tp_engine_output_shape(NULL, 0, 0, dims, MAX_RANK, &n), "engine");
    CHECK_NULL(tp_engine_output_shape(engine, 0, 0, NULL, MAX_RANK, &n), "shape");
    CHECK_NULL(tp_engine_output_shape(engine, 0, 0, dims, MAX_RANK, NULL), "rank");

    size_t len = 7, rank = 7;
    CHECK_NULL(tp_engine_run_f32(NULL, 0, t->input, t->shape, t->rank, y, 64, &len, dims,
                                 MAX_RANK, &rank),
               "engine");
    CHECK(len == 0 && rank == 0, "tp_engine_run_f32: lengths reset (%zu, %zu)", len, rank);
    CHECK_NULL(tp_engine_run_f32(engine, 0, NULL, t->shape, t->rank, y, 64, &len, dims, MAX_RANK,
                                 &rank),
               "input");
    CHECK_NULL(tp_engine_run_f32(engine, 0, t->input, NULL, t->rank, y, 64, &len, dims, MAX_RANK,
                                 &rank),
               "shape");
    CHECK_NULL(tp_engine_run_f32(engine, 0, t->input, t->shape, t->rank, NULL, 64, &len, dims,
                                 MAX_RANK, &rank),
               "output");
    CHECK_NULL(tp_engine_run_f32(engine, 0, t->input, t->shape, t->rank, y, 64, NULL, dims,
                                 MAX_RANK, &rank),
               "output_len");
    CHECK_NULL(tp_engine_run_f32(engine, 0, t->input, t->shape, t->rank, y, 64, &len, NULL,
                                 MAX_RANK, &rank),
               "output_shape");
    len = 7;
    CHECK_NULL(tp_engine_run_f32(engine, 0, t->input, t->shape, t->rank, y, 64, &len, dims,
                                 MAX_RANK, NULL),
               "output_rank");
    CHECK(len == 0, "tp_engine_run_f32: *output_len reset");

    TpTensor in = {TP_DTYPE_F32, t->input, t->shape, t->rank};
    CHECK_NULL(tp_engine_run(NULL, 0, &in, 1, &outputs), "engine");
    CHECK(outputs == NULL, "tp_engine_run: *outputs reset");
    CHECK_NULL(tp_engine_run(engine, 0, NULL, 1, &outputs), "inputs");
    CHECK_NULL(tp_engine_run(engine, 0, NULL, 0, &outputs), "inputs");
    CHECK_NULL(tp_engine_run(engine, 0, &in, 1, NULL), "outputs");
    TpTensor no_data = {TP_DTYPE_F32, NULL, t->shape, t->rank};
    CHECK_NULL(tp_engine_run(engine, 0, &no_data, 1, &outputs), "inputs[].data");
    TpTensor no_shape = {TP_DTYPE_F32, t->input, NULL, t->rank};
    CHECK_NULL(tp_engine_run(engine, 0, &no_shape, 1, &outputs), "inputs[].shape");
    CHECK(outputs == NULL, "tp_engine_run: *outputs reset");
    n = 7;
    CHECK_NULL(tp_outputs_count(NULL, &n), "outputs");
    CHECK(n == 0, "tp_outputs_count: *count reset");
    CHECK_NULL(tp_outputs_get(NULL, 0, &tensor), "outputs");
    CHECK(tensor.data == NULL && tensor.shape == NULL && tensor.rank == 0 && tensor.dtype == 0,
          "tp_outputs_get: *tensor zeroed");
    CHECK_NULL(tp_outputs_free(NULL), "outputs");
    /* The counts and gets on real outputs with NULL out-parameters. */
    outputs = NULL;
    CHECK_STATUS(tp_engine_run(engine, 0, &in, 1, &outputs), TP_OK);
    CHECK_NULL(tp_outputs_count(outputs, NULL), "count");
    CHECK_NULL(tp_outputs_get(outputs, 0, NULL), "tensor");
    CHECK_STATUS(tp_outputs_free(&outputs), TP_OK);

    size_t class_index = 7;
    CHECK_NULL(tp_engine_classify_text(NULL, 0, "text", &class_index, &probability), "engine");
    CHECK(class_index == SIZE_MAX && probability == 0.0f, "classify: outputs reset");
    CHECK_NULL(tp_engine_classify_text(engine, 0, NULL, &class_index, &probability), "text");
    CHECK_NULL(tp_engine_classify_text(engine, 0, "text", NULL, &probability), "class_index");
    CHECK_NULL(tp_engine_classify_text(engine, 0, "text", &class_index, NULL), "probability");
    n = 7;
    CHECK_NULL(tp_engine_task_label_count(NULL, 0, &n), "engine");
    CHECK(n == 0, "tp_engine_task_label_count: *count reset");
    CHECK_NULL(tp_engine_task_label_count(engine, 0, NULL), "count");
    text = "junk";
    CHECK_NULL(tp_engine_task_label(NULL, 0, 0, &text), "engine");
    CHECK(text == NULL, "tp_engine_task_label: *label reset");
    CHECK_NULL(tp_engine_task_label(engine, 0, 0, NULL), "label");
}

/* Task indices at and past the count, and names that are not the bundle's. */
static void wrong_tasks(const TpEngine *engine) {
    const size_t bad[] = {task_count, task_count + 1, SIZE_MAX};
    const Task *t = &tasks[0];
    for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
        size_t i = bad[b], n = 7, len = 7, rank = 7;
        const char *name = "junk";
        TpIoInfo info;
        int64_t dims[MAX_RANK];
        float y[64];
        TpOutputs *outputs = JUNK(TpOutputs *);
        TpTensor in = {TP_DTYPE_F32, t->input, t->shape, t->rank};
        CHECK_STATUS(tp_engine_task_name(engine, i, &name), TP_UNKNOWN_TASK);
        CHECK(name == NULL, "task_name %zu: *name reset", i);
        CHECK_STATUS(tp_engine_prepare(engine, i), TP_UNKNOWN_TASK);
        CHECK_STATUS(tp_engine_input_count(engine, i, &n), TP_UNKNOWN_TASK);
        CHECK(n == 0, "input_count %zu: *count reset", i);
        CHECK_STATUS(tp_engine_output_count(engine, i, &n), TP_UNKNOWN_TASK);
        CHECK_STATUS(tp_engine_input_info(engine, i, 0, &info), TP_UNKNOWN_TASK);
        CHECK(info.name == NULL, "input_info %zu: *info zeroed", i);
        CHECK_STATUS(tp_engine_output_info(engine, i, 0, &info), TP_UNKNOWN_TASK);
        CHECK_STATUS(tp_engine_input_shape(engine, i, 0, dims, MAX_RANK, &n), TP_UNKNOWN_TASK);
        CHECK_STATUS(tp_engine_output_shape(engine, i, 0, dims, MAX_RANK, &n), TP_UNKNOWN_TASK);
        CHECK_STATUS(tp_engine_run_f32(engine, i, t->input, t->shape, t->rank, y, 64, &len, dims,
                                       MAX_RANK, &rank),
                     TP_UNKNOWN_TASK);
        CHECK(len == 0 && rank == 0, "run_f32 %zu: lengths reset", i);
        CHECK_STATUS(tp_engine_run(engine, i, &in, 1, &outputs), TP_UNKNOWN_TASK);
        CHECK(outputs == NULL, "run %zu: *outputs reset", i);
        size_t class_index = 7;
        float probability = 0.5f;
        CHECK_STATUS(tp_engine_classify_text(engine, i, "text", &class_index, &probability),
                     TP_UNKNOWN_TASK);
        CHECK_STATUS(tp_engine_task_label_count(engine, i, &n), TP_UNKNOWN_TASK);
        CHECK_STATUS(tp_engine_task_label(engine, i, 0, &name), TP_UNKNOWN_TASK);
        char want[128];
        snprintf(want, sizeof want, "task index %zu out of range (the bundle has %zu tasks)", i,
                 task_count);
        CHECK_STATUS(tp_engine_task_name(engine, i, &name), TP_UNKNOWN_TASK);
        CHECK(strcmp(tp_last_error(), want) == 0, "message \"%s\"", tp_last_error());
    }

    /* Names: close to a real one, empty, very long, not UTF-8. */
    char upper[128], spaced[160], prefix[128];
    size_t k;
    for (k = 0; t->name[k]; k++)
        upper[k] = (char)(t->name[k] >= 'a' && t->name[k] <= 'z' ? t->name[k] - 32 : t->name[k]);
    upper[k] = '\0';
    snprintf(spaced, sizeof spaced, "%s ", t->name);
    snprintf(prefix, sizeof prefix, "%.*s", (int)(strlen(t->name) - 1), t->name);
    char *long_name = malloc(100001);
    memset(long_name, 'x', 100000);
    long_name[100000] = '\0';
    const char *unknown[] = {upper, spaced, prefix, "", long_name, "no-such-task"};
    for (size_t u = 0; u < sizeof unknown / sizeof unknown[0]; u++) {
        size_t index = 7;
        CHECK_STATUS(tp_engine_task_index(engine, unknown[u], &index), TP_UNKNOWN_TASK);
        CHECK(index == SIZE_MAX, "task_index(%.20s): *task is SIZE_MAX", unknown[u]);
        /* The message lists the bundle's tasks. */
        for (size_t i = 0; i < task_count; i++)
            CHECK(strstr(tp_last_error(), tasks[i].name) != NULL,
                  "the message for %.20s lists %s", unknown[u], tasks[i].name);
    }
    free(long_name);
    size_t index = 7;
    CHECK_STATUS(tp_engine_task_index(engine, "caf\xe9", &index), TP_INVALID_ARGUMENT);
    CHECK(strcmp(tp_last_error(), "argument `name` is not UTF-8") == 0, "message \"%s\"",
          tp_last_error());
    CHECK(index == SIZE_MAX, "task_index(latin-1): *task is SIZE_MAX");

    /* Input, output and label indices out of range. */
    TpIoInfo info = {"junk", 7, 7, NULL};
    int64_t dims[MAX_RANK];
    size_t rank = 7;
    CHECK_STATUS(tp_engine_input_info(engine, 0, 1, &info), TP_INVALID_ARGUMENT);
    CHECK(info.name == NULL && info.rank == 0, "input_info: *info zeroed");
    CHECK_STATUS(tp_engine_output_info(engine, 0, SIZE_MAX, &info), TP_INVALID_ARGUMENT);
    CHECK_STATUS(tp_engine_input_shape(engine, 0, 1, dims, MAX_RANK, &rank), TP_INVALID_ARGUMENT);
    CHECK(rank == 0, "input_shape: *rank reset");
    CHECK_STATUS(tp_engine_output_shape(engine, 0, 1, dims, MAX_RANK, &rank),
                 TP_INVALID_ARGUMENT);
    size_t labels = 7;
    const char *label = "junk";
    CHECK_STATUS(tp_engine_task_label_count(engine, 0, &labels), TP_OK);
    CHECK(labels == 0, "the demo bundle has no label names (%zu)", labels);
    CHECK_STATUS(tp_engine_task_label(engine, 0, 0, &label), TP_INVALID_ARGUMENT);
    CHECK(label == NULL, "task_label: *label reset");

    /* Text on a bundle without tokenizer. */
    size_t class_index = 7;
    float probability = 0.5f;
    CHECK_STATUS(tp_engine_classify_text(engine, 0, "a text", &class_index, &probability),
                 TP_UNSUPPORTED);
    CHECK(strstr(tp_last_error(), "has no tokenizer") != NULL, "message \"%s\"",
          tp_last_error());
    CHECK(class_index == SIZE_MAX && probability == 0.0f, "classify: outputs reset");
}

/* Buffers too small: the needed sizes come back, nothing is copied; then the retry works. */
static void tiny_buffers(const TpEngine *engine) {
    for (size_t i = 0; i < task_count; i++) {
        const Task *t = &tasks[i];
        float *out = malloc((t->out_len + 1) * sizeof(float));
        int64_t shape[MAX_RANK];
        size_t len = 7, rank = 7;
        const size_t capacities[][2] = {
            {0, 0}, {t->out_len - 1, MAX_RANK}, {t->out_len, t->out_rank - 1}, {1, 1}};
        for (size_t c = 0; c < 4; c++) {
            for (size_t k = 0; k <= t->out_len; k++) out[k] = -7.0f;
            for (size_t k = 0; k < MAX_RANK; k++) shape[k] = -7;
            CHECK_STATUS(tp_engine_run_f32(engine, i, t->input, t->shape, t->rank,
                                           capacities[c][0] ? out : NULL, capacities[c][0], &len,
                                           capacities[c][1] ? shape : NULL, capacities[c][1],
                                           &rank),
                         TP_BUFFER_TOO_SMALL);
            CHECK(len == t->out_len && rank == t->out_rank,
                  "%s, capacities %zu/%zu: needs %zu/%zu", t->name, capacities[c][0],
                  capacities[c][1], len, rank);
            int untouched = 1;
            for (size_t k = 0; k <= t->out_len; k++) untouched &= out[k] == -7.0f;
            for (size_t k = 0; k < MAX_RANK; k++) untouched &= shape[k] == -7;
            CHECK(untouched, "%s: TP_BUFFER_TOO_SMALL copied something", t->name);
        }
        /* The retry with the sizes reported; one float more is not written either. */
        CHECK_STATUS(tp_engine_run_f32(engine, i, t->input, t->shape, t->rank, out, len, &len,
                                       shape, rank, &rank),
                     TP_OK);
        CHECK(memcmp(out, t->reference, t->out_len * sizeof(float)) == 0 && out[t->out_len] == -7.0f
                  && memcmp(shape, t->out_shape, t->out_rank * sizeof(int64_t)) == 0
                  && shape[t->out_rank] == -7,
              "%s: the retry gives the reference", t->name);
        free(out);

        /* Shapes: ask for the rank with no buffer, then one too small, then enough. */
        size_t want = 7;
        CHECK_STATUS(tp_engine_input_shape(engine, i, 0, NULL, 0, &want), TP_BUFFER_TOO_SMALL);
        CHECK(want == t->rank, "%s: input rank %zu", t->name, want);
        for (size_t k = 0; k < MAX_RANK; k++) shape[k] = -7;
        CHECK_STATUS(tp_engine_input_shape(engine, i, 0, shape, want - 1, &rank),
                     TP_BUFFER_TOO_SMALL);
        CHECK(rank == want && shape[0] == -7, "%s: a short shape buffer is untouched", t->name);
        CHECK_STATUS(tp_engine_input_shape(engine, i, 0, shape, want, &rank), TP_OK);
        CHECK(shape[0] == -1 && memcmp(shape + 1, t->shape + 1, (want - 1) * sizeof(int64_t)) == 0,
              "%s: input shape [%" PRId64 ",...]", t->name, shape[0]);
        CHECK_STATUS(tp_engine_output_shape(engine, i, 0, NULL, 0, &want), TP_BUFFER_TOO_SMALL);
        CHECK(want == t->out_rank, "%s: output rank %zu", t->name, want);
    }
}

/* Shapes, ranks and element types that do not fit: errors, lengths reset, nothing written. */
static void wrong_shapes(const TpEngine *engine) {
    const Task *t = &tasks[0];
    size_t elements = product(t->shape, t->rank);
    /* Big enough for every shape below that passes the NULL checks. */
    float *x = calloc(4 * elements + 16, sizeof(float));
    float y[256];
    int64_t out_shape[MAX_RANK];
    struct {
        size_t rank;
        int64_t dims[6];
        TpStatus want;
    } cases[] = {
        {t->rank - 1, {0}, TP_BAD_INPUT},     /* rank too small */
        {t->rank + 1, {0}, TP_BAD_INPUT},     /* rank too large */
        {t->rank, {0}, TP_BAD_INPUT},         /* last dimension one less */
        {t->rank, {0}, TP_BAD_INPUT},         /* second dimension doubled */
        {t->rank, {0}, TP_INVALID_ARGUMENT},  /* a negative dimension */
        {t->rank, {0}, TP_INVALID_ARGUMENT},  /* dimensions whose product overflows */
        {0, {0}, TP_BAD_INPUT},               /* a scalar */
    };
    size_t n = sizeof cases / sizeof cases[0];
    for (size_t c = 0; c < n; c++) memcpy(cases[c].dims, t->shape, t->rank * sizeof(int64_t));
    cases[1].dims[t->rank] = 1;
    cases[2].dims[t->rank - 1] -= 1;
    cases[3].dims[1] *= 2;
    cases[4].dims[t->rank - 1] = -t->shape[t->rank - 1];
    cases[5].dims[0] = INT64_MAX;
    cases[5].dims[1] = INT64_MAX;
    for (size_t c = 0; c < n; c++) {
        size_t len = 7, rank = 7;
        for (size_t k = 0; k < 256; k++) y[k] = -7.0f;
        CHECK_STATUS(tp_engine_run_f32(engine, 0, x, cases[c].dims, cases[c].rank, y, 256, &len,
                                       out_shape, MAX_RANK, &rank),
                     cases[c].want);
        CHECK(len == 0 && rank == 0 && y[0] == -7.0f, "shape case %zu: lengths reset", c);
        TpTensor in = {TP_DTYPE_F32, x, cases[c].dims, cases[c].rank};
        TpOutputs *outputs = JUNK(TpOutputs *);
        CHECK_STATUS(tp_engine_run(engine, 0, &in, 1, &outputs), cases[c].want);
        CHECK(outputs == NULL, "shape case %zu: *outputs reset", c);
    }
    /* An empty batch: no input bytes (NULL is allowed for 0 elements), an empty output. */
    int64_t empty[MAX_RANK];
    memcpy(empty, t->shape, t->rank * sizeof(int64_t));
    empty[0] = 0;
    size_t len = 7, rank = 7;
    for (size_t k = 0; k < MAX_RANK; k++) out_shape[k] = -7;
    CHECK_STATUS(tp_engine_run_f32(engine, 0, NULL, empty, t->rank, NULL, 0, &len, out_shape,
                                   MAX_RANK, &rank),
                 TP_OK);
    CHECK(len == 0 && rank == t->out_rank && out_shape[0] == 0
              && out_shape[1] == t->out_shape[1],
          "an empty batch gives an empty output (%zu floats, rank %zu)", len, rank);
    TpTensor none = {TP_DTYPE_F32, NULL, empty, t->rank};
    TpOutputs *nothing = NULL;
    CHECK_STATUS(tp_engine_run(engine, 0, &none, 1, &nothing), TP_OK);
    TpTensor got = {0};
    CHECK_STATUS(tp_outputs_get(nothing, 0, &got), TP_OK);
    CHECK(got.dtype == TP_DTYPE_F32 && got.rank == t->out_rank && got.shape[0] == 0,
          "tp_engine_run on an empty batch");
    CHECK_STATUS(tp_outputs_free(&nothing), TP_OK);

    /* The message says what was expected. */
    CHECK_STATUS(tp_engine_run_f32(engine, 0, x, cases[2].dims, t->rank, y, 256, &(size_t){0},
                                   out_shape, MAX_RANK, &(size_t){0}),
                 TP_BAD_INPUT);
    CHECK(strstr(tp_last_error(), "expected F32 [N,") != NULL, "message \"%s\"", tp_last_error());

    /* Element types: a wrong one, unknown codes; the wrong number of tensors. */
    TpOutputs *outputs = JUNK(TpOutputs *);
    const int32_t bad_types[] = {TP_DTYPE_I64, TP_DTYPE_F64, TP_DTYPE_BOOL, TP_DTYPE_U8};
    for (size_t k = 0; k < 4; k++) {
        TpTensor in = {bad_types[k], x, t->shape, t->rank};
        CHECK_STATUS(tp_engine_run(engine, 0, &in, 1, &outputs), TP_BAD_INPUT);
        CHECK(outputs == NULL, "dtype %d: *outputs reset", (int)bad_types[k]);
    }
    const int32_t unknown_types[] = {TP_DTYPE_OTHER, 13, -1, INT32_MAX};
    for (size_t k = 0; k < 4; k++) {
        TpTensor in = {unknown_types[k], x, t->shape, t->rank};
        CHECK_STATUS(tp_engine_run(engine, 0, &in, 1, &outputs), TP_INVALID_ARGUMENT);
    }
    TpTensor two[2] = {{TP_DTYPE_F32, x, t->shape, t->rank}, {TP_DTYPE_F32, x, t->shape, t->rank}};
    CHECK_STATUS(tp_engine_run(engine, 0, two, 2, &outputs), TP_BAD_INPUT);
    CHECK_STATUS(tp_engine_run(engine, 0, two, 0, &outputs), TP_BAD_INPUT);
    CHECK(outputs == NULL, "a failed run leaves *outputs NULL");

    /* The general form's output index out of range; then the right one equals the reference. */
    CHECK_STATUS(tp_engine_run(engine, 0, two, 1, &outputs), TP_OK);
    TpTensor out = {7, junk, NULL, 7};
    size_t count = 7;
    CHECK_STATUS(tp_outputs_count(outputs, &count), TP_OK);
    CHECK(count == 1, "one output (%zu)", count);
    CHECK_STATUS(tp_outputs_get(outputs, 1, &out), TP_INVALID_ARGUMENT);
    CHECK(out.data == NULL && out.rank == 0, "outputs_get: *tensor zeroed");
    CHECK_STATUS(tp_outputs_get(outputs, SIZE_MAX, &out), TP_INVALID_ARGUMENT);
    CHECK_STATUS(tp_outputs_free(&outputs), TP_OK);
    free(x);
}

/* The ways to use a handle after a free that the header defines. */
static void freed_handles(const char *path) {
    TpBundle *bundle = NULL;
    TpEngine *engine = NULL;
    TpOutputs *outputs = NULL;
    const char *name = NULL;
    const Task *t = &tasks[task_count - 1];
    size_t last = task_count - 1;
    CHECK_STATUS(tp_bundle_open(path, &bundle), TP_OK);
    CHECK_STATUS(tp_engine_new(bundle, 0, &engine), TP_OK);
    CHECK_STATUS(tp_engine_task_name(engine, last, &name), TP_OK);
    /* The bundle goes first, twice; its variable is NULL and every use of it is refused. */
    CHECK_STATUS(tp_bundle_free(&bundle), TP_OK);
    CHECK(bundle == NULL, "tp_bundle_free nulls the handle");
    CHECK_STATUS(tp_bundle_free(&bundle), TP_OK);
    CHECK_NULL(tp_bundle_verify(bundle), "bundle");
    TpEngine *other = JUNK(TpEngine *);
    CHECK_NULL(tp_engine_new(bundle, 0, &other), "bundle");
    CHECK(other == NULL, "engine_new on a freed bundle: *out reset");
    /* The engine still runs, and what it handed out is still there. */
    CHECK(name && strcmp(name, t->name) == 0, "a task name outlives the bundle");
    CHECK(same_as_reference(&main_counts, engine, last), "the engine outlives its bundle");
    TpIoInfo info;
    CHECK_STATUS(tp_engine_input_info(engine, last, 0, &info), TP_OK);
    /* Outputs outlive their engine. */
    TpTensor in = {TP_DTYPE_F32, t->input, t->shape, t->rank};
    CHECK_STATUS(tp_engine_run(engine, last, &in, 1, &outputs), TP_OK);
    CHECK(info.rank == t->rank && info.shape[0] == -1 && strlen(info.name) > 0,
          "input info of %s", t->name);
    CHECK_STATUS(tp_engine_free(&engine), TP_OK);
    CHECK(engine == NULL, "tp_engine_free nulls the handle");
    CHECK_STATUS(tp_engine_free(&engine), TP_OK);
    size_t count = 7;
    CHECK_NULL(tp_engine_task_count(engine, &count), "engine");
    CHECK(count == 0, "task_count on a freed engine: *count reset");
    TpTensor out;
    CHECK_STATUS(tp_outputs_get(outputs, 0, &out), TP_OK);
    CHECK(out.dtype == TP_DTYPE_F32 && out.rank == t->out_rank
              && memcmp(out.shape, t->out_shape, out.rank * sizeof(int64_t)) == 0
              && memcmp(out.data, t->reference, t->out_len * sizeof(float)) == 0,
          "outputs outlive their engine and equal the reference");
    CHECK_STATUS(tp_outputs_free(&outputs), TP_OK);
    CHECK(outputs == NULL, "tp_outputs_free nulls the handle");
    CHECK_STATUS(tp_outputs_free(&outputs), TP_OK);
    CHECK_NULL(tp_outputs_count(outputs, &count), "outputs");
}

/* Bad files and bytes; then the two other ways to load a good bundle. */
static void loading(const char *path, const char *dir, const unsigned char *bytes, size_t size) {
    TpBundle *bundle = JUNK(TpBundle *);
    char missing[4096];
    snprintf(missing, sizeof missing, "%s/missing.tpk", dir);
    CHECK_STATUS(tp_bundle_open(missing, &bundle), TP_IO);
    CHECK(bundle == NULL && strstr(tp_last_error(), "missing.tpk") != NULL,
          "a missing file: TP_IO naming it");
    bundle = JUNK(TpBundle *);
    CHECK_STATUS(tp_bundle_read(missing, &bundle), TP_IO);
    CHECK(bundle == NULL, "tp_bundle_read: *out reset");
    CHECK_STATUS(tp_bundle_open("", &bundle), TP_IO);
    /* A text file, the tasks list, is no bundle. */
    char text[4096];
    snprintf(text, sizeof text, "%s/tasks.txt", dir);
    CHECK_STATUS(tp_bundle_open(text, &bundle), TP_INVALID_BUNDLE);
    CHECK_STATUS(tp_bundle_read(text, &bundle), TP_INVALID_BUNDLE);
    CHECK(bundle == NULL, "a bad file: *out is NULL");
    /* Bytes: none, a truncated bundle, every prefix length class, a flipped header byte. */
    const unsigned char none[1] = {0};
    CHECK_STATUS(tp_bundle_from_memory(none, 0, &bundle), TP_INVALID_BUNDLE);
    const size_t cuts[] = {1, 7, 8, 16, 63, 64, 100, size / 2, size - 1};
    for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++) {
        bundle = JUNK(TpBundle *);
        CHECK_STATUS(tp_bundle_from_memory(bytes, cuts[c], &bundle), TP_INVALID_BUNDLE);
        CHECK(bundle == NULL, "a bundle cut at %zu: *out is NULL", cuts[c]);
    }
    unsigned char *copy = malloc(size);
    memcpy(copy, bytes, size);
    copy[0] ^= 0xff;
    CHECK_STATUS(tp_bundle_from_memory(copy, size, &bundle), TP_INVALID_BUNDLE);

    /* From memory, the caller's copy released right away: verify, then every task runs. */
    memcpy(copy, bytes, size);
    CHECK_STATUS(tp_bundle_from_memory(copy, size, &bundle), TP_OK);
    memset(copy, 0xa5, size);
    free(copy);
    CHECK_STATUS(tp_bundle_verify(bundle), TP_OK);
    TpEngine *engine = NULL;
    CHECK_STATUS(tp_engine_new(bundle, 0, &engine), TP_OK);
    CHECK_STATUS(tp_bundle_free(&bundle), TP_OK);
    for (size_t i = 0; i < task_count; i++)
        CHECK(same_as_reference(&main_counts, engine, i), "from memory: task %s", tasks[i].name);
    CHECK_STATUS(tp_engine_free(&engine), TP_OK);

    /* Read into memory owned by the bundle. */
    CHECK_STATUS(tp_bundle_read(path, &bundle), TP_OK);
    CHECK_STATUS(tp_bundle_verify(bundle), TP_OK);
    CHECK_STATUS(tp_engine_new(bundle, 0, &engine), TP_OK);
    CHECK_STATUS(tp_bundle_free(&bundle), TP_OK);
    for (size_t i = 0; i < task_count; i++)
        CHECK(same_as_reference(&main_counts, engine, i), "read: task %s", tasks[i].name);
    CHECK_STATUS(tp_engine_free(&engine), TP_OK);
}

typedef struct Worker {
    pthread_t thread;
    const TpEngine *engine;
    size_t id;
    Counts counts;
    size_t runs;
} Worker;

/* One of the threads sharing an engine: every task `rounds` times in its own order, through both
 * run forms, each output compared bit for bit with the reference; plus errors, whose message
 * must be this thread's own. */
static void *work(void *arg) {
    Worker *w = arg;
    Counts *counts = &w->counts;
    char mine[64];
    snprintf(mine, sizeof mine, "no-such-task-of-thread-%zu", w->id);
    for (size_t round = 0; round < rounds; round++) {
        for (size_t k = 0; k < task_count; k++) {
            /* Threads start on different tasks and walk in different directions. */
            size_t i = w->id % 2 ? (w->id + k + round) % task_count
                                 : (w->id + task_count - k + round) % task_count;
            const Task *t = &tasks[i];
            CHECK_IN(counts, same_as_reference(counts, w->engine, i),
                     "thread %zu, task %s: output differs from the single-thread one", w->id,
                     t->name);
            TpTensor in = {TP_DTYPE_F32, t->input, t->shape, t->rank};
            TpOutputs *outputs = NULL;
            TpTensor out;
            CHECK_STATUS_IN(counts, tp_engine_run(w->engine, i, &in, 1, &outputs), TP_OK);
            CHECK_STATUS_IN(counts, tp_outputs_get(outputs, 0, &out), TP_OK);
            CHECK_IN(counts,
                     out.data && out.rank == t->out_rank
                         && memcmp(out.data, t->reference, t->out_len * sizeof(float)) == 0,
                     "thread %zu, task %s: tp_engine_run differs", w->id, t->name);
            CHECK_STATUS_IN(counts, tp_outputs_free(&outputs), TP_OK);
            w->runs += 2;

            size_t len = 7, rank = 7, index = 7;
            CHECK_STATUS_IN(counts, tp_engine_run_f32(w->engine, i, t->input, t->shape, t->rank,
                                                      NULL, 0, &len, NULL, 0, &rank),
                            TP_BUFFER_TOO_SMALL);
            CHECK_IN(counts, len == t->out_len && rank == t->out_rank,
                     "thread %zu: needed length %zu", w->id, len);
            CHECK_STATUS_IN(counts, tp_engine_task_index(w->engine, mine, &index),
                            TP_UNKNOWN_TASK);
            CHECK_IN(counts, strstr(tp_last_error(), mine) != NULL,
                     "thread %zu sees another thread's message", w->id);
        }
    }
    return NULL;
}

/* THREADS threads on one engine; their checks are added to the main counts. */
static void threads(const TpEngine *engine, const char *what) {
    Worker workers[THREADS];
    size_t started = 0, runs = 0;
    for (size_t i = 0; i < THREADS; i++) {
        workers[i] = (Worker){.engine = engine, .id = i};
        if (pthread_create(&workers[i].thread, NULL, work, &workers[i]) != 0) break;
        started++;
    }
    CHECK(started == THREADS, "%s: started %zu threads", what, started);
    for (size_t i = 0; i < started; i++) {
        pthread_join(workers[i].thread, NULL);
        main_counts.checks += workers[i].counts.checks;
        main_counts.failures += workers[i].counts.failures;
        runs += workers[i].runs;
    }
    CHECK(runs == started * rounds * task_count * 2, "%s: %zu runs", what, runs);
    printf("%s: %zu threads, %zu runs, each output equal to the single-thread one\n", what,
           started, runs);
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: %s BUNDLE.tpk DATA_DIR [ROUNDS]\n", argv[0]);
        return 2;
    }
    if (argc == 4) rounds = strtoul(argv[3], NULL, 10);
    if (rounds == 0) {
        fprintf(stderr, "ROUNDS must be a positive number\n");
        return 2;
    }
    const char *path = argv[1], *dir = argv[2];
    task_count = read_tasks(dir);
    if (task_count < 2) {
        fprintf(stderr, "need at least 2 tasks in %s/tasks.txt\n", dir);
        return 2;
    }
    size_t size = 0;
    unsigned char *bytes = read_file(path, &size);
    if (!bytes || size < 128) {
        fprintf(stderr, "cannot read %s\n", path);
        return 2;
    }

    statics();
    TpBundle *bundle = NULL;
    TpEngine *engine = NULL;
    CHECK_STATUS(tp_bundle_open(path, &bundle), TP_OK);
    CHECK_STATUS(tp_engine_new(bundle, 0, &engine), TP_OK);
    if (!engine) return 1;
    size_t count = 0;
    CHECK_STATUS(tp_engine_task_count(engine, &count), TP_OK);
    CHECK(count == task_count, "the bundle has %zu tasks, tasks.txt %zu", count, task_count);
    references(engine);

    nulls(engine, path, bytes, size);
    wrong_tasks(engine);
    tiny_buffers(engine);
    wrong_shapes(engine);
    freed_handles(path);
    loading(path, dir, bytes, size);

    /* A panic is a status; the engine still works after it. */
    CHECK_STATUS(tp_debug_panic(), TP_PANIC);
    CHECK(strcmp(tp_last_error(), "tp_debug_panic panicked: tp_debug_panic was called") == 0,
          "panic message \"%s\"", tp_last_error());
    CHECK(same_as_reference(&main_counts, engine, 0), "the engine works after a panic");

    /* 8 threads on one engine whose tasks are all cached... */
    for (size_t i = 0; i < task_count; i++) CHECK_STATUS(tp_engine_prepare(engine, i), TP_OK);
    threads(engine, "default cache");
    /* ...and on one whose cache holds 2 of them: threads evict each other's tasks. */
    size_t one = 0, all = 0, cached = 0;
    TpEngine *small = NULL;
    CHECK_STATUS(tp_engine_cached_bytes(engine, &all), TP_OK);
    CHECK_STATUS(tp_engine_new(bundle, 0, &small), TP_OK);
    CHECK_STATUS(tp_engine_prepare(small, 0), TP_OK);
    CHECK_STATUS(tp_engine_cached_bytes(small, &one), TP_OK);
    CHECK_STATUS(tp_engine_free(&small), TP_OK);
    CHECK(one > 0 && all >= task_count * one / 2, "cached bytes: one task %zu, all %zu", one,
          all);
    CHECK_STATUS(tp_engine_new(bundle, 2 * one + one / 2, &small), TP_OK);
    threads(small, "cache of 2 tasks");
    CHECK_STATUS(tp_engine_cached_bytes(small, &cached), TP_OK);
    CHECK(cached <= 2 * one + one / 2, "the small cache holds %zu bytes", cached);
    CHECK_STATUS(tp_engine_free(&small), TP_OK);

    CHECK_STATUS(tp_engine_free(&engine), TP_OK);
    CHECK_STATUS(tp_bundle_free(&bundle), TP_OK);
    CHECK(engine == NULL && bundle == NULL, "handles nulled");
    for (size_t i = 0; i < task_count; i++) {
        free(tasks[i].input);
        free(tasks[i].expected);
        free(tasks[i].reference);
    }
    free(bytes);
    printf("misuse.c: %d checks, %d failures\n", main_counts.checks, main_counts.failures);
    return main_counts.failures == 0 ? 0 : 1;
}
