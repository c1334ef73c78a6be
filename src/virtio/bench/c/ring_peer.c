/*
 * A native reference for `virtio bench ring`: the same device-side work as
 * pyvirtio's ring benchmark (pop available chains with bounds and loop
 * checks, push used entries), written in plain C over the same ring layout.
 * Only the device side is timed; the driver re-publishes the same buffers.
 *
 * usage: ring_peer SECONDS   -> prints one JSON object
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define QSIZE 256
#define MEM_SIZE (16u << 20)
#define F_NEXT 1
#define F_WRITE 2
#define P_AVAIL (1u << 7)
#define P_USED (1u << 15)

struct desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; } __attribute__((packed));
struct pdesc { uint64_t addr; uint32_t len; uint16_t id; uint16_t flags; } __attribute__((packed));
struct iov { uint8_t *base; uint32_t len; };
struct chain { uint16_t head; uint16_t slots; int nr, nw; struct iov v[8]; };

static uint8_t *mem;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int map(uint64_t addr, uint32_t len, struct iov *out) {
    if (addr > MEM_SIZE || len > MEM_SIZE - addr) return -1;
    out->base = mem + addr;
    out->len = len;
    return 0;
}

static double split_bench(int ndesc, double seconds) {
    struct desc *table = (struct desc *)(mem + 0x1000);
    uint16_t *avail = (uint16_t *)(mem + 0x2000);
    uint32_t *used = (uint32_t *)(mem + 0x3000);
    uint16_t last_avail = 0, used_idx = 0, avail_idx = 0;
    int nbufs = QSIZE / ndesc;
    memset(mem, 0, 0x4000 + 8 * QSIZE);
    for (int b = 0; b < nbufs; b++) {
        for (int d = 0; d < ndesc; d++) {
            int i = b * ndesc + d;
            table[i].addr = 0x100000 + 512u * i;
            table[i].len = 512;
            table[i].flags = (d ? F_WRITE : 0) | (d < ndesc - 1 ? F_NEXT : 0);
            table[i].next = i + 1;
        }
    }
    double spent = 0, deadline = now() + seconds;
    uint64_t done = 0;
    struct chain chains[QSIZE];
    while (now() < deadline) {
        /* driver: make every buffer available again */
        for (int b = 0; b < nbufs; b++) avail[2 + (avail_idx++ % QSIZE)] = b * ndesc;
        avail[1] = avail_idx;
        double t0 = now();
        uint16_t n = (uint16_t)(avail[1] - last_avail);
        if (n > QSIZE) abort();
        for (int c = 0; c < n; c++) {
            uint16_t head = avail[2 + (last_avail++ % QSIZE)];
            struct chain *ch = &chains[c];
            ch->head = head; ch->nr = ch->nw = 0;
            uint16_t i = head; int seen = 0;
            for (;;) {
                if (i >= QSIZE || ++seen > QSIZE) abort();
                struct desc *d = &table[i];
                struct iov v;
                if (map(d->addr, d->len, &v)) abort();
                if (d->flags & F_WRITE) ch->v[ch->nr + ch->nw++] = v;
                else { if (ch->nw) abort(); ch->v[ch->nr++] = v; }
                if (!(d->flags & F_NEXT)) break;
                i = d->next;
            }
        }
        for (int c = 0; c < n; c++) {
            uint32_t *e = used + 1 + 2 * (used_idx++ % QSIZE);
            e[0] = chains[c].head; e[1] = 0;
        }
        ((uint16_t *)used)[1] = used_idx;
        spent += now() - t0;
        done += n;
    }
    return done / spent;
}

static double packed_bench(int ndesc, double seconds) {
    struct pdesc *ring = (struct pdesc *)(mem + 0x1000);
    int nbufs = QSIZE / ndesc;
    uint16_t next_avail = 0, next_used = 0, drv_pos = 0;
    int avail_wrap = 1, used_wrap = 1, drv_wrap = 1;
    memset(mem, 0, 0x1000 + 16 * QSIZE);
    double spent = 0, deadline = now() + seconds;
    uint64_t done = 0;
    struct chain chains[QSIZE];
    while (now() < deadline) {
        /* driver: write every buffer again in the next lap */
        for (int b = 0; b < nbufs; b++) {
            for (int d = 0; d < ndesc; d++) {
                struct pdesc *p = &ring[drv_pos];
                p->addr = 0x100000 + 512u * (b * ndesc + d);
                p->len = 512; p->id = b;
                p->flags = (d ? F_WRITE : 0) | (d < ndesc - 1 ? F_NEXT : 0) |
                           (drv_wrap ? P_AVAIL : P_USED);
                if (++drv_pos == QSIZE) { drv_pos = 0; drv_wrap ^= 1; }
            }
        }
        double t0 = now();
        int n = 0;
        for (;;) {
            struct pdesc *p = &ring[next_avail];
            uint16_t want = avail_wrap ? P_AVAIL : P_USED;
            if ((p->flags & (P_AVAIL | P_USED)) != want) break;
            struct chain *ch = &chains[n++];
            ch->nr = ch->nw = 0; ch->slots = 0;
            for (;;) {
                p = &ring[next_avail];
                struct iov v;
                if (++ch->slots > QSIZE) abort();
                if (map(p->addr, p->len, &v)) abort();
                if (p->flags & F_WRITE) ch->v[ch->nr + ch->nw++] = v;
                else { if (ch->nw) abort(); ch->v[ch->nr++] = v; }
                ch->head = p->id;
                uint16_t f = p->flags;
                if (++next_avail == QSIZE) { next_avail = 0; avail_wrap ^= 1; }
                if (!(f & F_NEXT)) break;
            }
        }
        for (int c = 0; c < n; c++) {
            struct pdesc *p = &ring[next_used];
            p->id = chains[c].head; p->len = 0;
            p->flags = used_wrap ? (P_AVAIL | P_USED) : 0;
            next_used += chains[c].slots;
            if (next_used >= QSIZE) { next_used -= QSIZE; used_wrap ^= 1; }
        }
        spent += now() - t0;
        done += n;
    }
    return done / spent;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    mem = calloc(1, MEM_SIZE);
    if (!mem) return 1;
    printf("{\"split_1desc_chains_per_s\": %.0f, \"split_3desc_chains_per_s\": %.0f, "
           "\"packed_1desc_chains_per_s\": %.0f, \"packed_3desc_chains_per_s\": %.0f}\n",
           split_bench(1, seconds), split_bench(3, seconds),
           packed_bench(1, seconds), packed_bench(3, seconds));
    return 0;
}
