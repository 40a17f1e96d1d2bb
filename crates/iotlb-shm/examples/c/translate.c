/*
 * translate.c — a reader written in C: opens the shared translation table
 * through the iotlb-shm C ABI, translates IOVAs, checks the results.
 *
 * Build (tests/capi.rs does this with the staticlib cargo produced):
 *   gcc -std=c11 -Wall -Wextra -Werror -I crates/iotlb-shm/include \
 *       crates/iotlb-shm/examples/c/translate.c \
 *       target/debug/deps/libiotlb_shm.a \
 *       -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o translate
 *
 * Usage:
 *   translate TABLE_FD ARENA_FD SLOTS_FD [CHECK...]
 * The three descriptors are inherited from the daemon (here: the test).
 * Before touching the table the program waits for one line on stdin, so
 * that its parent can register it as a reader first. Each CHECK is one of
 *   t:EP:IOVA:ACCESS:GPA+LEN     iotlb_translate must give GPA and LEN
 *   t:EP:IOVA:ACCESS:fault=KIND  it must fault (domain|mapping|permission)
 *   r:EP:IOVA+LEN:ACCESS:GPA+LEN,GPA+LEN...
 *                                iotlb_translate_range must give these pieces
 *   b:EP:ACCESS:IOVA,IOVA...     iotlb_translate_burst must give, for each
 *                                IOVA, what iotlb_translate gives
 *   p:EP:IOVA+LEN:ACCESS         pin the range, exit the session, print
 *                                "pinned", wait for a line on stdin, unpin,
 *                                print "unpinned"
 * for endpoint EP.
 * ACCESS is r, w or rw; numbers are hex or decimal (strtoull base 0).
 * Prints one line per check ("ok" or "MISMATCH") and exits 0 if all
 * matched, 1 otherwise, 2 on usage or setup errors.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iotlb_shm.h"

_Static_assert(sizeof(struct iotlb_piece) == 24, "struct iotlb_piece is 24 bytes");

static int failures;

static uint64_t num(const char *s, char **end) {
    errno = 0;
    uint64_t v = strtoull(s, end, 0);
    if (errno != 0 || *end == s) {
        fprintf(stderr, "bad number at '%s'\n", s);
        exit(2);
    }
    return v;
}

static uint8_t parse_access(const char *s, size_t n) {
    if (n == 1 && s[0] == 'r') return IOTLB_ACCESS_READ;
    if (n == 1 && s[0] == 'w') return IOTLB_ACCESS_WRITE;
    if (n == 2 && strncmp(s, "rw", 2) == 0) return IOTLB_ACCESS_READ_WRITE;
    fprintf(stderr, "bad access '%.*s'\n", (int)n, s);
    exit(2);
}

static int parse_fault(const char *s) {
    if (strcmp(s, "domain") == 0) return IOTLB_FAULT_DOMAIN;
    if (strcmp(s, "mapping") == 0) return IOTLB_FAULT_MAPPING;
    if (strcmp(s, "permission") == 0) return IOTLB_FAULT_PERMISSION;
    fprintf(stderr, "bad fault kind '%s'\n", s);
    exit(2);
}

static void expect(int cond, const char *what) {
    if (!cond) {
        printf("abi %s MISMATCH\n", what);
        failures++;
    } else {
        printf("abi %s ok\n", what);
    }
}

static void wait_line(void) {
    char line[64];
    if (!fgets(line, sizeof line, stdin)) {
        fprintf(stderr, "stdin closed\n");
        exit(2);
    }
}

/* Splits "A:B:C" in place: returns the field and advances *s past ':'. */
static char *field(char **s) {
    char *f = *s;
    char *colon = strchr(f, ':');
    if (colon) {
        *colon = '\0';
        *s = colon + 1;
    } else {
        *s = f + strlen(f);
    }
    return f;
}

