#!/usr/bin/env python3
"""A memory workload whose every page can be checked.

Maps N MiB of anonymous memory and fills each 4 KiB page with contents derived only from
(seed, page index, generation), so any page can be regenerated and compared. The mix resembles
real memory: zero pages, same-filled pages, text-like compressible pages, half-random pages and
fully random (incompressible) pages. Non-same pages carry a header naming their seed, index and
generation, so a page returned from the wrong swap slot is caught too.

Phases: fill every page; then for each pass: sleep, verify every page (in a strided order, so
swap-in is not sequential), rewrite a fifth of the pages with a new generation. A final verify
follows. Run it in a memory cgroup smaller than --mib and the kernel swaps the pages out and in.

Exit status: 0 all pages verified, 1 at least one page read back wrong, 2 usage error.
Prints one JSON summary line on stdout; progress and mismatches go to stderr.
Only the standard library is used (runs under any python3 >= 3.8).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import struct
import sys
import time

PAGE = 4096
MAGIC = b"CRAMWL01"
HEADER = struct.Struct("<8sQQQ")  # magic, seed, index, generation
WORDS = (b"alpha", b"beta", b"gamma", b"delta", b"swap", b"page", b"zram", b"zswap", b"node",
         b"pool", b"ratio", b"memory", b"kernel", b"cgroup", b"reclaim", b"fault")

# kind of page -> share of the mix (out of 16)
ZERO, SAME, TEXT, HALF, RANDOM = "zero", "same", "text", "half", "random"
MIXES = {
    "mixed": [ZERO] * 2 + [SAME] * 1 + [TEXT] * 7 + [HALF] * 2 + [RANDOM] * 4,
    "compressible": [ZERO] * 3 + [SAME] * 2 + [TEXT] * 11,
    "random": [RANDOM] * 16,
}


def page_kind(mix: list[str], seed: int, index: int) -> str:
    h = ((index + 1) * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return mix[(h >> 29) % len(mix)]


def random_bytes(seed: int, index: int, gen: int, n: int) -> bytes:
    return hashlib.shake_128(b"%d:%d:%d" % (seed, index, gen)).digest(n)


def page_contents(mix: list[str], seed: int, index: int, gen: int) -> bytes:
    kind = page_kind(mix, seed, index)
    if kind == ZERO:
        return bytes(PAGE) if gen == 0 else b"\x5a" * PAGE  # a rewrite changes the page
    if kind == SAME:
        return bytes([(index * 31 + seed + gen * 7) % 255 + 1]) * PAGE
    header = HEADER.pack(MAGIC, seed, index, gen)
    if kind == RANDOM:
        return header + random_bytes(seed, index, gen, PAGE - HEADER.size)
    if kind == HALF:
        body = random_bytes(seed, index, gen, PAGE // 2 - HEADER.size)
        return header + body + (b"%016x" % index) * (PAGE // 2 // 16)
    # TEXT: log-like lines, compressible 3-6x
    lines = [header]
    size = HEADER.size
    j = 0
    while size < PAGE:
        w1 = WORDS[(index + j) % len(WORDS)]
        w2 = WORDS[(seed + j * 7 + gen) % len(WORDS)]
        line = b"%d.%03d %s[%d]: %s %s gen=%d line=%d\n" % (
            1700000000 + index, j, w1, index % 4096, w2, w1, gen, j)
        lines.append(line)
        size += len(line)
        j += 1
    return b"".join(lines)[:PAGE]


def describe_mismatch(got: bytes, want: bytes) -> str:
    first = next(i for i in range(PAGE) if got[i] != want[i])
    got_head = HEADER.unpack_from(got) if got[:8] == MAGIC else None
    note = f", page holds header {got_head[1:]} (seed, index, gen)" if got_head else ""
    zero = " (all zero)" if got == bytes(PAGE) else ""
    return f"first difference at byte {first}{zero}{note}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, required=True, help="memory to allocate, MiB")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mix", choices=sorted(MIXES), default="mixed")
    parser.add_argument("--passes", type=int, default=2, help="verify+rewrite passes")
    parser.add_argument("--sleep", type=float, default=0.5, help="seconds before each pass")
    parser.add_argument("--pageout", action="store_true",
                        help="after filling, madvise(MADV_PAGEOUT) everything (no cgroup needed)")
    parser.add_argument("--spot-check", type=int, default=0, metavar="N",
                        help="while filling, verify N earlier pages after each MiB")
    parser.add_argument("--max-report", type=int, default=10)
    args = parser.parse_args(argv)
    if args.mib <= 0 or args.passes < 0:
        parser.error("--mib must be positive and --passes non-negative")

    mix = MIXES[args.mix]
    npages = args.mib * (1 << 20) // PAGE
    mem = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    gens = bytearray(npages)
    stride = 7919  # prime; walks all pages when npages is not a multiple of it
    while npages % stride == 0:
        stride += 2
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    mismatches: list[str] = []
    bad_pages = 0

    def progress(msg: str) -> None:
        print(f"workload[{args.seed}] {time.monotonic() - t0:7.1f}s {msg}", file=sys.stderr,
              flush=True)

    def verify(label: str) -> None:
        start = time.monotonic()
        index = 0
        for _ in range(npages):
            index = (index + stride) % npages
            check_page(label, index)
        timings[label] = round(time.monotonic() - start, 3)
        progress(f"{label}: verified {npages} pages, {bad_pages} wrong so far")

    def check_page(label: str, index: int) -> None:
        nonlocal bad_pages
        off = index * PAGE
        want = page_contents(mix, args.seed, index, gens[index])
        got = mem[off:off + PAGE]
        if got != want:
            bad_pages += 1
            if len(mismatches) < args.max_report:
                msg = (f"{label}: page {index} ({page_kind(mix, args.seed, index)}, "
                       f"gen {gens[index]}) wrong: {describe_mismatch(got, want)}")
                mismatches.append(msg)
                progress("MISMATCH " + msg)
            mem[off:off + PAGE] = want  # count each corruption once

    start = time.monotonic()
    per_mib = (1 << 20) // PAGE
    spot = 0
    for index in range(npages):
        off = index * PAGE
        mem[off:off + PAGE] = page_contents(mix, args.seed, index, 0)
        if args.spot_check and index % per_mib == per_mib - 1:
            for _ in range(args.spot_check):
                spot = (spot * 6364136223846793005 + 1442695040888963407) % (1 << 64)
                check_page("fill", (spot >> 33) % (index + 1))
    timings["fill"] = round(time.monotonic() - start, 3)
    progress(f"filled {npages} pages ({args.mib} MiB, mix {args.mix})")
    if args.pageout:
        mem.madvise(mmap.MADV_PAGEOUT)
        progress("paged out")

    for p in range(1, args.passes + 1):
        time.sleep(args.sleep)
        verify(f"verify{p}")
        start = time.monotonic()
        gen = p % 256
        for index in range(p % 5, npages, 5):
            off = index * PAGE
            gens[index] = gen
            mem[off:off + PAGE] = page_contents(mix, args.seed, index, gen)
        timings[f"rewrite{p}"] = round(time.monotonic() - start, 3)
    time.sleep(args.sleep)
    verify("final")

    summary = {"mib": args.mib, "pages": npages, "mix": args.mix, "seed": args.seed,
               "passes": args.passes, "bad_pages": bad_pages, "mismatches": mismatches,
               "elapsed": round(time.monotonic() - t0, 3), "timings": timings}
    print(json.dumps(summary), flush=True)
    return 1 if bad_pages else 0


if __name__ == "__main__":
    sys.exit(main())
