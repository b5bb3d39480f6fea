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
 */
#ifndef KVSTORE_CRC32C_H
#define KVSTORE_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the kvstore WAL record format is little-endian; port the encoders first"
#endif

static uint32_t kv_crc32c_table[8][256];
static int kv_crc32c_use_hw = 0;

static void kv_crc32c_init(void)
{
    uint32_t n, c;
    int k;
    for (n = 0; n < 256; n++) {
        c = n;
        for (k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        kv_crc32c_table[0][n] = c;
    }
    for (n = 0; n < 256; n++) {
        c = kv_crc32c_table[0][n];
        for (k = 1; k < 8; k++) {
            c = kv_crc32c_table[0][c & 0xff] ^ (c >> 8);
            kv_crc32c_table[k][n] = c;
        }
    }
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
__attribute__((target("sse4.2")))
static uint32_t kv_crc32c_hw(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c = (uint32_t)~crc, w;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        n--;
    }
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
