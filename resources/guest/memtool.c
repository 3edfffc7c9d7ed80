/* memtool: the guest's memory helper for end-to-end tests (built with gcc -static).
 *
 *   memtool hold MIB                  allocate MIB MiB, write every page, print DONE, sleep forever
 *   memtool pattern-write FILE MIB    fill FILE with a pattern that depends on each word's offset
 *   memtool pattern-verify FILE       check FILE against that pattern
 *
 * The pattern value of the 64-bit word at byte offset `off` is mix(off): a page that moved,
 * was zeroed or was lost to the host reads differently from the value expected at its place.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)
#define PAGE 4096UL

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static unsigned long parse_mib(const char *s)
{
    char *end;
    unsigned long v = strtoul(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v == 0) {
        fprintf(stderr, "memtool: '%s' is not a positive number of MiB\n", s);
        exit(2);
    }
    return v;
}

static int hold(unsigned long mib)
{
    size_t len = mib * MIB;
    unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("memtool: mmap");
        return 1;
    }
    for (size_t off = 0; off < len; off += PAGE)
        p[off] = (unsigned char)(off / PAGE) | 1;
    printf("DONE %lu MiB\n", mib);
    fflush(stdout);
    for (;;)
        pause();
}

static int pattern_write(const char *path, unsigned long mib)
{
    size_t len = mib * MIB;
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || ftruncate(fd, (off_t)len) != 0) {
        perror("memtool: open/ftruncate");
        return 1;
    }
    uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        perror("memtool: mmap");
        return 1;
    }
    uint64_t sum = 0;
    for (size_t i = 0; i < len / 8; i++) {
        p[i] = mix(i * 8);
        sum += p[i];
    }
    munmap(p, len);
    close(fd);
    printf("GUEST-PATTERN-WRITTEN %lu MiB sum=%016llx\n", mib, (unsigned long long)sum);
    return 0;
}

static int pattern_verify(const char *path)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size == 0) {
        printf("GUEST-PATTERN-BAD no pattern at %s (run 'pattern write MIB' first)\n", path);
        return 1;
    }
    size_t len = (size_t)st.st_size;
    const uint64_t *p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        perror("memtool: mmap");
        return 1;
    }
    uint64_t sum = 0;
    size_t bad_pages = 0, first_bad = (size_t)-1;
    for (size_t i = 0; i < len / 8; i++) {
        sum += p[i];
        if (p[i] != mix(i * 8)) {
            size_t page = i * 8 / PAGE;
            if (first_bad == (size_t)-1)
                first_bad = page;
            bad_pages++;
            i = (page + 1) * PAGE / 8 - 1; /* count each page once */
        }
    }
    if (bad_pages == 0)
        printf("GUEST-PATTERN-OK %zu MiB sum=%016llx\n", len / MIB, (unsigned long long)sum);
    else
        printf("GUEST-PATTERN-BAD %zu MiB: %zu bad pages, first at file offset 0x%zx\n", len / MIB,
               bad_pages, first_bad * PAGE);
    return bad_pages != 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && strcmp(argv[1], "hold") == 0)
        return hold(parse_mib(argv[2]));
    if (argc == 4 && strcmp(argv[1], "pattern-write") == 0)
        return pattern_write(argv[2], parse_mib(argv[3]));
    if (argc == 3 && strcmp(argv[1], "pattern-verify") == 0)
        return pattern_verify(argv[2]);
    fprintf(stderr, "usage: memtool hold MIB | pattern-write FILE MIB | pattern-verify FILE\n");
    return 2;
}
