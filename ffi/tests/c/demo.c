/*
 * The taskpack C ABI end to end, as a native app uses it: open the demo bundle, run every task
 * on its test inputs and compare with the expected outputs; then the misuse a C caller can
 * commit. Built and run by the Rust test `c_demo` (ffi/tests/c_demo.rs):
 *
 *   demo BUNDLE.tpk DATA_DIR
 *
 * DATA_DIR/tasks.txt has one line per task: NAME RANK DIMS... OUT_RANK OUT_DIMS..., and
 * DATA_DIR/NAME.input.f32 / NAME.expected.f32 hold the input and the expected output as raw
 * little-endian floats. Exit status 0 if every check holds.
 */
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "taskpack.h"

#define MAX_RANK 8
#define MAX_TASKS 64

static int checks = 0;
static int failures = 0;

#define CHECK(cond, ...)                                                         \
    do {                                                                         \
        checks++;                                                                \
        if (!(cond)) {                                                           \
            failures++;                                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                 \
            fprintf(stderr, __VA_ARGS__);                                        \
            fprintf(stderr, " [last error: %s]\n", tp_last_error());             \
        }                                                                        \
    } while (0)

#define CHECK_STATUS(call, want)                                                 \
    do {                                                                         \
        TpStatus got_ = (call);                                                  \
        CHECK(got_ == (want), "%s returned %s, expected %s", #call,              \
              tp_status_name(got_), tp_status_name(want));                       \
    } while (0)

typedef struct Task {
    char name[128];
    size_t rank, out_rank;
    int64_t shape[MAX_RANK], out_shape[MAX_RANK];
} Task;

/* Reads a whole file of floats; *count gets their number. NULL on error. */
static float *read_f32(const char *dir, const char *name, const char *suffix, size_t *count) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s%s", dir, name, suffix);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    float *data = malloc(bytes > 0 ? (size_t)bytes : 1);
    if (data && fread(data, 1, (size_t)bytes, f) != (size_t)bytes) {
        free(data);
        data = NULL;
    }
    fclose(f);
    *count = (size_t)bytes / sizeof(float);
    return data;
}

static size_t product(const int64_t *shape, size_t rank) {
    size_t n = 1;
    for (size_t i = 0; i < rank; i++) n *= (size_t)shape[i];
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

static size_t read_tasks(const char *dir, Task *tasks) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tasks.txt", dir);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = 0;
    while (n < MAX_TASKS) {
        Task *t = &tasks[n];
        if (fscanf(f, "%127s %zu", t->name, &t->rank) != 2 || t->rank > MAX_RANK) break;
        for (size_t i = 0; i < t->rank; i++)
            if (fscanf(f, "%" SCNd64, &t->shape[i]) != 1) goto done;
        if (fscanf(f, "%zu", &t->out_rank) != 1 || t->out_rank > MAX_RANK) break;
        for (size_t i = 0; i < t->out_rank; i++)
            if (fscanf(f, "%" SCNd64, &t->out_shape[i]) != 1) goto done;
        n++;
    }
done:
    fclose(f);
    return n;
}

/* Runs one task with tp_engine_run_f32 and compares with the expected output. */
static void run_task(const TpEngine *engine, const char *dir, const Task *t) {
    size_t task = SIZE_MAX;
    CHECK_STATUS(tp_engine_task_index(engine, t->name, &task), TP_OK);
    const char *name = NULL;
    CHECK_STATUS(tp_engine_task_name(engine, task, &name), TP_OK);
    CHECK(name && strcmp(name, t->name) == 0, "task %zu is called %s, not %s", task,
          name ? name : "(null)", t->name);

    size_t in_count = 0, want_count = 0;
    float *input = read_f32(dir, t->name, ".input.f32", &in_count);
    float *want = read_f32(dir, t->name, ".expected.f32", &want_count);
    CHECK(input && want, "cannot read the data of %s", t->name);
    if (!input || !want) goto out;
    CHECK(in_count == product(t->shape, t->rank), "%s: input size", t->name);
    CHECK(want_count == product(t->out_shape, t->out_rank), "%s: expected size", t->name);

    /* The output's rank is known ahead; its batch dimension is symbolic (-1). */
    int64_t declared[MAX_RANK];
    size_t declared_rank = 0;
    CHECK_STATUS(tp_engine_output_shape(engine, task, 0, declared, MAX_RANK, &declared_rank), TP_OK);
    CHECK(declared_rank == t->out_rank, "%s: declared output rank %zu", t->name, declared_rank);

    /* Ask for the length first (no buffer), then run for real. */
    size_t len = 0, rank = 0;
    int64_t shape[MAX_RANK];
    CHECK_STATUS(tp_engine_run_f32(engine, task, input, t->shape, t->rank, NULL, 0, &len, shape,
                                   MAX_RANK, &rank),
                 TP_BUFFER_TOO_SMALL);
    CHECK(len == want_count, "%s: needed length %zu, expected %zu", t->name, len, want_count);
    float *got = malloc((len ? len : 1) * sizeof(float));
    CHECK_STATUS(tp_engine_run_f32(engine, task, input, t->shape, t->rank, got, len, &len, shape,
                                   MAX_RANK, &rank),
                 TP_OK);
    CHECK(rank == t->out_rank, "%s: rank %zu", t->name, rank);
    for (size_t i = 0; i < rank && i < t->out_rank; i++)
        CHECK(shape[i] == t->out_shape[i], "%s: dim %zu is %" PRId64, t->name, i, shape[i]);
    if (len == want_count) {
        size_t bad = first_mismatch(got, want, len);
        CHECK(bad == len, "%s: output[%zu] = %g, expected %g", t->name, bad,
              bad < len ? got[bad] : 0.0, bad < len ? want[bad] : 0.0);
        float max_diff = 0;
        for (size_t i = 0; i < len; i++)
            if (fabsf(got[i] - want[i]) > max_diff) max_diff = fabsf(got[i] - want[i]);
        printf("task %-10s (index %zu): %zu outputs, max |diff| %.3g\n", t->name, task, len,
               max_diff);
    }
    free(got);
out:
    free(input);
    free(want);
}

