/*
 * Text in, label out through the taskpack C ABI, as a native app does it: open a bundle that
 * carries a tokenizer, classify each line of a file with one task, print the class, its label
 * and its probability. Built and run by the Rust test `text::c_program_classifies_text`
 * (ffi/tests/text.rs):
 *
 *   text BUNDLE.tpk TASK TEXTS.txt
 *
 * Prints one line per text: CLASS<TAB>LABEL<TAB>PROBABILITY. Exit status 0 if every call
 * behaved as documented.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "taskpack.h"

static int failures = 0;

#define CHECK_STATUS(call, want)                                                          \
    do {                                                                                  \
        TpStatus got_ = (call);                                                           \
        if (got_ != (want)) {                                                             \
            failures++;                                                                   \
            fprintf(stderr, "FAIL %s:%d: %s returned %s, expected %s [%s]\n", __FILE__,   \
                    __LINE__, #call, tp_status_name(got_), tp_status_name(want),          \
                    tp_last_error());                                                     \
        }                                                                                 \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s BUNDLE.tpk TASK TEXTS.txt\n", argv[0]);
        return 2;
    }
    TpBundle *bundle = NULL;
    TpEngine *engine = NULL;
    size_t task = 0, labels = 0;
    if (tp_bundle_open(argv[1], &bundle) != TP_OK || tp_engine_new(bundle, 0, &engine) != TP_OK
        || tp_engine_task_index(engine, argv[2], &task) != TP_OK
        || tp_engine_task_label_count(engine, task, &labels) != TP_OK) {
        fprintf(stderr, "taskpack: %s\n", tp_last_error());
        return 1;
    }
    tp_bundle_free(&bundle);

    FILE *texts = fopen(argv[3], "r");
    if (!texts) {
        fprintf(stderr, "cannot open %s\n", argv[3]);
        return 1;
    }
    char line[4096];
    while (fgets(line, sizeof line, texts)) {
        line[strcspn(line, "\n")] = '\0';
        size_t class = 0;
        float probability = 0;
        const char *label = NULL;
        CHECK_STATUS(tp_engine_classify_text(engine, task, line, &class, &probability), TP_OK);
        if (labels > 0) {
            CHECK_STATUS(tp_engine_task_label(engine, task, class, &label), TP_OK);
        }
        printf("%zu\t%s\t%.9g\n", class, label ? label : "", (double)probability);
    }
    fclose(texts);

    /* Misuse: a NULL text, a class past the labels, a task out of range. */
    size_t class = 0;
    float probability = 1;
    const char *label = "x";
    CHECK_STATUS(tp_engine_classify_text(engine, task, NULL, &class, &probability),
                 TP_NULL_ARGUMENT);
    if (class != SIZE_MAX || probability != 0) {
        failures++;
        fprintf(stderr, "FAIL: a failed classify left class %zu, probability %g\n", class,
                (double)probability);
    }
    CHECK_STATUS(tp_engine_task_label(engine, task, labels, &label), TP_INVALID_ARGUMENT);
    if (label != NULL) {
        failures++;
        fprintf(stderr, "FAIL: a failed tp_engine_task_label left a label\n");
    }
    CHECK_STATUS(tp_engine_classify_text(engine, 1000, "text", &class, &probability),
                 TP_UNKNOWN_TASK);

    tp_engine_free(&engine);
    fprintf(stderr, "%d failures\n", failures);
    return failures == 0 ? 0 : 1;
}