static void check_translate(const struct iotlb_session *s, char *spec) {
    char *end;
    uint32_t ep = (uint32_t)num(field(&spec), &end);
    uint64_t iova = num(field(&spec), &end);
    char *acc = field(&spec);
    uint8_t access = parse_access(acc, strlen(acc));
    struct iotlb_piece p = {0};
    int rc = iotlb_translate(s, ep, iova, access, &p);
    int ok;
    if (strncmp(spec, "fault=", 6) == 0) {
        ok = rc == parse_fault(spec + 6);
    } else {
        uint64_t gpa = num(spec, &end);
        uint64_t len = num(end + 1, &end);
        ok = rc == 0 && p.gpa == gpa && p.len == len && p.reserved == 0;
    }
    printf("translate ep=%" PRIu32 " iova=0x%" PRIx64 " access=%s rc=%d gpa=0x%" PRIx64 " len=0x%" PRIx64 " flags=%" PRIu32 " %s\n",
           ep, iova, acc, rc, rc == 0 ? p.gpa : 0, rc == 0 ? p.len : 0, rc == 0 ? p.flags : 0, ok ? "ok" : "MISMATCH");
    failures += !ok;
}

static void check_range(const struct iotlb_session *s, char *spec) {
    char *end;
    uint32_t ep = (uint32_t)num(field(&spec), &end);
    char *range = field(&spec);
    uint64_t iova = num(range, &end);
    uint64_t len = num(end + 1, &end);
    char *acc = field(&spec);
    uint8_t access = parse_access(acc, strlen(acc));
    struct iotlb_piece want[16], got[16];
    size_t nwant = 0, ngot = 0;
    for (char *p = spec; *p && nwant < 16;) {
        want[nwant].gpa = num(p, &end);
        want[nwant].len = num(end + 1, &end);
        nwant++;
        p = *end == ',' ? end + 1 : end;
    }
    int rc = iotlb_translate_range(s, ep, iova, len, access, got, 16, &ngot);
    int ok = rc == 0 && ngot == nwant;
    printf("range iova=0x%" PRIx64 " len=0x%" PRIx64 " rc=%d pieces=%zu", iova, len, rc, ngot);
    for (size_t i = 0; i < ngot; i++) {
        printf(" 0x%" PRIx64 "+0x%" PRIx64, got[i].gpa, got[i].len);
        if (i < nwant && (got[i].gpa != want[i].gpa || got[i].len != want[i].len)) ok = 0;
    }
    printf(" %s\n", ok ? "ok" : "MISMATCH");
    failures += !ok;
}

static void check_burst(const struct iotlb_session *s, char *spec) {
    char *end;
    uint32_t ep = (uint32_t)num(field(&spec), &end);
    char *acc = field(&spec);
    uint8_t access = parse_access(acc, strlen(acc));
    uint64_t iovas[64];
    size_t n = 0;
    for (char *p = spec; *p && n < 64;) {
        iovas[n++] = num(p, &end);
        p = *end == ',' ? end + 1 : end;
    }
    struct iotlb_piece got[64] = {{0}};
    int rcs[64];
    int faults = iotlb_translate_burst(s, ep, iovas, n, access, got, rcs);
    int ok = faults >= 0, want_faults = 0;
    for (size_t i = 0; i < n && ok; i++) {
        struct iotlb_piece p = {0};
        int rc = iotlb_translate(s, ep, iovas[i], access, &p);
        want_faults += rc != 0;
        if (rc != rcs[i] || (rc == 0 && (p.gpa != got[i].gpa || p.len != got[i].len || p.flags != got[i].flags)))
            ok = 0;
    }
    ok = ok && faults == want_faults;
    printf("burst ep=%" PRIu32 " n=%zu faults=%d %s\n", ep, n, faults, ok ? "ok" : "MISMATCH");
    failures += !ok;
}