/* The general form on one task: typed tensors in, an owned TpOutputs out. */
static void run_general(const TpEngine *engine, const char *dir, const Task *t) {
    size_t task = SIZE_MAX, count = 0, in_count = 0, want_count = 0;
    CHECK_STATUS(tp_engine_task_index(engine, t->name, &task), TP_OK);
    CHECK_STATUS(tp_engine_input_count(engine, task, &count), TP_OK);
    CHECK(count == 1, "%s has %zu inputs", t->name, count);
    TpIoInfo info;
    CHECK_STATUS(tp_engine_input_info(engine, task, 0, &info), TP_OK);
    CHECK(info.dtype == TP_DTYPE_F32 && info.rank == t->rank && info.shape[0] == -1,
          "%s: input %s is not F32 [N,...]", t->name, info.name);

    float *input = read_f32(dir, t->name, ".input.f32", &in_count);
    float *want = read_f32(dir, t->name, ".expected.f32", &want_count);
    if (!input || !want) {
        CHECK(0, "cannot read the data of %s", t->name);
        goto out;
    }
    TpTensor in = {TP_DTYPE_F32, input, t->shape, t->rank};
    TpOutputs *outputs = NULL;
    CHECK_STATUS(tp_engine_run(engine, task, &in, 1, &outputs), TP_OK);
    CHECK_STATUS(tp_outputs_count(outputs, &count), TP_OK);
    CHECK(count == 1, "%s: %zu outputs", t->name, count);
    TpTensor out;
    CHECK_STATUS(tp_outputs_get(outputs, 0, &out), TP_OK);
    if (out.data && out.dtype == TP_DTYPE_F32 && product(out.shape, out.rank) == want_count) {
        size_t bad = first_mismatch(out.data, want, want_count);
        CHECK(bad == want_count, "%s (general form): output[%zu] differs", t->name, bad);
    } else {
        CHECK(0, "%s (general form): wrong output", t->name);
    }
    CHECK_STATUS(tp_outputs_get(outputs, 1, &out), TP_INVALID_ARGUMENT);
    CHECK(out.data == NULL, "a failed get zeroes the tensor");
    CHECK_STATUS(tp_outputs_free(&outputs), TP_OK);
    CHECK(outputs == NULL, "tp_outputs_free nulls the handle");
    CHECK_STATUS(tp_outputs_free(&outputs), TP_OK);
out:
    free(input);
    free(want);
}

