/*
 * iotlb_shm.h — C ABI of the vhost-user-iommu shared translation table
 * (crate iotlb-shm, feature "capi"; link libiotlb_shm.a with
 * -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc, or libiotlb_shm.so).
 *
 * Hand-written; tests/capi.rs checks that every function and constant here
 * matches src/capi.rs (names, parameter and return types) and vice versa.
 *
 * Return values: 0 on success; a positive IOTLB_FAULT_* code when a
 * translation faults; a negative errno value on misuse or system failure
 * (-EINVAL null pointer / bad argument / session already exited, -EBADF
 * negative fd, -EPROTO not a v1 file, -EACCES file not sealed as required,
 * -ENOSPC no free slot or pin record, -EBUSY session already open,
 * -EIO internal error). No function unwinds or aborts on bad input.
 *
 * Usage, per thread:
 *   iotlb_table_open(table_fd, arena_fd, &table);   // once per process
 *   iotlb_slots_open(slots_fd, &slots);             // once per process
 *   iotlb_slot_claim(slots, &slot);                 // once per thread
 *   for each burst of requests:
 *     iotlb_session_enter(slot, table, &s);         // no allocation
 *     iotlb_translate(s, endpoint, iova, IOTLB_ACCESS_READ, &piece);
 *     iotlb_translate_burst(s, endpoint, iovas, n, access, pieces, rcs);
 *     iotlb_pin(s, endpoint, iova, len, access, &pin);  // I/O outliving s
 *     iotlb_session_exit(s);                        // keep sessions short
 *   ... I/O completes: iotlb_unpin(pin);
 *
 * Translations from a session are valid until iotlb_session_exit (the
 * daemon completes no UNMAP affecting them before); pinned ranges until
 * iotlb_unpin. Once the daemon is gone, sessions fault IOTLB_FAULT_DETACHED,
 * unless the daemon keeps a --state-dir (header word HANDOVER): the table
 * then goes on translating, frozen, until the process connects to the
 * restarted daemon, calls iotlb_slots_retire and hands the slot file over
 * (docs/shm-layout.md, "Restarts"); the restarted daemon completes no
 * UNMAP until it has, or has exited.
 * The mappings are MADV_DONTFORK: a forked child has no table (it connects
 * on its own). Open the slot file once: closing its last handle (slots and
 * pins included) tells the daemon this process is done with it. A slot and its session belong to one thread at a time;
 * table and slots handles may be shared by threads; pins may be released
 * from any thread. Handles keep what they need alive: closing the table
 * or slots handle while slots or pins are out is safe.
 */
#ifndef IOTLB_SHM_H
#define IOTLB_SHM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Fault codes returned by iotlb_translate, iotlb_translate_range, iotlb_pin. */
#define IOTLB_FAULT_DOMAIN 1     /* endpoint blocked or unknown */
#define IOTLB_FAULT_MAPPING 2    /* no mapping covers the address */
#define IOTLB_FAULT_PERMISSION 3 /* mapped without the needed permission */
#define IOTLB_FAULT_DETACHED 4   /* the daemon is gone: reconnect */

/* Access argument. */
#define IOTLB_ACCESS_READ 1       /* the device reads memory */
#define IOTLB_ACCESS_WRITE 2      /* the device writes memory */
#define IOTLB_ACCESS_READ_WRITE 3

/* struct iotlb_piece.flags bits. */
#define IOTLB_PIECE_MMIO 1 /* the target is MMIO, not RAM */

/* One guest-physical piece of a translation (24 bytes). */
struct iotlb_piece {
    uint64_t gpa;      /* guest-physical address of the first byte */
    uint64_t len;      /* bytes (iotlb_translate: left in the leaf, saturated) */
    uint32_t flags;    /* IOTLB_PIECE_* */
    uint32_t reserved; /* zero */
};

struct iotlb_table;   /* the table, opened read-only */
struct iotlb_slots;   /* this process's slot file */
struct iotlb_slot;    /* a session slot claimed by one thread */
struct iotlb_session; /* a session, inside its slot */
struct iotlb_pin;     /* a pinned range */

/* Opens the table from the daemon's table and arena memfds (still owned by
 * the caller, may be closed afterwards). */
int iotlb_table_open(int table_fd, int arena_fd, struct iotlb_table **out);
/* Closes a table handle (NULL ignored). */
void iotlb_table_close(struct iotlb_table *table);
/* The table's global epoch (diagnostics); 0 for NULL. */
uint64_t iotlb_table_epoch(const struct iotlb_table *table);

/* Opens this process's slot file (fd still owned by the caller). */
int iotlb_slots_open(int slots_fd, struct iotlb_slots **out);
/* Closes a slot-file handle (NULL ignored). */
void iotlb_slots_close(struct iotlb_slots *slots);
/* Retires the slot file before handing it to a restarted daemon: sessions
 * entered from now on fault IOTLB_FAULT_DETACHED (-EINVAL for NULL). */
int iotlb_slots_retire(const struct iotlb_slots *slots);

/* Claims a session slot for the calling thread (-ENOSPC if none is free). */
int iotlb_slot_claim(const struct iotlb_slots *slots, struct iotlb_slot **out);
/* Releases a slot, exiting its open session if any (NULL ignored). */
void iotlb_slot_release(struct iotlb_slot *slot);

/* Enters a session; *out points into the slot (valid until the slot is
 * released). -EBUSY if the slot already has a session open. */
int iotlb_session_enter(struct iotlb_slot *slot, const struct iotlb_table *table, struct iotlb_session **out);
/* Ends a session (NULL or already exited: ignored). */
void iotlb_session_exit(struct iotlb_session *session);

/* Translates the leaf holding iova: 0 and *out filled, or IOTLB_FAULT_*. */
int iotlb_translate(const struct iotlb_session *session, uint32_t endpoint, uint64_t iova, uint8_t access, struct iotlb_piece *out);
/* Translates n IOVAs of one endpoint at once (faster than n calls of
 * iotlb_translate when they are in different pages): for each i,
 * results[i] = 0 and pieces[i] as iotlb_translate gives it, or
 * results[i] = IOTLB_FAULT_* (pieces[i] untouched). Returns the number of
 * IOVAs that faulted (0: all translated; at most INT_MAX), or -EINVAL
 * (nothing written). */
int iotlb_translate_burst(const struct iotlb_session *session, uint32_t endpoint, const uint64_t *iovas, size_t n, uint8_t access, struct iotlb_piece *pieces, int *results);
/* Translates [iova, iova + len) into at most max_pieces merged pieces;
 * *n_pieces = pieces written. 0: whole range; IOTLB_FAULT_*: fault right
 * after the pieces written; -ENOSPC: more pieces needed. */
int iotlb_translate_range(const struct iotlb_session *session, uint32_t endpoint, uint64_t iova, uint64_t len, uint8_t access, struct iotlb_piece *pieces, size_t max_pieces, size_t *n_pieces);

/* Pins [iova, iova + len) (len 0: one byte) until iotlb_unpin; the range
 * must translate now. 0, IOTLB_FAULT_* (nothing pinned), or -ENOSPC. */
int iotlb_pin(const struct iotlb_session *session, uint32_t endpoint, uint64_t iova, uint64_t len, uint8_t access, struct iotlb_pin **out);
/* Releases a pin, from any thread (NULL ignored). */
void iotlb_unpin(struct iotlb_pin *pin);

#ifdef __cplusplus
}
#endif

#endif /* IOTLB_SHM_H */