static void check_pin(struct iotlb_slot *slot, const struct iotlb_table *table, char *spec) {
    char *end;
    uint32_t ep = (uint32_t)num(field(&spec), &end);
    char *range = field(&spec);
    uint64_t iova = num(range, &end);
    uint64_t len = num(end + 1, &end);
    uint8_t access = parse_access(spec, strlen(spec));
    struct iotlb_session *s;
    struct iotlb_pin *pin = NULL;
    if (iotlb_session_enter(slot, table, &s) != 0) exit(2);
    int rc = iotlb_pin(s, ep, iova, len, access, &pin);
    iotlb_session_exit(s); /* the pin outlives the session */
    printf("pinned iova=0x%" PRIx64 " len=0x%" PRIx64 " rc=%d %s\n", iova, len, rc, rc == 0 ? "ok" : "MISMATCH");
    fflush(stdout);
    if (rc != 0) {
        failures++;
        return;
    }
    wait_line();
    iotlb_unpin(pin);
    printf("unpinned\n");
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s TABLE_FD ARENA_FD SLOTS_FD [CHECK...]\n", argv[0]);
        return 2;
    }
    char *end;
    int table_fd = (int)num(argv[1], &end);
    int arena_fd = (int)num(argv[2], &end);
    int slots_fd = (int)num(argv[3], &end);

    wait_line(); /* registered by the daemon */

    struct iotlb_table *table = NULL;
    struct iotlb_slots *slots = NULL;
    struct iotlb_slot *slot = NULL;
    struct iotlb_session *s = NULL;
    int rc = iotlb_table_open(table_fd, arena_fd, &table);
    if (rc != 0) {
        fprintf(stderr, "iotlb_table_open: %s\n", strerror(-rc));
        return 2;
    }
    rc = iotlb_slots_open(slots_fd, &slots);
    if (rc != 0) {
        fprintf(stderr, "iotlb_slots_open: %s\n", strerror(-rc));
        return 2;
    }
    rc = iotlb_slot_claim(slots, &slot);
    if (rc != 0) {
        fprintf(stderr, "iotlb_slot_claim: %s\n", strerror(-rc));
        return 2;
    }
    printf("opened epoch=%" PRIu64 "\n", iotlb_table_epoch(table));

    /* Misuse is reported, never crashes. */
    struct iotlb_table *bad = NULL;
    struct iotlb_piece piece;
    expect(iotlb_table_open(-1, arena_fd, &bad) == -EBADF && bad == NULL, "negative-fd");
    expect(iotlb_table_open(slots_fd, arena_fd, &bad) < 0 && bad == NULL, "wrong-file");
    expect(iotlb_table_open(table_fd, arena_fd, NULL) == -EINVAL, "null-out");
    expect(iotlb_translate(NULL, 0, 0, IOTLB_ACCESS_READ, &piece) == -EINVAL, "null-session");

    rc = iotlb_session_enter(slot, table, &s);
    if (rc != 0) {
        fprintf(stderr, "iotlb_session_enter: %s\n", strerror(-rc));
        return 2;
    }
    struct iotlb_session *s2 = NULL;
    expect(iotlb_session_enter(slot, table, &s2) == -EBUSY && s2 == NULL, "nested-enter");
    expect(iotlb_translate(s, 0, 0, 0, &piece) == -EINVAL, "bad-access");
    expect(iotlb_translate(s, 0, 0, IOTLB_ACCESS_READ, NULL) == -EINVAL, "null-piece");
    {
        uint64_t iova = 0x1000;
        int rcs[1] = {-1};
        expect(iotlb_translate_burst(s, 8, &iova, 1, IOTLB_ACCESS_READ, NULL, rcs) == -EINVAL && rcs[0] == -1
                   && iotlb_translate_burst(s, 8, &iova, 1, 0, &piece, rcs) == -EINVAL
                   && iotlb_translate_burst(s, 8, NULL, 0, IOTLB_ACCESS_READ, NULL, NULL) == 0,
               "burst-misuse");
    }

    for (int i = 4; i < argc; i++) {
        char *spec = argv[i];
        if (strncmp(spec, "t:", 2) == 0) {
            check_translate(s, spec + 2);
        } else if (strncmp(spec, "r:", 2) == 0) {
            check_range(s, spec + 2);
        } else if (strncmp(spec, "b:", 2) == 0) {
            check_burst(s, spec + 2);
        } else if (strncmp(spec, "p:", 2) == 0) {
            iotlb_session_exit(s);
            check_pin(slot, table, spec + 2);
            if (iotlb_session_enter(slot, table, &s) != 0) return 2;
        } else {
            fprintf(stderr, "bad check '%s'\n", spec);
            return 2;
        }
    }
    iotlb_session_exit(s);
    expect(iotlb_translate(s, 0, 0, IOTLB_ACCESS_READ, &piece) == -EINVAL, "exited-session");
    {
        uint64_t iova = 0x1000;
        int rc0 = 0;
        expect(iotlb_translate_burst(s, 8, &iova, 1, IOTLB_ACCESS_READ, &piece, &rc0) == -EINVAL, "exited-session-burst");
    }

    /* The slot keeps the table alive: closing the handle first is fine. */
    iotlb_table_close(table);
    iotlb_slots_close(slots);
    iotlb_slot_release(slot);
    printf("done failures=%d\n", failures);
    return failures == 0 ? 0 : 1;
}