/* What a careless caller may do: each is an error status, never a crash. */
static void misuse(const TpEngine *engine, size_t task_count) {
    float x[2 * 784] = {0};
    float y[64];
    int64_t good[4] = {2, 1, 28, 28}, bad[4] = {2, 1, 28, 27}, shape[4];
    size_t len = 0, rank = 0, index = 0;
    const char *name = "x";

    CHECK_STATUS(tp_engine_run_f32(engine, task_count, x, good, 4, y, 64, &len, shape, 4, &rank),
                 TP_UNKNOWN_TASK);
    CHECK_STATUS(tp_engine_run_f32(engine, (size_t)-1, x, good, 4, y, 64, &len, shape, 4, &rank),
                 TP_UNKNOWN_TASK);
    CHECK_STATUS(tp_engine_task_name(engine, task_count, &name), TP_UNKNOWN_TASK);
    CHECK(name == NULL, "a failed tp_engine_task_name nulls the name");
    CHECK_STATUS(tp_engine_task_index(engine, "no-such-task", &index), TP_UNKNOWN_TASK);
    CHECK(strstr(tp_last_error(), "no-such-task") != NULL, "the message names the task");
    CHECK_STATUS(tp_engine_run_f32(engine, 0, x, bad, 4, y, 64, &len, shape, 4, &rank),
                 TP_BAD_INPUT);
    CHECK(strlen(tp_last_error()) > 0, "a message comes with TP_BAD_INPUT");
    CHECK_STATUS(tp_engine_run_f32(engine, 0, x, good, 3, y, 64, &len, shape, 4, &rank),
                 TP_BAD_INPUT);
    CHECK_STATUS(tp_engine_run_f32(NULL, 0, x, good, 4, y, 64, &len, shape, 4, &rank),
                 TP_NULL_ARGUMENT);
    CHECK_STATUS(tp_engine_run_f32(engine, 0, NULL, good, 4, y, 64, &len, shape, 4, &rank),
                 TP_NULL_ARGUMENT);
    CHECK_STATUS(tp_engine_run_f32(engine, 0, x, good, 4, y, 64, NULL, shape, 4, &rank),
                 TP_NULL_ARGUMENT);
    CHECK_STATUS(tp_engine_run_f32(engine, 0, x, good, 4, y, 1, &len, shape, 4, &rank),
                 TP_BUFFER_TOO_SMALL);
    CHECK(len > 1 && rank == 2, "TP_BUFFER_TOO_SMALL reports the needed length (%zu)", len);
    CHECK_STATUS(tp_engine_task_count(engine, NULL), TP_NULL_ARGUMENT);
    CHECK_STATUS(tp_bundle_open(NULL, NULL), TP_NULL_ARGUMENT);
    TpBundle *bundle = NULL;
    CHECK_STATUS(tp_bundle_open("/nonexistent/dir/x.tpk", &bundle), TP_IO);
    CHECK(bundle == NULL, "a failed open leaves NULL");

    /* A panic inside the library is a status, not an abort; the engine still works after. */
    CHECK_STATUS(tp_debug_panic(), TP_PANIC);
    CHECK(strstr(tp_last_error(), "panic") != NULL, "the panic is described: %s", tp_last_error());
    CHECK_STATUS(tp_engine_run_f32(engine, 0, x, good, 4, y, 64, &len, shape, 4, &rank), TP_OK);
    CHECK(strcmp(tp_last_error(), "") == 0, "a successful call clears the last error");
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s BUNDLE.tpk DATA_DIR\n", argv[0]);
        return 2;
    }
    printf("taskpack %s\n", tp_version());
    Task tasks[MAX_TASKS];
    size_t n = read_tasks(argv[2], tasks);
    CHECK(n > 0, "no task in %s/tasks.txt", argv[2]);

    TpBundle *bundle = NULL;
    TpEngine *engine = NULL;
    CHECK_STATUS(tp_bundle_open(argv[1], &bundle), TP_OK);
    CHECK_STATUS(tp_bundle_verify(bundle), TP_OK);
    CHECK_STATUS(tp_engine_new(bundle, 0, &engine), TP_OK);
    /* The engine holds its own reference: free the bundle now, twice. */
    CHECK_STATUS(tp_bundle_free(&bundle), TP_OK);
    CHECK(bundle == NULL, "tp_bundle_free nulls the handle");
    CHECK_STATUS(tp_bundle_free(&bundle), TP_OK);
    if (!engine) {
        fprintf(stderr, "no engine: %s\n", tp_last_error());
        return 1;
    }

    size_t count = 0;
    CHECK_STATUS(tp_engine_task_count(engine, &count), TP_OK);
    CHECK(count == n, "the bundle has %zu tasks, tasks.txt %zu", count, n);
    for (size_t i = 0; i < n; i++) run_task(engine, argv[2], &tasks[i]);
    if (n > 0) run_general(engine, argv[2], &tasks[0]);
    misuse(engine, count);

    CHECK_STATUS(tp_engine_free(&engine), TP_OK);
    CHECK(engine == NULL, "tp_engine_free nulls the handle");
    CHECK_STATUS(tp_engine_free(&engine), TP_OK);
    CHECK_STATUS(tp_engine_free(NULL), TP_NULL_ARGUMENT);

    printf("demo.c: %d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
