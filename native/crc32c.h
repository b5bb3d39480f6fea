/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78) for the WAL.
 *
 * Two implementations with one result: the SSE4.2 `crc32` instruction when
 * the CPU has it (picked at run time, so the module still loads on CPUs
 * without it), and a portable slice-by-8 table otherwise. CRC32C rather than
 * zlib's CRC32 because it has hardware support on x86-64 and arm64 and better
 * error detection for the record sizes we write.
 *
 * kv_crc32c(0, buf, n) is the standard CRC32C: kv_crc32c(0, "123456789", 9)
 * == 0xE3069283.
 *
 * The hardware path runs three independent `crc32` streams over three
 * adjacent blocks and joins them (the instruction has a latency of 3 cycles
 * and a throughput of 1, so one stream uses a third of it): ~3x faster on
 * large buffers, which is what WAL recovery spends its time on. Joining
 * uses the CRC's linearity: the register after A||B is the register after A
 * multiplied by x^(8|B|) mod P, xor the register after B started from 0.
 */
#ifndef KVSTORE_CRC32C_H
#define KVSTORE_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the kvstore WAL record format is little-endian; port the encoders first"
#endif

#define KV_CRC32C_POLY 0x82F63B78u

static uint32_t kv_crc32c_table[8][256];
static int kv_crc32c_use_hw = 0;
static uint32_t kv_crc32c_shift_long, kv_crc32c_shift_short; /* x^(8 * LONG), x^(8 * SHORT) mod P */
#define KV_CRC32C_LONG 8192
#define KV_CRC32C_SHORT 256

/* a * b modulo P, in the reflected representation (x^0 is the top bit), as in zlib's multmodp. */
static uint32_t kv_crc32c_multmodp(uint32_t a, uint32_t b)
{
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0)
                break;
        }
        m >>= 1;
        b = b & 1 ? (b >> 1) ^ KV_CRC32C_POLY : b >> 1;
    }
    return p;
}

/* x^(8 * n) modulo P: the operator that moves a register past n zero bytes. */
static uint32_t kv_crc32c_x8n(size_t n)
{
    uint32_t p = 1u << 31, sq = 1u << 30; /* p = x^0, sq = x^1 */
    size_t bits = n * 8;
    while (bits) {
        if (bits & 1)
            p = kv_crc32c_multmodp(sq, p);
        sq = kv_crc32c_multmodp(sq, sq);
        bits >>= 1;
    }
    return p;
}

static void kv_crc32c_init(void)
{
    uint32_t n, c;
    int k;
    for (n = 0; n < 256; n++) {
        c = n;
        for (k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ KV_CRC32C_POLY : c >> 1;
        kv_crc32c_table[0][n] = c;
    }
    for (n = 0; n < 256; n++) {
        c = kv_crc32c_table[0][n];
        for (k = 1; k < 8; k++) {
            c = kv_crc32c_table[0][c & 0xff] ^ (c >> 8);
            kv_crc32c_table[k][n] = c;
        }
    }
    kv_crc32c_shift_long = kv_crc32c_x8n(KV_CRC32C_LONG);
    kv_crc32c_shift_short = kv_crc32c_x8n(KV_CRC32C_SHORT);
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    kv_crc32c_use_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#endif
}

static uint32_t kv_crc32c_sw(uint32_t crc, const unsigned char *p, size_t n)
{
    const uint32_t (*t)[256] = kv_crc32c_table;
    uint64_t w;
    crc = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        n--;
    }
    while (n >= 8) {
        memcpy(&w, p, 8);
        w ^= crc;
        crc = t[7][w & 0xff] ^ t[6][(w >> 8) & 0xff] ^ t[5][(w >> 16) & 0xff] ^
              t[4][(w >> 24) & 0xff] ^ t[3][(w >> 32) & 0xff] ^ t[2][(w >> 40) & 0xff] ^
              t[1][(w >> 48) & 0xff] ^ t[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* Raw register c over *n bytes at *p in runs of 3 blocks of `block` bytes (three streams); advances p, n. */
__attribute__((target("sse4.2")))
static uint64_t kv_crc32c_hw3(uint64_t c, const unsigned char **pp, size_t *np, size_t block, uint32_t shift)
{
    const unsigned char *p = *pp, *end;
    size_t n = *np;
    uint64_t c1, c2, w0, w1, w2;
    while (n >= 3 * block) {
        c1 = c2 = 0;
        end = p + block;
        do {
            memcpy(&w0, p, 8);
            memcpy(&w1, p + block, 8);
            memcpy(&w2, p + 2 * block, 8);
            c = __builtin_ia32_crc32di(c, w0);
            c1 = __builtin_ia32_crc32di(c1, w1);
            c2 = __builtin_ia32_crc32di(c2, w2);
            p += 8;
        } while (p < end);
        c = kv_crc32c_multmodp(shift, (uint32_t)c) ^ (uint32_t)c1;
        c = kv_crc32c_multmodp(shift, (uint32_t)c) ^ (uint32_t)c2;
        p += 2 * block;
        n -= 3 * block;
    }
    *pp = p;
    *np = n;
    return c;
}

__attribute__((target("sse4.2")))
static uint32_t kv_crc32c_hw(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c = (uint32_t)~crc, w;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        n--;
    }
    c = kv_crc32c_hw3(c, &p, &n, KV_CRC32C_LONG, kv_crc32c_shift_long);
    c = kv_crc32c_hw3(c, &p, &n, KV_CRC32C_SHORT, kv_crc32c_shift_short);
    while (n >= 8) {
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#define KV_CRC32C_HAVE_HW 1
#else
#define KV_CRC32C_HAVE_HW 0
static uint32_t kv_crc32c_hw(uint32_t crc, const unsigned char *p, size_t n)
{
    return kv_crc32c_sw(crc, p, n);
}
#endif

static inline uint32_t kv_crc32c(uint32_t crc, const void *buf, size_t n)
{
    if (kv_crc32c_use_hw)
        return kv_crc32c_hw(crc, (const unsigned char *)buf, n);
    return kv_crc32c_sw(crc, (const unsigned char *)buf, n);
}

#endif /* KVSTORE_CRC32C_H */
